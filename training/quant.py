"""THE NF4 + double-quant settings: training, serving and convert all load the base through here."""

from __future__ import annotations

from pathlib import Path

import torch

NF4_SETTINGS = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}


def nf4_config():
    from transformers import BitsAndBytesConfig

    settings = dict(NF4_SETTINGS, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(**settings)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_nf4_base(path: str | Path, device: str | None = None):
    """The base frozen in NF4 with double quantization and bf16 compute."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=nf4_config(),
        dtype=torch.bfloat16,
        device_map={"": device or default_device()},
    )


def load_dense_base(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | None = None):
    """The unquantized base, for bf16 LoRA, merging at FP16 and reference outputs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device or default_device())
