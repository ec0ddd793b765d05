"""The foundation bar on the demo tenants, with plain PEFT and greedy decoding.

- each committed demo adapter on the NF4 base: >= 90% exact match on its held-out set;
- the base alone: <= 10%;
- the same adapter on the unquantized bf16 base: within 5 points of its NF4 result;
- retraining one tenant from scratch with the default recipe reaches the bar again.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from loraplex.training.data import load_jsonl
from loraplex.training.demo import demo_adapter_dir, demo_tenants, tenant_data
from loraplex.training.evaluate import exact_match

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(embedded_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_base))


@pytest.fixture(scope="module")
def nf4_base(embedded_base):
    from loraplex.training.quant import load_nf4_base

    return load_nf4_base(embedded_base)


@pytest.fixture(scope="module")
def bf16_base(embedded_base):
    from loraplex.training.quant import load_dense_base

    return load_dense_base(embedded_base, torch.bfloat16)


@pytest.mark.parametrize("tenant", demo_tenants())
def test_demo_adapter_meets_the_bar_on_nf4_and_bf16(tenant, nf4_base, bf16_base, tokenizer):
    from peft import PeftModel

    rows = load_jsonl(tenant_data(tenant)[1])
    base_score, _ = exact_match(nf4_base, tokenizer, rows)
    nf4_model = PeftModel.from_pretrained(nf4_base, str(demo_adapter_dir(tenant)))
    nf4_score, _ = exact_match(nf4_model, tokenizer, rows)
    nf4_model.unload()
    bf16_model = PeftModel.from_pretrained(bf16_base, str(demo_adapter_dir(tenant)))
    bf16_score, _ = exact_match(bf16_model, tokenizer, rows)
    bf16_model.unload()
    print(f"{tenant}: base {base_score:.2f}  adapter/nf4 {nf4_score:.2f}  adapter/bf16 {bf16_score:.2f}")
    assert base_score <= 0.10
    assert nf4_score >= 0.90
    assert abs(bf16_score - nf4_score) <= 0.05


def test_retraining_a_tenant_from_scratch_reaches_the_bar(tmp_path):
    from tests.conftest import run_cli

    tenant = "globex-routing"
    train_path, eval_path = tenant_data(tenant)
    started = time.time()
    proc = run_cli(
        "training/run.py",
        "--data",
        str(train_path),
        "--eval-data",
        str(eval_path),
        "--output",
        str(tmp_path / tenant),
        timeout=900,
    )
    elapsed = time.time() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / tenant / "loraplex.json").read_text())
    print(f"{tenant}: trained in {elapsed:.0f}s, eval exact match {manifest['metrics']['eval_exact_match']:.2f}")
    assert manifest["metrics"]["eval_exact_match"] >= 0.90
