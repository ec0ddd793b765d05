"""llama.cpp (through llama-cpp-python) as the judge of an export: tokenize, logits, greedy decode.

Everything works on token IDs, not text: llama-cpp-python's detokenizer drops the space after
BOS, so comparing decoded strings would report differences that are not there.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loraplex.training.errors import LoraplexError


class LlamaCppMissing(LoraplexError):
    """llama-cpp-python is not installed (it is an optional dependency: checks and k-quants only)."""


def require_llama_cpp() -> ModuleType:
    """Import llama_cpp lazily: the GGUF writers work without it, only checks and k-quants need it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LlamaCppMissing(
            "llama-cpp-python is not installed: pip install -c constraints/cpu.txt llama-cpp-python"
        ) from err
    return llama_cpp


def load_gguf(
    model_path: Path,
    lora_path: Path | None = None,
    lora_scale: float = 1.0,
    n_ctx: int = 512,
    n_threads: int | None = None,
) -> Any:
    """A llama_cpp.Llama over a GGUF, optionally with a GGUF LoRA applied at `lora_scale`.

    logits_all=True because llama-cpp-python only keeps logits in `scores` in that mode, and both
    the per-position comparison and greedy decoding read them from there.
    """
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        lora_scale=lora_scale,
        n_ctx=n_ctx,
        n_threads=n_threads,
        logits_all=True,
        verbose=False,
    )


def tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's own tokenization of the prompt contract: BOS + text, special tokens not parsed."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def logits(llm: Any, token_ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of `token_ids`: [len(token_ids), vocab], float32."""
    llm.reset()
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def greedy_generate(llm: Any, prompt_ids: list[int], max_new_tokens: int = 64) -> list[int]:
    """Argmax decoding from `prompt_ids` until EOS (excluded) or `max_new_tokens`; returns new IDs."""
    eos = llm.token_eos()
    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if next_id == eos:
            break
        generated.append(next_id)
        llm.eval([next_id])
    return generated
