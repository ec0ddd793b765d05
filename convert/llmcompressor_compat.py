"""The one patch loraplex makes to llm-compressor internals, version-gated and checked.

Since llmcompressor 0.13 (PR #2813), AWQModifier._apply_smoothing pins its cached activations
unconditionally (modifiers/transform/awq/base.py:507 in 0.14.0.1, via
`IntermediatesCache.pin_memory`, pipelines/cache.py:155). On a CPU-only torch,
Tensor.pin_memory() raises "Cannot access accelerator device when none is available". Pinning
only speeds host-to-device copies and there are none without a device, so a no-op is exact: it
restores 0.12's behaviour, which pinned only when torch.accelerator.is_available().
`tests/test_convert_awq.py` fails when the patched target changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Iterator

from loraplex.training.errors import ConfigError

TESTED_LLMCOMPRESSOR = ("0.14.0.1",)
PIN_MEMORY_PARAMS = ["self", "batch_index", "input_names"]
PIN_MEMORY_SOURCE_SHA256 = "12f33ab17f3e417438d8b730bb547c730b6cf573517268df85f530f127cc4e1d"


def pin_memory_target():
    from llmcompressor.pipelines.cache import IntermediatesCache

    return IntermediatesCache


def check_llmcompressor() -> None:
    """Refuse to patch an llm-compressor other than the one the patch was read against."""
    import llmcompressor

    if llmcompressor.__version__ not in TESTED_LLMCOMPRESSOR:
        raise ConfigError(
            f"the AWQ CPU patch (convert/llmcompressor_compat.py) was checked on llmcompressor "
            f"{TESTED_LLMCOMPRESSOR}, not {llmcompressor.__version__}: "
            f"pip install 'llmcompressor=={TESTED_LLMCOMPRESSOR[-1]}'"
        )
    params = list(inspect.signature(pin_memory_target().pin_memory).parameters)
    if params != PIN_MEMORY_PARAMS:
        raise ConfigError(
            f"llmcompressor's IntermediatesCache.pin_memory changed signature ({params}): "
            "re-check convert/llmcompressor_compat.py"
        )


def pin_memory_source_sha256() -> str:
    return hashlib.sha256(inspect.getsource(pin_memory_target().pin_memory).encode()).hexdigest()


@contextlib.contextmanager
def no_pinning_without_accelerator() -> Iterator[None]:
    """While the block runs, IntermediatesCache.pin_memory is a no-op when there is no accelerator."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    check_llmcompressor()
    cache = pin_memory_target()
    original = cache.__dict__["pin_memory"]
    cache.pin_memory = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cache.pin_memory = original
