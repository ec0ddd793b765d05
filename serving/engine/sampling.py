"""Per-request sampling: greedy at temperature 0, else temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.serving.errors import InvalidRequest

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows), as in vLLM
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise; OpenAI's own cap is 2


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: whatever the context leaves (resolved by the engine)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as in vLLM

    def validate(self, max_new_tokens: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if self.max_tokens > max_new_tokens:
            raise InvalidRequest(f"max_tokens {self.max_tokens} is above this server's limit of {max_new_tokens}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= MAX_TEMPERATURE):  # NaN too
            raise InvalidRequest(f"temperature must be a number in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise InvalidRequest(f"seed must be an integer in [0, 2^63), got {self.seed}")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s or len(s) > 64 for s in self.stop):
            raise InvalidRequest("stop takes at most 8 non-empty strings of at most 64 characters")

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def find_stop(self, text: str) -> int | None:
        """Index where the earliest stop string begins, if any."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of logits [vocab]."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        cutoff = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
