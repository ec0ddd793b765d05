"""Data-parallel QLoRA on a real Ray Train cluster (2 CPU workers, gloo), through the CLI."""

from __future__ import annotations

import json

import pytest

from loraplex.training.demo import demo_adapter_dir, tenant_data
from loraplex.training.manifest import MANIFEST_NAME
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("ray.train", reason="Ray Train is part of the dev setup (make test)")


def test_two_workers_match_single_worker_exact_match(tmp_path):
    train, evaluation = tenant_data("globex-routing")
    out = tmp_path / "globex-dp2"
    # the committed adapter is the 1-worker run compared against: train with its recipe
    lora = json.loads((demo_adapter_dir("globex-routing") / MANIFEST_NAME).read_text())["lora"]
    done = run_cli(
        str(REPO / "training" / "run.py"),
        "--data",
        str(train),
        "--eval-data",
        str(evaluation),
        "--output",
        str(out),
        "--workers",
        "2",
        "--lora-r",
        str(lora["r"]),
        "--lora-alpha",
        str(lora["alpha"]),
        "--lora-dropout",
        str(lora["dropout"]),
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    single = json.loads((demo_adapter_dir("globex-routing") / MANIFEST_NAME).read_text())  # same recipe, 1 worker
    assert manifest["world_size"] == 2 and manifest["config"]["workers"] == 2
    metrics = manifest["metrics"]
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_before"], metrics
    assert abs(metrics["eval_exact_match"] - single["metrics"]["eval_exact_match"]) <= 0.05, (
        metrics,
        single["metrics"],
    )
    print(
        f"\n2 workers: exact match {metrics['eval_exact_match']:.0%} in {manifest['wall_time_s']} s "
        f"(1 worker: {single['metrics']['eval_exact_match']:.0%} in {single['wall_time_s']} s)"
    )

    from peft import PeftModel

    from loraplex.training.quant import load_dense_base

    PeftModel.from_pretrained(load_dense_base(REPO / "training" / "base_model", device="cpu"), str(out))
