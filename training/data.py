"""JSONL rows to tokenized examples. The prompt contract lives here; serving and convert import it.

Prompt contract: the model sees the prompt text verbatim (the tokenizer adds its own BOS), the
completion follows directly and ends with EOS. Chat rows ({"messages": [...]}) are rendered with
the tokenizer's chat template; the last assistant message is the completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.training.errors import DataError


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; any problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            _check_row(row, path, lineno)
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    return rows


def _check_row(row: object, path: Path, lineno: int) -> None:
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} strings")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: needs string fields 'prompt' and 'completion' (or 'messages')")
    if not row["prompt"]:
        raise DataError(f"{where}: 'prompt' is empty")


def prompt_and_completion(row: dict, tokenizer) -> tuple[str, str]:
    """Split a row into the text the model sees and the text it must produce."""
    if "messages" in row:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        return prompt, row["messages"][-1]["content"]
    return row["prompt"], row["completion"]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token IDs exactly as serving feeds them: the tokenizer's BOS, then the text."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, row: dict, max_len: int) -> dict[str, list[int]]:
    """Input IDs and labels; labels mask the prompt so loss falls on completion tokens only."""
    prompt, completion = prompt_and_completion(row, tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class CompletionCollator:
    """Right-pads a batch; padded positions carry no loss."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [-100] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }


def pack_examples(examples: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Examples laid end to end in rows of at most max_len tokens (next fit, order kept).

    Each row carries position_ids that restart at 0 with every example. Given those, no
    attention mask and no KV cache (use_cache=False, as run.py trains), transformers' sdpa and
    eager attention mask across examples
    (masking_utils.find_packed_sequence_indices), so a packed example sees only itself and its
    loss equals the unpacked one; fewer pad tokens means fewer wasted FLOPs on short examples.
    """
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids = example["input_ids"][:max_len]
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        labels = list(example["labels"][: len(ids)])
        labels[0] = -100  # never predict an example's first token from the previous example
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


@dataclass
class PackedCollator:
    """Right-pads packed rows. No attention mask on purpose: position_ids carry the boundaries
    (see pack_examples); the padding restarts at position 0, a block no real token attends to."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, positions = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [-100] * pad)
            own = f.get("position_ids") or list(range(len(f["input_ids"])))  # eval rows come unpacked
            positions.append(own + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}
