"""Merge at FP16: merged weights are exactly base + s*B@A, and bad adapters are refused clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loraplex.convert.merge import check_adapter_matches_base, merge_adapter
from loraplex.training.errors import BaseMismatch, DataError
from loraplex.training.random_adapter import make_random_adapter
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def random_adapter(embedded_base, tmp_path_factory):
    return make_random_adapter(
        embedded_base, tmp_path_factory.mktemp("adapters") / "rand", seed=3, rank=8, alpha=16, std=0.05
    )


def test_merged_weight_is_base_plus_scaled_b_times_a(embedded_base, random_adapter):
    merged = merge_adapter(embedded_base, random_adapter, "fp16", progress=lambda _: None)
    base = load_file(str(embedded_base / "model.safetensors"))
    lora = load_file(str(random_adapter / "adapter_model.safetensors"))
    scaling = 16 / 8
    modules = dict(merged.named_modules())
    checked = 0
    for key, a in lora.items():
        if "lora_A" not in key:
            continue
        b = lora[key.replace("lora_A", "lora_B")]
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        want = base[f"{module}.weight"].float() + scaling * b.float() @ a.float()
        got = modules[module].weight
        assert got.dtype == torch.float16
        assert torch.allclose(got.float(), want, atol=2e-3, rtol=1e-3), module
        checked += 1
    assert checked == 6 * 7  # every linear of every decoder layer


def test_nf4_dequant_merge_target_differs_from_fp16(embedded_base, random_adapter):
    fp16 = merge_adapter(embedded_base, random_adapter, "fp16", progress=lambda _: None)
    nf4 = merge_adapter(embedded_base, random_adapter, "fp16", merge_into="nf4-dequant", progress=lambda _: None)
    w16 = fp16.model.layers[0].mlp.down_proj.weight.float()
    w4 = nf4.model.layers[0].mlp.down_proj.weight.float()
    relative = ((w16 - w4).norm() / w16.norm()).item()
    assert 0.01 < relative < 0.2, relative  # NF4 rounding (4 bits per weight), not another model
    assert torch.equal(fp16.model.embed_tokens.weight, nf4.model.embed_tokens.weight)  # not quantized


def test_adapter_for_another_base_is_refused_unless_forced(embedded_base, random_adapter, tmp_path):
    other = shutil.copytree(random_adapter, tmp_path / "other")
    manifest = json.loads((other / "loraplex.json").read_text())
    manifest["base_fingerprint"] = "sha256:" + "0" * 64
    (other / "loraplex.json").write_text(json.dumps(manifest))
    with pytest.raises(BaseMismatch, match="--force"):
        check_adapter_matches_base(embedded_base, other)
    warnings = []
    check_adapter_matches_base(embedded_base, other, force=True, progress=warnings.append)
    assert warnings and "merging anyway" in warnings[0]


def test_adapter_of_another_architecture_is_a_clear_error(embedded_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=2048,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    adapter = make_random_adapter(tmp_path / "small", tmp_path / "small-adapter", seed=1, rank=4)
    with pytest.raises(DataError, match="does not fit base"):
        merge_adapter(embedded_base, adapter, "fp16", progress=lambda _: None)


def test_cli_bad_inputs_get_one_line_errors(embedded_base, tmp_path):
    missing = run_cli(
        "-m",
        "convert",
        "merge-export",
        "--base",
        str(embedded_base),
        "--adapter",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o.gguf"),
        "--format",
        "gguf",
    )
    assert missing.returncode == 2 and "adapter not found" in missing.stderr
    quant = run_cli(
        "-m",
        "convert",
        "merge-export",
        "--base",
        str(embedded_base),
        "--out",
        str(tmp_path / "o.gguf"),
        "--format",
        "gguf",
        "--quant",
        "Q3_K_XS",
    )
    assert quant.returncode == 2 and "invalid choice: 'Q3_K_XS'" in quant.stderr
    awq = run_cli(
        "-m", "convert", "merge-export", "--base", str(embedded_base), "--out", str(tmp_path / "awq"), "--format", "awq"
    )
    assert awq.returncode == 2 and "--calib-data" in awq.stderr
    assert "Traceback" not in missing.stderr + quant.stderr + awq.stderr
