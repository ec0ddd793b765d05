"""Per-request logit processing before sampling: penalties, logit_bias, min_tokens, the grammar.

Each request that asks for any of these gets one LogitsProcessor, kept in the engine thread.
Token counts are updated one token at a time, so a step costs O(vocab) however long the output.
Semantics follow vLLM: repetition penalty over prompt + output tokens, presence and frequency
penalties over output tokens, then the bias, then min_tokens and the grammar masks.
"""

from __future__ import annotations

import torch

from loraplex.serving.engine.grammar import RowGrammar
from loraplex.serving.engine.sampling import SamplingParams


class LogitsProcessor:
    """One request's processing state (see module docstring)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        eos_ids: set[int],
        grammar: RowGrammar | None = None,
    ) -> None:
        self.params, self.grammar = params, grammar
        self.counts = torch.zeros(vocab_size)  # occurrences in the output so far
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # in prompt or output (repetition penalty)
        if params.repetition_penalty != 1:
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias = torch.zeros(vocab_size).index_add_(0, torch.tensor(ids), torch.tensor(values))
        self.enders = torch.tensor(sorted(set(eos_ids) | set(params.stop_token_ids)), dtype=torch.long)
        self.generated = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed copy of one row of raw logits [vocab]."""
        params, logits = self.params, logits.clone()
        if params.repetition_penalty != 1:
            hit = logits[self.seen]
            logits[self.seen] = torch.where(hit > 0, hit / params.repetition_penalty, hit * params.repetition_penalty)
        if params.frequency_penalty:
            logits -= params.frequency_penalty * self.counts
        if params.presence_penalty:
            logits -= params.presence_penalty * (self.counts > 0).float()
        if self.bias is not None:
            logits += self.bias
        if self.generated < params.min_tokens:
            logits[self.enders] = float("-inf")
        if self.grammar is not None:
            self.grammar.mask(logits)
        return logits

    def accept(self, token: int) -> None:
        """Record the sampled token (the grammar advances; EOS too, which completes it)."""
        self.counts[token] += 1
        self.seen[token] = True
        self.generated += 1
        if self.grammar is not None:
            self.grammar.accept(token)
