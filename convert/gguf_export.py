"""Hugging Face checkpoint (Llama, Mistral, Qwen2) -> llama.cpp GGUF, written with gguf-py.

llama.cpp's convert_hf_to_gguf.py is a script of its repository, not part of any wheel, so the
glue it does for these three architectures lives here: the hyperparameter keys, the tokenizer,
the tensor names and the Q/K row order. Tensors are streamed one at a time (read, convert,
write), so a 7B export needs about one tensor of memory, not the whole model.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from loraplex.convert.errors import UnsupportedModel
from loraplex.convert.gguf_tokenizer import add_tokenizer
from loraplex.convert.llamacpp_check import require_llama_cpp
from loraplex.training.architectures import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitecture,
    require_convert_architecture,
)
from loraplex.training.errors import ConfigError, LoraplexError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    """llama.cpp's architecture name, written as general.architecture."""
    permute_qk: bool
    """llama.cpp's 'llama' graph rotates adjacent pairs (GPT-J style RoPE), HF's rotate_half rotates
    the two halves of each head: Q/K rows must be reordered. 'qwen2' runs NEOX RoPE, as HF does."""


# The GGUF layout of every name in training/architectures.SUPPORTED_ARCHITECTURES, no more, no less.
ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec("llama", permute_qk=True),
    "MistralForCausalLM": ArchSpec("llama", permute_qk=True),  # llama.cpp runs Mistral as 'llama'
    "Qwen2ForCausalLM": ArchSpec("qwen2", permute_qk=False),
}
assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES), "add the GGUF layout of every supported architecture"

# Written by gguf-py in this process: outtype -> (tensor type of 2-D weights, general.file_type).
GGUF_PY_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# k-quants have no quantizer in gguf-py: F16 first, then llama.cpp's own (its mixes, e.g. Q6_K output).
LLAMA_CPP_TYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
SUPPORTED_OUTTYPES = (*GGUF_PY_TYPES, *LLAMA_CPP_TYPES)

_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",  # Llama with attention_bias=True
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",  # Llama with mlp_bias=True
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor (`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"blk.{match[1]}.{_LAYER_TENSORS[match[2]]}"
    return None


def arch_spec(config: dict) -> ArchSpec:
    """The ArchSpec for a config.json, or UnsupportedModel naming the ones we can export."""
    try:
        return ARCHITECTURES[require_convert_architecture(config)]
    except UnsupportedArchitecture as exc:
        raise UnsupportedModel(str(exc)) from None


def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [first half | second half] to llama.cpp's interleaved pairs.

    Row i of the first half and row i of the second half are rotated together by HF; llama.cpp
    rotates rows 2i and 2i+1, so they must end up adjacent. Works for weights [out, in] and
    biases [out], and for LoRA B [out, r] (the rotation acts on output rows only).
    """
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def qk_heads(gguf_name: str, config: dict) -> int | None:
    """How many heads to permute a tensor by: Q by the query heads, K by the KV heads, others None."""
    n_heads = config["num_attention_heads"]
    if ".attn_q." in gguf_name:
        return n_heads
    if ".attn_k." in gguf_name:
        return config.get("num_key_value_heads") or n_heads
    return None


def read_config(model_dir: Path) -> dict:
    """config.json as a dict (UnsupportedModel when the folder is not an HF checkpoint)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedModel(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    return json.loads(path.read_text())


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "F16", progress: Progress = print) -> Path:
    """Write the HF checkpoint in `model_dir` as a GGUF at `out_path` quantized to `outtype`."""
    model_dir, out_path, outtype = Path(model_dir), Path(out_path), outtype.upper()
    if outtype not in SUPPORTED_OUTTYPES:
        raise ConfigError(f"unsupported GGUF type {outtype!r}; supported: {', '.join(SUPPORTED_OUTTYPES)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if outtype in LLAMA_CPP_TYPES:
        require_llama_cpp()  # fail before the (long) F16 pass, not after it
        f16_path = out_path.with_name(out_path.name + ".f16.tmp")
        try:
            write_gguf(model_dir, f16_path, "F16", progress)
            progress(f"llama.cpp quantize F16 -> {outtype}")
            quantize_with_llama_cpp(f16_path, out_path, outtype)
        finally:
            f16_path.unlink(missing_ok=True)
        progress(tensor_type_report(out_path, outtype)["summary"])
        return out_path

    config = read_config(model_dir)
    arch = arch_spec(config)
    if (note := sliding_window_note(config)) is not None:
        progress(f"warning: {note}")
    weight_type, file_type = GGUF_PY_TYPES[outtype]
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_name(model_dir.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config)
    add_tokenizer(writer, model_dir, config["vocab_size"])

    # Two passes so tensors stream: the header needs every name, shape and type before any data.
    plan = list(_plan_tensors(model_dir, config, weight_type))
    for name, shape, ggml_type, _ in plan:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape, ggml_type, load) in enumerate(plan, 1):
        progress(f"[{i:>4}/{len(plan)}] {name:<28} {str(tuple(shape)):<14} {ggml_type.name}")
        data = load().numpy()
        writer.write_tensor_data(data if ggml_type == gguf.GGMLQuantizationType.F32 else _encode(data, ggml_type))
    writer.close()
    progress(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {outtype})")
    return out_path


def sliding_window_note(config: dict) -> str | None:
    """llama.cpp's 'llama' and 'qwen2' graphs attend over the whole context: say where outputs part."""
    window = config.get("sliding_window")
    sliding = config.get("use_sliding_window", True) and window and window < config["max_position_embeddings"]
    if not sliding:
        return None
    return (
        f"sliding_window {window}: llama.cpp attends over the full context, so its outputs match "
        f"Hugging Face's only while prompt + output stay within {window} tokens"
    )


def _expected_types(outtype: str) -> set[str]:
    """Tensor types a 2-D weight may have when nothing fell back (llama.cpp's mixes included)."""
    if outtype in LLAMA_CPP_TYPES:
        return {t.name for t in gguf.GGMLQuantizationType if t.name.endswith("_K")}
    return {GGUF_PY_TYPES[outtype][0].name} | ({"Q8_0"} if outtype == "Q4_0" else set())  # Q4_0 keeps output at Q8_0


def _row_block(outtype: str) -> int:
    """Row multiple the requested type needs: 256 for k-quants (QK_K), the block size otherwise."""
    if outtype in LLAMA_CPP_TYPES:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][0]
    return gguf.GGML_QUANT_SIZES[GGUF_PY_TYPES[outtype][0]][0]


def tensor_type_report(path: Path, outtype: str) -> dict:
    """What the GGUF really holds, read back with gguf-py: type counts and the weights that fell back.

    llama.cpp's quantizer (and ours for Q8_0/Q4_0) silently writes another type for a weight
    whose rows do not split into whole blocks, e.g. q5_0 for Q4_K when a row of 576 is not a
    multiple of 256. Small models are mostly such rows, so say which and how many."""
    outtype = outtype.upper()
    reader = gguf.GGUFReader(str(path))
    expected, block = _expected_types(outtype), _row_block(outtype)
    counts: dict[str, int] = {}
    fallbacks, weights = [], 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
        if len(tensor.shape) < 2:  # norms, biases, rope_freqs: F32 by design
            continue
        weights += 1
        if kind not in expected:
            row = int(tensor.shape[0])
            fallbacks.append(
                {
                    "tensor": tensor.name,
                    "shape": [int(d) for d in tensor.shape],
                    "type": kind,
                    "reason": f"row of {row} not a multiple of {block}" if row % block else "quantizer's choice",
                }
            )
    by_type: dict[str, int] = {}
    for item in fallbacks:
        by_type[item["type"]] = by_type.get(item["type"], 0) + 1
    summary = (
        f"{outtype}: all {weights} weight tensors in the requested type family"
        if not fallbacks
        else f"{outtype}: {len(fallbacks)} of {weights} weight tensors fell back ("
        + ", ".join(f"{n} to {kind}" for kind, n in sorted(by_type.items()))
        + f"); their rows are not multiples of {block}"
    )
    return {
        "requested": outtype,
        "weight_tensors": weights,
        "tensor_types": counts,
        "fallbacks": fallbacks,
        "fallback_types": by_type,
        "summary": summary,
    }


def _add_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """The hyperparameter keys llama.cpp's llama/qwen2 loaders read."""
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_heads:  # e.g. Mistral Nemo: heads wider than hidden/n_heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = _rope_type(config)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):  # llama3 is written as the rope_freqs tensor
        raise UnsupportedModel(f"RoPE scaling {rope_type!r} is not supported (default, linear, yarn, llama3)")


def _rope_parameters(config: dict) -> dict:
    """RoPE settings: transformers 5 writes `rope_parameters`, older checkpoints `rope_scaling` + `rope_theta`."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_type(config: dict) -> str:
    rope = _rope_parameters(config)
    return rope.get("rope_type", rope.get("type", "default"))


def _llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors, which llama.cpp reads from the rope_freqs tensor."""
    rope = _rope_parameters(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two wavelength bounds: interpolate
    factors = torch.where(wavelen < old_ctx / high, torch.ones_like(factors), factors)
    return torch.where(wavelen > old_ctx / low, torch.full_like(factors, factor), factors)


# ---- tensors --------------------------------------------------------------------------------


def _plan_tensors(
    model_dir: Path, config: dict, weight_type: gguf.GGMLQuantizationType
) -> Iterator[tuple[str, list[int], gguf.GGMLQuantizationType, Callable[[], torch.Tensor]]]:
    """(gguf name, shape, tensor type, loader) for every tensor, without reading any data yet."""
    arch = arch_spec(config)
    tied = config.get("tie_word_embeddings", False)
    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same tensor as token_embd
                name = gguf_tensor_name(hf_name)
                if name is None:
                    raise UnsupportedModel(f"tensor {hf_name} has no llama.cpp counterpart")
                shape = list(f.get_slice(hf_name).get_shape())
                heads = qk_heads(name, config) if arch.permute_qk else None
                yield name, shape, _tensor_type(name, shape, weight_type), _loader(file, hf_name, heads)
    if _rope_type(config) == "llama3":
        factors = _llama3_rope_factors(config)
        yield "rope_freqs.weight", list(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors


def _weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index names, else model.safetensors.

    Not a glob: Mistral repos also ship consolidated.safetensors, the same weights under other names.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (model_dir / "model.safetensors").is_file():
        raise UnsupportedModel(f"{model_dir} has no model.safetensors (or model.safetensors.index.json)")
    return [model_dir / "model.safetensors"]


def _loader(file: Path, hf_name: str, rope_heads: int | None) -> Callable[[], torch.Tensor]:
    """Reads one tensor as float32 (bf16 has no numpy dtype), Q/K rows reordered for llama.cpp."""

    def load() -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            data = f.get_tensor(hf_name).float()
        return permute_for_rope(data, rope_heads) if rope_heads else data

    return load


def _tensor_type(name: str, shape: list[int], weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Per-tensor type: norms and biases stay F32 (llama.cpp adds them in F32, and they are tiny)."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if weight_type == gguf.GGMLQuantizationType.Q4_0 and name == "output.weight":
        # the output projection is the most quantization-sensitive tensor; llama.cpp keeps it wider too
        weight_type = gguf.GGMLQuantizationType.Q8_0
    block_size, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block_size:  # rows must split into whole blocks
        return gguf.GGMLQuantizationType.F16
    return weight_type


def _nbytes(shape: list[int], ggml_type: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block_size * type_size


def _encode(data: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, ggml_type)


def quantize_with_llama_cpp(f16_path: Path, out_path: Path, outtype: str) -> Path:
    """Re-quantize an F16 GGUF with llama.cpp's quantizer (k-quants and their per-tensor mixes)."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[outtype])
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), ctypes.byref(params))
    if status != 0:
        raise LoraplexError(f"llama.cpp quantize to {outtype} failed (status {status})")
    return out_path
