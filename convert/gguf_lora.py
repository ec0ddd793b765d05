"""PEFT LoRA adapter -> GGUF LoRA that llama.cpp applies at runtime over a GGUF of its base.

The format (what llama.cpp's adapter loader checks): general.type=adapter, adapter.type=lora,
adapter.lora.alpha, general.architecture equal to the base GGUF's, and per adapted weight a pair
`<gguf weight name>.lora_a` (PEFT A: [r, in]) and `.lora_b` (PEFT B: [out, r]). llama.cpp scales
B·A by alpha / r with r read from each tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from convert.gguf_export import (
    Progress,
    UnsupportedModel,
    arch_spec,
    gguf_tensor_name,
    permute_for_rope,
    qk_heads,
    read_config,
)


def write_gguf_lora(base_dir: Path, adapter_dir: Path, out_path: Path, progress: Progress = print) -> Path:
    """Write the PEFT adapter in `adapter_dir` (trained on the HF base in `base_dir`) as a GGUF LoRA."""
    base_dir, adapter_dir, out_path = Path(base_dir), Path(adapter_dir), Path(out_path)
    config = read_config(base_dir)
    arch = arch_spec(config)
    lora_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    _check_plain_lora(lora_config)
    alpha = float(lora_config["lora_alpha"])

    writer = gguf.GGUFWriter(path=out_path, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.name)

    pairs = _lora_pairs(load_file(adapter_dir / "adapter_model.safetensors"))
    for i, (module, (lora_a, lora_b)) in enumerate(sorted(pairs.items()), 1):
        name = gguf_tensor_name(f"{module}.weight")
        if name is None or name == "token_embd.weight":
            raise UnsupportedModel(f"LoRA on {module} has no llama.cpp runtime counterpart")
        if name == "output.weight" and config.get("tie_word_embeddings", False):
            raise UnsupportedModel("LoRA on lm_head of a base with tied embeddings (llama.cpp has no output tensor)")
        # lora_b's rows are the weight's output rows: reorder them like the base's Q/K rows
        heads = qk_heads(name, config) if arch.permute_qk else None
        if heads:
            lora_b = permute_for_rope(lora_b, heads)
        lora_b = lora_b * _scale_correction(lora_config, module, rank=lora_a.shape[0], alpha=alpha)
        progress(f"[{i:>4}/{len(pairs)}] {name}.lora_a {tuple(lora_a.shape)}  .lora_b {tuple(lora_b.shape)}")
        writer.add_tensor(f"{name}.lora_a", lora_a.float().numpy())
        writer.add_tensor(f"{name}.lora_b", lora_b.float().numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    progress(f"wrote {out_path} ({len(pairs)} LoRA pairs, alpha {alpha:g})")
    return out_path


def _check_plain_lora(lora_config: dict) -> None:
    """llama.cpp's runtime LoRA is W + s·B·A only: no DoRA, no trained biases, no full modules."""
    if lora_config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModel(f"adapter type {lora_config['peft_type']} is not LoRA")
    if lora_config.get("use_dora"):
        raise UnsupportedModel("DoRA adapters cannot be applied by llama.cpp; merge them instead")
    if lora_config.get("lora_bias") or lora_config.get("bias", "none") != "none":
        raise UnsupportedModel("adapters with trained biases cannot be applied by llama.cpp; merge them instead")
    if lora_config.get("modules_to_save"):
        raise UnsupportedModel("adapters with modules_to_save cannot be applied by llama.cpp; merge them instead")


def _lora_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name: (A, B)} from PEFT keys `base_model.model.<module>.lora_A.weight`."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise UnsupportedModel(f"unexpected adapter tensor {key} (only LoRA A/B on linear layers)")
        found.setdefault(match[1], {})[match[2]] = tensor
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


def _scale_correction(lora_config: dict, module: str, rank: int, alpha: float) -> float:
    """Factor folded into B so llama.cpp's alpha / r equals PEFT's scale for this module.

    1.0 for a plain adapter; differs under rsLoRA (alpha / sqrt(r)) or a per-module alpha_pattern.
    """
    module_alpha = float(_pattern_value(lora_config.get("alpha_pattern") or {}, module, alpha))
    peft_scale = module_alpha / (math.sqrt(rank) if lora_config.get("use_rslora") else rank)
    return peft_scale / (alpha / rank)


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """PEFT's alpha_pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default

