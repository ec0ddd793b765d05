"""Constrained decoding for `response_format` (JSON object or JSON schema), with llguidance on CPU.

Chosen by benchmarks/grammar_choice.py on the demo tokenizer (README, 'Serving'): on random
logits (the weakest model there is), every finished llguidance output validated against the
schema, while xgrammar 0.2.8 let raw control characters into JSON strings (57/68 valid) and
outlines-core's regex ignores integer bounds (0/8). llguidance masks a token in ~86 us (xgrammar
~16 us, outlines-core ~70 us) and compiles a schema in ~1 ms; it is also one of vLLM's backends.

JSON is generated without free whitespace (`whitespace_flexible: False`): a weak model can
otherwise spend its whole budget on spaces and never close the object.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from loraplex.serving.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

MAX_SCHEMA_CHARS = 64_000


def parse_response_format(text: str) -> str | None:
    """OpenAI's response_format (JSON text) -> the JSON schema to enforce (text), or None for plain text."""
    try:
        spec = json.loads(text)
    except ValueError:
        raise InvalidRequest("response_format must be a JSON object") from None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
        return json.dumps(schema)
    raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


class GrammarCompiler:
    """One per engine: the tokenizer's vocabulary indexed once for llguidance."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise InvalidRequest("response_format needs llguidance: pip install loraplex[serve]") from None
        self._llg = llguidance
        self.stop_token_ids = sorted(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.stop_token_ids)

    def matcher(self, response_format: str) -> RowGrammar | None:
        """A fresh matcher for one request; InvalidRequest for a schema llguidance cannot compile."""
        schema = parse_response_format(response_format)
        if schema is None:
            return None
        if len(schema) > MAX_SCHEMA_CHARS:
            raise InvalidRequest(f"response_format schema is over {MAX_SCHEMA_CHARS} characters")
        matcher = self._llg.LLMatcher
        try:
            grammar = matcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise InvalidRequest(f"response_format schema is not supported: {exc}"[:400]) from None
        compiled = matcher(self._tokenizer, grammar)
        if compiled.is_error():
            raise InvalidRequest(f"response_format schema is not supported: {compiled.get_error()}"[:400])
        return RowGrammar(compiled, self._tokenizer.vocab_size, self.stop_token_ids)


class RowGrammar:
    """One request's grammar state: masks its logits row and follows the tokens it accepts."""

    def __init__(self, matcher, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance.torch as llg_torch

        self._torch, self._matcher, self._stop = llg_torch, matcher, set(stop_token_ids)
        self._bitmask = llg_torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens to -inf, in place on a [vocab] row (once the JSON is complete: all but EOS)."""
        self._torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        self._torch.apply_token_bitmask_inplace(logits.view(1, -1), self._bitmask)
        return logits

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise InvalidRequest(
                f"token {token} does not fit the response_format grammar: {self._matcher.get_error()}"[:400]
            )

    @property
    def finished(self) -> bool:
        """The JSON value is complete (only a stop token may follow)."""
        return self._matcher.is_stopped()
