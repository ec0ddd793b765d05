"""Merge a PEFT LoRA adapter into a dense (FP16/BF16) copy of the base, never into 4-bit weights.

Merging into NF4 and quantizing again rounds twice. We reload the base dense and merge there.
`nf4-dequant` is the other honest target: the dequantized NF4 weights are exactly the function
the adapter was trained against (QLoRA), so it can fit the adapter better than the original
FP16 weights; the verify report says which target wins for a given adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.training import lora_format
from loraplex.training.errors import BaseMismatch, DataError, LoraplexError
from loraplex.training.lora_format import LoraFormatError, LoraModule
from loraplex.training.manifest import MANIFEST_NAME, base_fingerprint, check_same_base, read_manifest

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MERGE_TARGETS = ("fp16", "nf4-dequant")


class MergeCheckFailed(LoraplexError):
    """A merged weight is not base + scaling * B @ A."""


def check_adapter_matches_base(
    base_dir: Path,
    adapter_dir: Path,
    force: bool = False,
    progress: Callable[[str], None] = print,
    fingerprint: str | None = None,
) -> None:
    """The adapter's manifest must name this base; `force` turns a mismatch into a warning.

    fingerprint: the base's, when the caller has it already (hashing reads every weight file)."""
    if not (adapter_dir / lora_format.CONFIG_NAME).is_file():
        raise DataError(f"not a PEFT adapter folder (no {lora_format.CONFIG_NAME}): {adapter_dir}")
    if not (adapter_dir / MANIFEST_NAME).is_file():
        progress(f"warning: {adapter_dir} has no {MANIFEST_NAME}; its base cannot be checked")
        return
    try:
        check_same_base(
            fingerprint or base_fingerprint(base_dir),
            read_manifest(adapter_dir)["base_fingerprint"],
            f"adapter {adapter_dir}",
        )
    except BaseMismatch as exc:
        if not force:
            raise BaseMismatch(f"{exc} (--force merges anyway)") from None
        progress(f"warning: {exc}; merging anyway (--force)")


def load_merge_base(base_dir: Path, dtype: torch.dtype, merge_into: str):
    """The dense base to merge into: its FP16/BF16 weights, or its NF4 weights dequantized."""
    from loraplex.training.quant import load_dense_base

    if merge_into not in MERGE_TARGETS:
        raise DataError(f"unknown merge target {merge_into!r}: use one of {', '.join(MERGE_TARGETS)}")
    model = load_dense_base(base_dir, dtype, "cpu")
    if merge_into == "nf4-dequant":
        _replace_with_dequantized_nf4(model, base_dir)
    return model


@torch.no_grad()
def _replace_with_dequantized_nf4(model, base_dir: Path) -> None:
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit

    from loraplex.training.quant import load_nf4_base

    nf4 = load_nf4_base(base_dir, "cpu")
    dense = dict(model.named_modules())
    for name, module in nf4.named_modules():
        if isinstance(module, Linear4bit):
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = dense[name].weight
            target.copy_(weight.to(target.dtype).view_as(target))


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    dtype: str = "fp16",
    merge_into: str = "fp16",
    progress: Callable[[str], None] = print,
):
    """PEFT merge_and_unload on the dense base, then prove each merged weight is W + s*B@A.

    The adapter is read and checked against the base's shapes (lora_format) before the base loads;
    s comes from lora_format too, so the merge is checked against the scaling serving applies."""
    from peft import PeftModel

    _, modules = lora_format.read_adapter(adapter_dir)
    try:
        lora_format.check_fits(modules, lora_format.base_linear_shapes(base_dir), max_rank=None)
    except LoraFormatError as exc:
        raise DataError(f"adapter {adapter_dir} does not fit base {base_dir}: {exc}") from None
    model = load_merge_base(base_dir, DTYPES[dtype], merge_into)
    progress(f"merge: loading adapter {adapter_dir}")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape or module mismatch: another architecture
        raise DataError(f"adapter {adapter_dir} does not fit base {base_dir}: {str(exc).splitlines()[0]}") from None
    expected = _expected_merged_weights(peft_model, modules)
    merged = peft_model.merge_and_unload()
    check_merged_weights(merged, expected)
    progress(f"merge: {len(expected)} layers merged into {merge_into} weights ({dtype}), each checked = W + s*B@A")
    return merged


@torch.no_grad()
def _expected_merged_weights(peft_model, modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """W + scaling * B @ A in fp32 for every adapted linear, computed before PEFT merges."""
    layers = dict(peft_model.named_modules())
    expected = {}
    for name, lora in modules.items():
        layer = layers.get(f"base_model.model.{name}")
        if layer is None or not hasattr(layer, "base_layer"):
            raise DataError(f"PEFT did not adapt {name}, which the adapter's weights target")
        expected[name] = layer.base_layer.weight.float() + lora.scaling * (lora.b.float() @ lora.a.float())
    if not expected:
        raise DataError("the adapter targets no layer of this base")
    return expected


@torch.no_grad()
def check_merged_weights(merged, expected: dict[str, torch.Tensor]) -> None:
    """Every merged weight equals its fp32 expectation up to one rounding to the model dtype."""
    modules = dict(merged.named_modules())
    for name, want in expected.items():
        got = modules[name].weight
        eps = torch.finfo(got.dtype).eps
        tolerance = eps * want.abs().max().item() + eps  # one rounding step at the largest magnitude
        error = (got.float() - want).abs().max().item()
        if error > tolerance:
            raise MergeCheckFailed(
                f"{name}: merged weight differs from W + s*B@A by {error:.3g} (tolerance {tolerance:.3g})"
            )


def save_hf(model, tokenizer, out_dir: Path, provenance: dict) -> Path:
    """safetensors + config + tokenizer, and where the weights came from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "loraplex_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir
