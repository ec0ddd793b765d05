"""The convert bar on the demo tenants, through the `convert` CLI as a user runs it.

Each export writes its verify report; the bar is read from those reports: exact match in
llama.cpp with llama.cpp's own tokenizer, top-1 agreement with the HF merge, the GGUF LoRA
against the merged GGUF, and the AWQ export loaded by transformers on CPU.
"""

from __future__ import annotations

import json

import pytest

from loraplex.training.demo import demo_tenants
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")
BASE = str(REPO / "training" / "base_model")


def export(tmp_path, tenant: str, fmt: str, out_name: str, *extra: str) -> dict:
    out = tmp_path / out_name
    eval_data = str(REPO / "training" / "data" / tenant / "eval.jsonl")
    command = "adapter-export" if fmt == "gguf-lora" else "merge-export"
    done = run_cli(
        "-m",
        "convert",
        command,
        "--base",
        BASE,
        "--adapter",
        str(REPO / "training" / "adapters" / tenant),
        "--out",
        str(out),
        "--format",
        fmt,
        "--eval-data",
        eval_data,
        *extra,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.with_suffix(".verify.json") if out.suffix else out / "export.verify.json"
    return json.loads(report.read_text())


@pytest.mark.parametrize("tenant", demo_tenants())
def test_demo_tenant_exports_reach_the_bar(tmp_path, tenant):
    results = {}
    hf = export(tmp_path, tenant, "hf", "merged")
    merged_em = hf["comparisons"][0]["reference_exact_match"]
    assert abs(merged_em - hf["adapter_on_bf16_base_exact_match"]) <= 0.02, hf
    results["merged fp16"] = merged_em
    for quant, floor in (("F16", 0.90), ("Q8_0", 0.90), ("Q4_K_M", 0.80)):
        report = export(tmp_path, tenant, "gguf", f"{quant}.gguf", "--quant", quant)
        comparison = report["comparisons"][0]
        assert comparison["exact_match"] >= floor, (quant, comparison)
        if quant == "F16":
            assert comparison["top1_agreement"] >= 0.99, comparison
        results[f"gguf {quant}"] = comparison["exact_match"]
    lora = export(tmp_path, tenant, "gguf-lora", "adapter.gguf")
    assert abs(lora["lora_vs_merged_exact_match_points"]) <= 2, lora
    results["gguf base F16 + gguf LoRA"] = lora["comparisons"][0]["exact_match"]
    awq = export(
        tmp_path,
        tenant,
        "awq",
        "awq",
        "--calib-data",
        str(REPO / "training" / "data" / tenant / "train.jsonl"),
        "--calib-rows",
        "128",
    )
    assert awq["comparisons"][0]["exact_match"] >= 0.80, awq
    results["awq w4 g128"] = awq["comparisons"][0]["exact_match"]
    print(f"\n{tenant}: " + ", ".join(f"{k} {v:.0%}" for k, v in results.items()))
