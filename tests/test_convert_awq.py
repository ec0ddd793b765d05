"""AWQ export with real llm-compressor on CPU, loaded back by plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.training.data import load_jsonl
from loraplex.training.demo import tenant_data
from loraplex.training.errors import ConfigError

pytest.importorskip("llmcompressor", reason="llm-compressor is part of the dev setup (make test)")
from loraplex.convert.awq_export import export_awq, load_awq_for_check  # noqa: E402

ROWS = load_jsonl(tenant_data("acme-fiscal")[0])


@pytest.fixture(scope="module")
def awq_dir(embedded_base, tmp_path_factory):
    texts = [r["prompt"] + r["completion"] for r in ROWS[:32]]
    return export_awq(embedded_base, tmp_path_factory.mktemp("awq") / "out", texts, progress=lambda _: None)


@pytest.mark.slow  # the AWQ calibration and export take minutes on 2 cores
def test_awq_export_is_compressed_tensors_int4_and_loads_in_transformers(embedded_base, awq_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = next(iter(quant["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (4, 128)
    model = load_awq_for_check(awq_dir, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(embedded_base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(awq_dir))
    agree = total = 0
    changed = False
    for row in ROWS[100:120]:
        ids = torch.tensor([tokenizer(row["prompt"] + row["completion"])["input_ids"]])
        with torch.no_grad():
            ours, ref = model(ids).logits[0], reference(ids).logits[0]
        agree += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        total += ids.shape[1]
        changed |= not torch.allclose(ours, ref)
    assert changed  # really quantized
    assert agree / total >= 0.85, agree / total


@pytest.mark.parametrize("bits, group_size, message", [(3, 128, "bits=3"), (4, 100, "group size must be one of")])
def test_unsupported_awq_schemes_are_refused(embedded_base, tmp_path, bits, group_size, message):
    with pytest.raises(ConfigError, match=message):
        export_awq(embedded_base, tmp_path / "x", ["hello"], bits=bits, group_size=group_size)


def test_llmcompressor_patch_target_is_unchanged():
    """The CPU pinning patch was read against this exact method: a change must be re-checked."""
    from loraplex.convert import llmcompressor_compat as compat

    compat.check_llmcompressor()
    assert compat.pin_memory_source_sha256() == compat.PIN_MEMORY_SOURCE_SHA256, (
        "llmcompressor's IntermediatesCache.pin_memory changed: re-check convert/llmcompressor_compat.py"
    )


def test_pinning_swap_is_scoped_and_restored():
    import torch

    from loraplex.convert import llmcompressor_compat as compat

    cache = compat.pin_memory_target()
    original = cache.__dict__["pin_memory"]
    with compat.no_pinning_without_accelerator():
        if not torch.accelerator.is_available():
            assert cache.__dict__["pin_memory"] is not original
    assert cache.__dict__["pin_memory"] is original


def test_missing_llmcompressor_names_the_extra_that_brings_it(monkeypatch):
    """Following the message must fix the error: the named extra really installs llm-compressor."""
    import re
    import sys
    import tomllib
    from pathlib import Path

    from loraplex.convert import awq_export
    from loraplex.training.errors import LoraplexError

    monkeypatch.setitem(sys.modules, "llmcompressor.modifiers.transform.awq", None)  # as if not installed
    with pytest.raises(LoraplexError, match=r"loraplex\[(\w+)\]") as info:
        awq_export._awq_recipe(4, 128)
    extra = re.search(r"loraplex\[(\w+)\]", str(info.value)).group(1)
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("llmcompressor") for dep in extras[extra])
