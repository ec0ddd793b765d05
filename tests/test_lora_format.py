"""The one LoRA-format parser, against adapters saved by real PEFT (get_peft_model + save_pretrained).

Every module's rank and scaling must equal what PEFT itself built (rank_pattern, alpha_pattern,
rsLoRA, q/v subsets), and each unsupported feature is refused with a message naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.training import lora_format
from loraplex.training.lora_format import LoraFormatError


def save_peft_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs) -> tuple[Path, object]:
    """A PEFT adapter made with peft alone (random non-zero B), and the PEFT model that made it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out, peft_model


def peft_layers(peft_model) -> dict[str, object]:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


PATTERNS = {
    "plain": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "qv-rslora-alpha-pattern": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True, alpha_pattern={"v_proj": 48}
    ),
    "rank-and-alpha-pattern": dict(
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 4, "down_proj": 16},
        alpha_pattern={"k_proj": 32},
    ),
}


@pytest.mark.parametrize("kind", PATTERNS)
def test_rank_and_scaling_per_module_equal_peft_s_own(embedded_base, tmp_path, kind):
    folder, peft_model = save_peft_adapter(embedded_base, tmp_path / kind, **PATTERNS[kind])
    spec, modules = lora_format.read_adapter(folder)
    layers = peft_layers(peft_model)
    assert set(modules) == set(layers)
    for name, lora in modules.items():
        layer = layers[name]
        assert lora.rank == layer.r["default"], name
        assert lora.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), name
        assert torch.equal(lora.a, layer.lora_A["default"].weight.detach())
        assert torch.equal(lora.b, layer.lora_B["default"].weight.detach())
    lora_format.check_fits(modules, lora_format.base_linear_shapes(embedded_base), max_rank=64)
    assert spec.has_patterns == (kind != "plain")


def test_q_v_subset_adapts_only_q_and_v(embedded_base, tmp_path):
    folder, _ = save_peft_adapter(embedded_base, tmp_path / "qv", **PATTERNS["qv-rslora-alpha-pattern"])
    spec, modules = lora_format.read_adapter(folder)
    assert {name.rpartition(".")[2] for name in modules} == {"q_proj", "v_proj"}
    assert spec.use_rslora and spec.scaling("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8**0.5)
    assert spec.scaling("model.layers.0.self_attn.v_proj") == pytest.approx(48 / 8**0.5)


REFUSED = {
    "dora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), "DoRA"),
    "lm_head": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), "lm_head"),
    "embedding": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    "modules_to_save": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
    "bias": (dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only"), "bias"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_unsupported_features_are_refused_by_name(embedded_base, tmp_path, kind):
    kwargs, feature = REFUSED[kind]
    folder, _ = save_peft_adapter(embedded_base, tmp_path / kind, **kwargs)
    with pytest.raises(LoraFormatError, match=feature):
        lora_format.read_adapter(folder)


def test_embedding_lora_is_refused_from_its_tensors_too(embedded_base, tmp_path):
    """A config that names no embedding (a regex target) is still caught by its tensor keys."""
    folder, _ = save_peft_adapter(
        embedded_base, tmp_path / "regex", r=4, lora_alpha=8, target_modules=r".*(embed_tokens|q_proj)"
    )
    with pytest.raises(LoraFormatError, match="embedding"):
        lora_format.read_adapter(folder)


def test_pickle_weights_are_refused(embedded_base, tmp_path):
    folder, peft_model = save_peft_adapter(embedded_base, tmp_path / "st", r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    with pytest.raises(LoraFormatError, match="pickle files \\(adapter_model.bin\\).*safe_serialization=True"):
        lora_format.read_adapter(tmp_path / "bin")


def test_nan_wrong_shape_unknown_module_and_rank_limit(embedded_base, tmp_path):
    folder, _ = save_peft_adapter(embedded_base, tmp_path / "ok", r=4, lora_alpha=8, target_modules=["q_proj"])
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def variant(name: str, changed: dict) -> Path:
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
        save_file(changed, out / "adapter_model.safetensors")
        return out

    nan = {**tensors, key: tensors[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))}
    with pytest.raises(LoraFormatError, match="non-finite"):
        lora_format.read_adapter(variant("nan", nan))
    bad_rank = {**tensors, key: torch.zeros(tensors[key].shape[0], 3)}
    with pytest.raises(LoraFormatError, match="wrong shapes"):
        lora_format.read_adapter(variant("rank", bad_rank))

    shapes = lora_format.base_linear_shapes(embedded_base)
    wide = {k: (torch.zeros(4, 512) if "lora_A" in k else v) for k, v in tensors.items()}
    _, modules = lora_format.read_adapter(variant("wide", wide))
    with pytest.raises(LoraFormatError, match="do not fit the base"):
        lora_format.check_fits(modules, shapes, max_rank=64)
    moved = {k.replace("layers.0.", "layers.40."): v for k, v in tensors.items()}
    _, modules = lora_format.read_adapter(variant("unknown", moved))
    with pytest.raises(LoraFormatError, match="layers.40.self_attn.q_proj, which the base does not have"):
        lora_format.check_fits(modules, shapes, max_rank=64)
    _, modules = lora_format.read_adapter(folder)
    with pytest.raises(LoraFormatError, match="rank 4, above the maximum of 2"):
        lora_format.check_fits(modules, shapes, max_rank=2)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_type": "IA3", "r": 4, "lora_alpha": 8}, "not LORA"),
        ({"r": 0, "lora_alpha": 8}, "positive integer rank"),
        ({"r": 4, "lora_alpha": -1}, "lora_alpha must be a positive"),
        ({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": "big"}}, "rank_pattern"),
        ({"r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_configs_name_the_problem(config, message):
    with pytest.raises(LoraFormatError, match=message):
        lora_format.parse_config(config)
