"""Greedy exact match on held-out rows, under the prompt contract."""

from __future__ import annotations

import torch

from loraplex.training.data import encode_prompt, prompt_and_completion


def is_exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy decode each prompt until EOS; prompts are left-padded so a batch decodes together."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int | None = None) -> tuple[float, list[str]]:
    """Fraction of rows whose greedy completion equals the reference, and the predictions."""
    pairs = [prompt_and_completion(row, tokenizer) for row in rows]
    if max_new_tokens is None:
        longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in pairs)
        max_new_tokens = longest + 4
    was_training = model.training
    model.eval()
    predictions = greedy_completions(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    model.train(was_training)
    hits = sum(is_exact_match(pred, target) for pred, (_, target) in zip(predictions, pairs))
    return hits / len(rows), predictions
