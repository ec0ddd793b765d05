"""PEFT LoRA adapter -> GGUF LoRA that llama.cpp applies at runtime over a GGUF of its base.

The format (what llama.cpp's adapter loader checks): general.type=adapter, adapter.type=lora,
adapter.lora.alpha, general.architecture equal to the base GGUF's, and per adapted weight a pair
`<gguf weight name>.lora_a` (PEFT A: [r, in]) and `.lora_b` (PEFT B: [out, r]). llama.cpp scales
B·A by alpha / r with r read from each tensor. The adapter is parsed by training/lora_format.py,
the same reader the serving store and merge use.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from loraplex.convert.gguf_export import (
    Progress,
    UnsupportedModel,
    arch_spec,
    gguf_tensor_name,
    permute_for_rope,
    qk_heads,
    read_config,
)
from loraplex.training import lora_format


def write_gguf_lora(base_dir: Path, adapter_dir: Path, out_path: Path, progress: Progress = print) -> Path:
    """Write the PEFT adapter in `adapter_dir` (trained on the HF base in `base_dir`) as a GGUF LoRA."""
    base_dir, adapter_dir, out_path = Path(base_dir), Path(adapter_dir), Path(out_path)
    config = read_config(base_dir)
    arch = arch_spec(config)
    spec, modules = lora_format.read_adapter(adapter_dir)  # refuses DoRA, embedding LoRA, pickles, bad shapes
    lora_format.check_fits(modules, lora_format.base_linear_shapes(base_dir), max_rank=None)
    alpha = spec.alpha

    writer = gguf.GGUFWriter(path=out_path, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.name)

    for i, (module, lora) in enumerate(sorted(modules.items()), 1):
        name = gguf_tensor_name(f"{module}.weight")
        if name is None or name == "token_embd.weight":
            raise UnsupportedModel(f"LoRA on {module} has no llama.cpp runtime counterpart")
        lora_a, lora_b = lora.a, lora.b
        # lora_b's rows are the weight's output rows: reorder them like the base's Q/K rows
        heads = qk_heads(name, config) if arch.permute_qk else None
        if heads:
            lora_b = permute_for_rope(lora_b, heads)
        # llama.cpp scales B·A by alpha / r (one alpha, each tensor's r): fold in what makes it the
        # module's own scaling (rsLoRA, rank_pattern, alpha_pattern), as lora_format computes it
        lora_b = lora_b * (lora.scaling / (alpha / lora.rank))
        progress(f"[{i:>4}/{len(modules)}] {name}.lora_a {tuple(lora_a.shape)}  .lora_b {tuple(lora_b.shape)}")
        writer.add_tensor(f"{name}.lora_a", lora_a.float().numpy())
        writer.add_tensor(f"{name}.lora_b", lora_b.float().numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    progress(f"wrote {out_path} ({len(modules)} LoRA pairs, alpha {alpha:g})")
    return out_path
