"""Random (untrained) LoRA adapters in the exact format training writes: for tests and benchmarks.

A random B makes each adapter change the base's outputs, so mixing and routing mistakes show.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraplex.training.manifest import base_fingerprint, write_manifest
from loraplex.training.quant import nf4_settings


def make_random_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    rank: int = 8,
    alpha: float = 16.0,
    std: float = 0.02,
    target_modules="all-linear",
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    write_manifest(
        out_dir,
        {
            "adapter_id": out_dir.name,
            "base_fingerprint": base_fingerprint(base_dir),
            "lora": {"r": rank, "alpha": alpha, "random_seed": seed},
            "quantization": nf4_settings(),
        },
    )
    return out_dir
