"""QLoRA training on real bitsandbytes + PEFT + Trainer, on a tiny base made in the fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraplex.training.config import TrainConfig
from loraplex.training.data import load_jsonl
from loraplex.training.demo import tenant_data
from loraplex.training.manifest import MANIFEST_NAME, base_fingerprint

TRAIN, EVAL = (str(p) for p in tenant_data("acme-fiscal"))


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> Path:
    from loraplex.training.run import train

    out = tmp_path_factory.mktemp("adapters") / "acme"
    train(
        TrainConfig(
            data=TRAIN,
            eval_data=EVAL,
            output=str(out),
            base_model=str(tiny_base),
            max_steps=40,
            eval_steps=20,
            eval_limit=8,
            keep_checkpoints=True,
            learning_rate=3e-3,
        )
    )
    return out


def test_short_training_run_lowers_eval_loss(trained):
    metrics = json.loads((trained / MANIFEST_NAME).read_text())["metrics"]
    assert metrics["eval_loss"] < 0.7 * metrics["eval_loss_before"], metrics
    assert metrics["train_loss"] > 0


def test_manifest_records_base_config_data_and_results(trained, tiny_base):
    manifest = json.loads((trained / MANIFEST_NAME).read_text())
    assert manifest["base_fingerprint"] == base_fingerprint(tiny_base)
    assert manifest["adapter_id"] == "acme"
    assert manifest["lora"]["r"] == 32 and manifest["lora"]["alpha"] == 64  # the default recipe (README seed sweep)
    assert manifest["machine"]["cpu"] and manifest["machine"]["versions"]["bitsandbytes"]  # why two runs differ
    assert set(manifest["lora"]["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert manifest["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert manifest["quantization"]["bnb_4bit_use_double_quant"] is True
    assert manifest["optimizer"]["name"] == "paged_adamw_32bit"
    assert manifest["data"]["train"]["rows"] == len(load_jsonl(TRAIN))
    assert manifest["data"]["train"]["sha256"].startswith("sha256:")
    assert manifest["steps"] == 40
    assert 0.0 <= manifest["metrics"]["eval_exact_match"] <= 1.0
    assert manifest["wall_time_s"] > 0 and manifest["peak_memory_bytes"] > 0


def test_output_loads_in_plain_peft_without_project_code(trained, tiny_base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), quantization_config=quant, device_map={"": "cpu"})
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        plain = base(ids).logits
        model = PeftModel.from_pretrained(base, str(trained))
        adapted = model(ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-3)
    saved = load_file(str(trained / "adapter_model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert not list(trained.glob("*.bin")) and not list(trained.glob("*.pt"))


def test_adapter_forward_and_backward_on_nf4(tiny_base):
    import bitsandbytes as bnb

    from loraplex.training.run import build_qlora_model

    model = build_qlora_model(tiny_base, TrainConfig(data=TRAIN, output="unused"))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    ids = torch.randint(3, 1000, (2, 12), device=model.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # B starts at zero, so the first gradient reaches B (A's follows once B moves)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert q_proj.base_layer.weight.grad is None


def test_resume_continues_from_the_latest_checkpoint(trained, tiny_base, tmp_path):
    import shutil

    from loraplex.training.run import train

    out = tmp_path / "acme"
    shutil.copytree(trained, out)
    manifest = train(
        TrainConfig(
            data=TRAIN,
            eval_data=EVAL,
            output=str(out),
            base_model=str(tiny_base),
            max_steps=50,
            eval_steps=20,
            eval_limit=4,
            resume="latest",
            learning_rate=3e-3,
        )
    )
    assert manifest["steps"] == 50
    assert not (out / "checkpoints").exists()  # pickled optimizer state is gone after success


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: paged optimizers only page on CUDA")
def test_cuda_training_pages_optimizer_state(tiny_base, tmp_path):
    """On a GPU the recipe's paged_adamw_32bit is bitsandbytes' paged optimizer with CUDA state.

    (bitsandbytes pages a state tensor only from 1e5 elements.)"""
    from loraplex.training.run import train

    # rank 512: each LoRA A is 512x256 = 131k elements, large enough for bitsandbytes to page
    manifest = train(
        TrainConfig(
            data=TRAIN,
            output=str(tmp_path / "gpu"),
            base_model=str(tiny_base),
            max_steps=5,
            eval_steps=5,
            lora_r=512,
            lora_alpha=1024,
        )
    )
    optimizer = manifest["optimizer"]
    assert optimizer["class"].startswith("bitsandbytes.optim"), optimizer
    assert optimizer["paged"] and optimizer["state_device"] == "cuda", optimizer
    assert optimizer["paged_state_tensors"] > 0, optimizer
    assert manifest["device"] == "cuda"


def test_manifest_records_which_optimizer_ran(trained):
    optimizer = json.loads((trained / MANIFEST_NAME).read_text())["optimizer"]
    assert optimizer["class"].startswith("bitsandbytes.optim") and optimizer["name"] == "paged_adamw_32bit"
    assert optimizer["paged"]
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert optimizer["state_device"] == expected_device


def test_compute_dtype_follows_the_hardware_and_the_override(tiny_base, monkeypatch):
    """bf16 only where the hardware multiplies it (emulated bf16 made CPU training 8x slower on
    an AVX2 EPYC); LORAPLEX_COMPUTE_DTYPE picks one, and a wrong value names the right ones."""
    import bitsandbytes as bnb

    from loraplex.training.errors import ConfigError
    from loraplex.training.quant import COMPUTE_DTYPE_ENV, compute_dtype, load_nf4_base, nf4_settings

    monkeypatch.delenv(COMPUTE_DTYPE_ENV, raising=False)
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    for name in ("float32", "bfloat16"):
        monkeypatch.setenv(COMPUTE_DTYPE_ENV, name)
        model = load_nf4_base(tiny_base, "cpu")
        linear = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        assert linear.compute_dtype == getattr(torch, name) == model.model.embed_tokens.weight.dtype
        assert nf4_settings("cpu")["bnb_4bit_compute_dtype"] == name
    monkeypatch.setenv(COMPUTE_DTYPE_ENV, "fp16")
    with pytest.raises(ConfigError, match="bfloat16, float32"):
        compute_dtype("cpu")
