"""Training conveniences: sample packing, early stopping keeping the best adapter, the CSV log,
and the one-line error when --workers lacks Ray Train's dependencies. Real Trainer, PEFT, NF4."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from loraplex.training.config import TrainConfig
from loraplex.training.data import PackedCollator, encode_example, load_jsonl, pack_examples
from loraplex.training.demo import tenant_data
from loraplex.training.errors import ConfigError
from loraplex.training.manifest import MANIFEST_NAME
from tests.conftest import run_cli

TRAIN, EVAL = tenant_data("acme-fiscal")


def _token_losses(model, batch: dict) -> torch.Tensor:
    """Summed next-token loss per row, labels -100 ignored."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()  # as in training: no KV cache
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    return loss.sum(-1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_keep_attention_within_each_example(embedded_base, attention):
    """On the pretrained embedded base, where context changes predictions (a random one barely cares)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    model = AutoModelForCausalLM.from_pretrained(
        str(embedded_base), dtype=torch.float32, attn_implementation=attention
    ).eval()
    examples = [encode_example(tokenizer, row, 128) for row in load_jsonl(TRAIN)[:12]]
    packed = pack_examples(examples, 128)
    assert len(packed) < len(examples) and all(len(r["input_ids"]) <= 128 for r in packed)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(e["input_ids"]) for e in examples)

    alone = sum(
        _token_losses(
            model, {"input_ids": torch.tensor([e["input_ids"]]), "labels": torch.tensor([e["labels"]])}
        ).item()
        for e in examples
    )
    together = _token_losses(model, PackedCollator(tokenizer.pad_token_id)(packed)).sum().item()
    assert together == pytest.approx(alone, rel=1e-4)

    # the same rows with positions running on: examples would see each other, and the loss moves
    leaky = PackedCollator(tokenizer.pad_token_id)(packed)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
    assert abs(_token_losses(model, leaky).sum().item() - alone) > 1e-2 * alone


def test_early_stopping_keeps_the_best_adapter_and_logs_a_csv(tiny_base, tmp_path):
    from loraplex.training.run import train

    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(TRAIN)[:24]))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in load_jsonl(EVAL)[:4]))
    out = tmp_path / "acme"
    # a learning rate far too high: eval loss soon stops improving, so the run stops early and
    # must hand back an earlier, better adapter than its last step
    manifest = train(
        TrainConfig(
            data=str(train_file),
            eval_data=str(eval_file),
            output=str(out),
            base_model=str(tiny_base),
            max_steps=30,
            eval_steps=1,
            early_stopping_patience=1,
            learning_rate=1.0,
            warmup_ratio=0.0,
            batch_size=4,
            max_seq_len=128,
            packing=True,
            eval_limit=1,
            gradient_checkpointing=False,
        )
    )
    selection = manifest["selection"]
    assert selection["stopped_early"] and manifest["steps"] < 30, selection
    assert selection["adapter_from"] == "best eval loss" and selection["best_step"] < manifest["steps"]
    assert selection["packing"]["rows"] < selection["packing"]["examples"] == 24
    # the written adapter is the best evaluation's: its eval loss is the best one seen
    assert manifest["metrics"]["eval_loss"] == pytest.approx(selection["best_eval_loss"], rel=1e-4)

    with (out / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    losses = [r for r in rows if r["loss"]]
    lrs = [float(r["learning_rate"]) for r in losses]
    assert lrs and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0  # cosine, no warmup: never rises
    # eval rows: before training (step 0), every eval_steps, then the final one on the best adapter
    during = [float(r["eval_loss"]) for r in rows[:-1] if r["eval_loss"] and int(r["step"]) > 0]
    assert min(during) == pytest.approx(selection["best_eval_loss"], rel=1e-4) and during[-1] > min(during)
    assert float(rows[-1]["eval_loss"]) == pytest.approx(selection["best_eval_loss"], rel=1e-4)
    assert json.loads((out / MANIFEST_NAME).read_text())["selection"] == selection


def test_keep_best_and_early_stopping_need_eval_data():
    with pytest.raises(ConfigError, match="need --eval-data"):
        TrainConfig(data=str(TRAIN), output="x", early_stopping_patience=2)
    with pytest.raises(ConfigError, match="need --eval-data"):
        TrainConfig(data=str(TRAIN), output="x", keep_best=True)


def test_workers_without_ray_train_dependencies_is_one_line(tmp_path):
    """pandas missing (as in an install without the distributed extra): one line naming the fix."""
    script = (
        "import sys; sys.modules['pandas'] = None\n"
        "from loraplex.training.run import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = run_cli("-c", script, "--data", str(TRAIN), "--output", str(tmp_path / "dp"), "--workers", "2", timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert (
        lines[-1] == "error: --workers 2 needs Ray Train, which is missing pandas: pip install 'loraplex[distributed]'"
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dp").exists()
