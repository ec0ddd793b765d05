"""Token logprobs from the engine's own logits, and their OpenAI shapes.

Logprobs are those of the model's distribution (log-softmax of the raw logits, before
temperature, penalties or the grammar), as vLLM returns by default: what an evaluation harness
compares against a plain forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.serving.engine.api import StreamEvent


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: list[tuple[int, float]] = field(default_factory=list)  # best alternatives, most likely first


@dataclass
class TokenEvent(StreamEvent):
    """A StreamEvent with the logprobs of the tokens behind its text (and, once, of the prompt's)."""

    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's logprob under one row of raw logits [vocab], with the k best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = _top(logp, k)
    return TokenLogprob(token, float(logp[token]), top)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob]:
    """Per prompt token, from the prefill's logits at every position [t, vocab]; the first is None."""
    logp = torch.log_softmax(logits[: len(prompt_ids) - 1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long)
    chosen = logp.gather(1, targets.view(-1, 1)).view(-1).tolist()
    entries = [TokenLogprob(prompt_ids[0], None)]
    for position, (token, value) in enumerate(zip(prompt_ids[1:], chosen)):
        entries.append(TokenLogprob(token, value, _top(logp[position], k)))
    return entries


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return list(zip(ids.tolist(), values.tolist()))


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text (special tokens by name); a partial UTF-8 character shows as U+FFFD."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def as_dicts(entries: list[TokenLogprob], tokenizer) -> list[dict]:
    """Plain dicts that cross Ray and feed both surfaces: token, token_id, logprob, bytes, special, top."""
    special = set(tokenizer.all_special_ids)

    def one(token_id: int, logprob: float | None) -> dict:
        text = token_text(tokenizer, token_id)
        return {
            "token": text,
            "token_id": token_id,
            "logprob": logprob,
            "bytes": list(text.encode("utf-8")),
            "special": token_id in special,
        }  # special: not part of the text (text_offset skips it)

    return [{**one(e.token_id, e.logprob), "top": [one(t, v) for t, v in e.top]} for e in entries]
