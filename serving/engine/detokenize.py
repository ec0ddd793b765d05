"""Incremental detokenization with stop strings: each token costs O(its own text), not O(output).

`tokenizers.decoders.DecodeStream` turns one token at a time into text, holding bytes back
until a UTF-8 character is whole. Stop strings are searched only in the unsent tail (which is
at most the longest stop string plus the new piece), so one that spans tokens still matches,
and the text held back is never more than a stop string could still need.
"""

from __future__ import annotations

from loraplex.serving.engine.sampling import SamplingParams


class StopDetokenizer:
    """Feed tokens, get the text that is safe to send; `stopped` once a stop string appeared."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._params = params
        self._hold = max(params.longest_stop - 1, 0)
        self._tail = ""  # decoded but not yet sent
        self._undecoded: list[int] = []  # tokens DecodeStream holds (a partial UTF-8 character)
        self.stopped = False

    def add(self, token: int) -> str:
        """Text to send now (may be ''); after a stop string, the text before it and then nothing."""
        if self.stopped:
            return ""
        piece = self._stream.step(self._backend, token)
        if piece is None:
            self._undecoded.append(token)
            return ""
        self._undecoded.clear()
        return self._take(piece, final=False)

    def flush(self) -> str:
        """The rest of the text when the output ends (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._tokenizer.decode(self._undecoded, skip_special_tokens=True) if self._undecoded else ""
        self._undecoded.clear()
        return self._take(rest, final=True)

    def _take(self, piece: str, final: bool) -> str:
        self._tail += piece  # at most the held-back text plus this piece: the search stays short
        if self._params.stop:
            at = self._params.find_stop(self._tail)
            if at is not None:
                self.stopped = True
                out, self._tail = self._tail[:at], ""
                return out
        keep = 0 if final else self._hold
        cut = len(self._tail) - keep
        if cut <= 0:
            return ""
        out, self._tail = self._tail[:cut], self._tail[cut:]
        return out
