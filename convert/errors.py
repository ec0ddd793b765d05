"""convert's own error: what the exporters cannot write (the contract errors are training/errors.py's)."""

from __future__ import annotations

from loraplex.training.errors import LoraplexError


class UnsupportedModel(LoraplexError):
    """The checkpoint uses an architecture, tokenizer or RoPE variant this exporter cannot write."""
