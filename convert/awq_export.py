"""AWQ export: a merged FP16/BF16 checkpoint to 4-bit activation-aware weights that vLLM loads.

llm-compressor runs AWQ (per-channel scales searched on calibration activations, folded into the
preceding norm/linear) and then round-to-nearest group quantization; the result is saved in
compressed-tensors `pack-quantized` format (int4 packed into int32, one scale per group), which
vLLM serves with its Marlin/Machete WNA16 kernels and transformers loads on CPU for checking.

llm-compressor 0.13/0.14 crash on a machine without an accelerator: AWQ pins its cached
activations before each smoothing search (see convert/llmcompressor_compat.py). See
convert/AWQ_NOTES.md for versions and how the export was verified.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.convert.llmcompressor_compat import no_pinning_without_accelerator
from loraplex.training.errors import ConfigError, LoraplexError

SUPPORTED_BITS = (4,)
# Group sizes vLLM's WNA16 kernels (Marlin, Machete) accept; each quantized layer's input
# dimension must be a multiple of it, since every group of `group_size` inputs shares one scale.
SUPPORTED_GROUP_SIZES = (32, 64, 128)
MAX_CALIB_TOKENS = 512


def export_awq(
    model_dir: Path,
    out_dir: Path,
    calib_texts: list[str],
    bits: int = 4,
    group_size: int = 128,
    progress: Callable[[str], None] = print,
) -> Path:
    """Quantize every linear layer but `lm_head` to `bits`-bit AWQ and write `out_dir`.

    `calib_texts` are full examples (prompt + completion, as the model will see them); AWQ uses
    their activations to decide which input channels to protect. Returns `out_dir`.
    """
    _check_scheme(bits, group_size)
    if not calib_texts:
        raise ConfigError("AWQ needs calibration texts (a few hundred rows is typical)")
    recipe = _awq_recipe(bits, group_size)  # fails early, with an install hint, without the extra
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _check_divisible(model, group_size)
    calibration = _tokenize(tokenizer, calib_texts)
    progress(f"AWQ: {len(calib_texts)} calibration rows, int{bits}, group size {group_size}")
    with no_pinning_without_accelerator():
        oneshot(
            model=model,
            dataset=calibration,
            recipe=recipe,
            num_calibration_samples=len(calib_texts),
            max_seq_length=MAX_CALIB_TOKENS,
            shuffle_calibration_samples=False,
        )

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    progress(f"AWQ: wrote {out_dir}")
    return out_dir


def load_awq_for_check(out_dir: Path, dtype: torch.dtype = torch.bfloat16):
    """Load an exported AWQ checkpoint with plain transformers on CPU, weights dequantized.

    Dequantized weights hold exactly the int4 grid values times their scales, so outputs match
    what a packed kernel computes up to float rounding. bfloat16 and float32 both run on CPU.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        out_dir,
        dtype=dtype,
        device_map="cpu",
        quantization_config=CompressedTensorsConfig(dequantize=True),
    ).eval()


def _check_scheme(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        supported = "/".join(map(str, SUPPORTED_BITS))
        raise ConfigError(f"AWQ export writes {supported}-bit weights, got bits={bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(
            f"AWQ group size must be one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))} "
            f"(what vLLM's int4 kernels accept), got {group_size}"
        )


def _check_divisible(model: torch.nn.Module, group_size: int) -> None:
    """Every quantized layer's input dimension must split into whole groups."""
    bad = [
        f"{name} (in_features={module.in_features})"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and module.in_features % group_size
    ]
    if bad:
        raise ConfigError(f"group size {group_size} does not divide the input dimension of: {', '.join(bad[:3])}")


def _tokenize(tokenizer, texts: list[str]):
    """Calibration rows tokenized per the prompt contract: the tokenizer adds its own BOS."""
    from datasets import Dataset

    encoded = tokenizer(texts, truncation=True, max_length=MAX_CALIB_TOKENS)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def _awq_recipe(bits: int, group_size: int) -> list:
    """AWQ scale search, then symmetric int group quantization of every Linear but lm_head.

    Symmetric int weights with one scale per group and 16-bit activations is compressed-tensors'
    W4A16 scheme, saved as pack-quantized: the format vLLM's WNA16 kernels read.
    """
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except ImportError as exc:
        raise LoraplexError(
            f"AWQ export needs llm-compressor ({exc.name} is missing): "
            "pip install -c constraints/cpu.txt 'loraplex[awq]'"
        ) from None
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # AWQModifier only searches and folds the scales; QuantizationModifier then rounds the weights.
    return [
        AWQModifier(),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
