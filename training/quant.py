"""THE NF4 + double-quant settings: training, serving and convert all load the base through here."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loraplex.training.errors import ConfigError

NF4_SETTINGS = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
}
COMPUTE_DTYPE_ENV = "LORAPLEX_COMPUTE_DTYPE"
COMPUTE_DTYPES = ("bfloat16", "float32")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_computes_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 itself (elsewhere oneDNN emulates it)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: str | None = None) -> torch.dtype:
    """What the NF4 base computes in: bf16 where the hardware multiplies bf16 (CUDA, a CPU with
    AVX512-BF16 or AMX), float32 elsewhere. On an AVX2-only CPU a bf16 matmul is emulated: 40
    QLoRA steps on the demo base took 207 s in bf16 and 26 s in float32 here, to the same loss.
    $LORAPLEX_COMPUTE_DTYPE (bfloat16 or float32) overrides."""
    forced = os.environ.get(COMPUTE_DTYPE_ENV)
    if forced:
        if forced not in COMPUTE_DTYPES:
            raise ConfigError(f"{COMPUTE_DTYPE_ENV}={forced!r}: use one of {', '.join(COMPUTE_DTYPES)}, or unset it")
        return getattr(torch, forced)
    if (device or default_device()) != "cpu" or _cpu_computes_bf16():
        return torch.bfloat16
    return torch.float32


def nf4_settings(device: str | None = None) -> dict:
    """The settings a manifest records: NF4, double quant, and the compute dtype used here."""
    return {**NF4_SETTINGS, "bnb_4bit_compute_dtype": str(compute_dtype(device)).removeprefix("torch.")}


def nf4_config(device: str | None = None):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**NF4_SETTINGS, bnb_4bit_compute_dtype=compute_dtype(device))


def load_nf4_base(path: str | Path, device: str | None = None):
    """The base frozen in NF4 with double quantization, computing in `compute_dtype`."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=nf4_config(device),
        dtype=compute_dtype(device),
        device_map={"": device},
    )


def load_dense_base(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | None = None):
    """The unquantized base, for bf16 LoRA, merging at FP16 and reference outputs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device or default_device())
