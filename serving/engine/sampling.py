"""Per-request sampling: greedy at temperature 0, else temperature / top-k / top-p with a seed.

The fields follow OpenAI's, with vLLM's semantics (and extensions) where OpenAI leaves a gap.
Logit processing that needs state per request (penalties, grammar) lives in logits.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from loraplex.serving.errors import InvalidRequest

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows), as in vLLM
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise; OpenAI's own cap is 2
MAX_STOP = 4  # stop strings per request, as in OpenAI
MAX_LOGPROBS = 20  # top alternatives per token, as in OpenAI's completions API
MAX_LOGIT_BIAS = 300  # entries; OpenAI documents no cap, vLLM none either: a sane bound


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: whatever the context leaves (resolved by the engine)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as in vLLM
    presence_penalty: float = 0.0  # OpenAI: subtract once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the output so far
    repetition_penalty: float = 1.0  # vLLM: divide (or multiply, if negative) logits of prompt+output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token ID, bias added to its logit)
    min_tokens: int = 0  # vLLM: EOS and stop_token_ids are masked until this many tokens exist
    stop_token_ids: tuple[int, ...] = ()  # vLLM: these tokens end the output like EOS (not included)
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (echo); allows max_tokens=0
    response_format: str | None = None  # JSON text of OpenAI's response_format (see grammar.py)

    def validate(self, max_new_tokens: int) -> None:
        min_new = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or self.max_tokens < min_new:
            raise InvalidRequest(
                f"max_tokens must be a positive integer, got {self.max_tokens}"
                + ("" if min_new else " (0 only with prompt logprobs: echo)")
            )
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
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s or len(s) > 64 for s in self.stop):
            raise InvalidRequest(f"stop takes at most {MAX_STOP} non-empty strings of at most 64 characters")
        self._validate_processing()

    def _validate_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise InvalidRequest(f"{name} must be a number in [-2, 2], got {value}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 10):
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias:
            if not (isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise InvalidRequest(f"logit_bias for token {token} must be in [-100, 100], got {bias}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if len(self.stop_token_ids) > 64:
            raise InvalidRequest("stop_token_ids takes at most 64 token IDs")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequest(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value}")
        if self.response_format is not None:
            try:
                json.loads(self.response_format)
            except ValueError:
                raise InvalidRequest("response_format must be JSON text") from None
            if self.ignore_eos or self.min_tokens:
                raise InvalidRequest(
                    "response_format ends the output when the JSON value is complete: "
                    "it cannot be combined with ignore_eos or min_tokens"
                )

    def check_token_ids(self, vocab_size: int) -> None:
        """Token IDs in logit_bias and stop_token_ids must exist in the model's vocabulary."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
            if bad:
                raise InvalidRequest(f"{name} names token IDs outside the vocabulary [0, {vocab_size}): {bad[:5]}")

    @property
    def needs_processing(self) -> bool:
        """Whether logits.py has work to do for this request (most requests skip it)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
            or self.logit_bias
            or self.min_tokens
            or self.response_format
        )

    def extended_fields(self) -> list[str]:
        """The fields set here beyond the basic ones (an engine that lacks them refuses by name)."""
        defaults = SamplingParams()
        names = (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
            "min_tokens",
            "stop_token_ids",
            "logprobs",
            "prompt_logprobs",
            "response_format",
        )
        return [n for n in names if getattr(self, n) != getattr(defaults, n)]

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def find_stop(self, text: str, start: int = 0) -> int | None:
        """Index where the earliest stop string begins at or after `start`, if any."""
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
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
