"""Every bad input to `python training/run.py` gets one clear line and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from loraplex.training.demo import tenant_data
from tests.conftest import run_cli

TRAIN, EVAL = (str(p) for p in tenant_data("acme-fiscal"))


def assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or "usage:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_missing_data_file(tmp_path):
    proc = run_cli("training/run.py", "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"))
    assert_clean_error(proc, "data file not found", "nope.jsonl")


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    proc = run_cli("training/run.py", "--data", str(bad), "--output", str(tmp_path / "o"))
    assert_clean_error(proc, "bad.jsonl:3", "malformed JSON")


def test_row_without_completion_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    proc = run_cli("training/run.py", "--data", str(bad), "--output", str(tmp_path / "o"))
    assert_clean_error(proc, "bad.jsonl:1", "completion")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = run_cli("training/run.py", "--data", str(empty), "--output", str(tmp_path / "o"))
    assert_clean_error(proc, "dataset is empty")


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "has space"])
def test_unsafe_adapter_id(tmp_path, bad_id):
    proc = run_cli("training/run.py", "--data", TRAIN, "--output", str(tmp_path / "o"), "--adapter-id", bad_id)
    assert_clean_error(proc, "not a safe name" if bad_id != "../escape" else "..")


def test_unknown_yaml_option_and_bad_value(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {TRAIN}\noutput: {tmp_path / 'o'}\nlora_rank: 8\n")
    assert_clean_error(run_cli("training/run.py", "--config", str(recipe)), "unknown option", "lora_rank")
    recipe.write_text(f"data: {TRAIN}\noutput: {tmp_path / 'o'}\nlora_r: -1\n")
    assert_clean_error(run_cli("training/run.py", "--config", str(recipe)), "lora_r must be positive")


def test_missing_required_flag():
    assert_clean_error(run_cli("training/run.py", "--data", TRAIN), "--output")


def test_resume_against_another_base_is_refused(tmp_path, tiny_base, embedded_base):
    from loraplex.training.manifest import base_fingerprint
    from loraplex.training.run import RUN_STATE

    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_STATE).write_text(json.dumps({"base_fingerprint": base_fingerprint(tiny_base)}))
    proc = run_cli(
        "training/run.py",
        "--data",
        TRAIN,
        "--output",
        str(out),
        "--resume",
        "latest",
        "--base-model",
        str(embedded_base),
    )
    assert_clean_error(proc, "made against base")


def test_base_model_that_is_not_a_checkpoint(tmp_path):
    proc = run_cli("training/run.py", "--data", TRAIN, "--output", str(tmp_path / "o"), "--base-model", str(tmp_path))
    assert_clean_error(proc, "not a Hugging Face checkpoint")


def test_every_command_help_prints():
    """argparse formats help text with %: a literal % in a field's help must not break --help."""
    for args in (
        ["training/run.py", "--help"],
        ["-m", "loraplex.cli", "serve", "--help"],
        ["-m", "loraplex.convert", "merge-export", "--help"],
    ):
        done = run_cli(*args)
        assert done.returncode == 0 and "usage:" in done.stdout, (args, done.stderr[-500:])
