"""Adapters made elsewhere (issue #16): a PEFT folder made with `peft` alone is imported, served
with PEFT's own greedy output, merged, and exported to a GGUF LoRA that llama.cpp reads back.

The adapter uses what users' adapters contain: q/v only, rsLoRA, an alpha_pattern and a
rank_pattern (per-module rank and scaling in the batched engine). Bad folders are refused by name
and leave nothing in the store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.training.adapter_import import import_adapter
from loraplex.training.errors import DataError, LoraplexError
from loraplex.training.manifest import base_fingerprint
from tests.conftest import run_cli
from tests.test_lora_format import save_peft_adapter

PROMPTS = [
    "Repeat after me: alice paris\n",
    "What number comes after 41?\n",
    "Write a sentence about the red cat:\n",
    "Reformat for Europe: 2022-09-18\n",
    "Ticket: my invoice is wrong\nQueue:\n",
    "Quote each word: tokyo\n",
]
FOREIGN = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "v_proj"],
    use_rslora=True,
    alpha_pattern={"v_proj": 40},
    rank_pattern={"model.layers.2.self_attn.v_proj": 4},
)


@pytest.fixture(scope="module")
def imported(embedded_base, tmp_path_factory) -> Path:
    """The foreign adapter, imported through the CLI as a user would; returns the store folder."""
    root = tmp_path_factory.mktemp("import")
    src, _ = save_peft_adapter(embedded_base, root / "from-peft", seed=7, **FOREIGN)
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"  # as a hub-trained adapter would say
    (src / "adapter_config.json").write_text(json.dumps(config))
    done = run_cli(
        "-m",
        "loraplex.cli",
        "adapters",
        "import",
        str(src),
        "--base",
        str(embedded_base),
        "--store",
        str(root / "store"),
        "--id",
        "foreign",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "trained on base 'HuggingFaceTB/SmolLM2-135M'" in done.stderr  # the warning, not a refusal
    return root / "store"


@pytest.mark.slow
def test_import_writes_an_imported_manifest_with_the_checked_base(imported, embedded_base):
    folder = imported / "foreign"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraplex.json",
    ]
    manifest = json.loads((folder / "loraplex.json").read_text())
    assert manifest["provenance"] == "imported"
    assert manifest["base_fingerprint"] == base_fingerprint(embedded_base)
    assert manifest["imported_from"]["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert manifest["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert not any(p.name.startswith(".import-") for p in imported.iterdir())


@pytest.mark.slow
def test_served_greedy_output_equals_peft_generate_alone_and_mixed(imported, embedded_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.serving.engine import EngineConfig, create_engine
    from loraplex.serving.engine.sampling import SamplingParams
    from loraplex.training.evaluate import greedy_completions
    from loraplex.training.quant import load_nf4_base
    from loraplex.training.random_adapter import make_random_adapter

    make_random_adapter(embedded_base, imported / "plain-r16", seed=3, rank=16, std=0.05)  # a wider neighbour
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    peft_model = PeftModel.from_pretrained(load_nf4_base(embedded_base, "cpu"), str(imported / "foreign"))
    reference = greedy_completions(peft_model, tokenizer, PROMPTS, 12, batch_size=1)
    with peft_model.disable_adapter():
        bare = greedy_completions(peft_model, tokenizer, PROMPTS, 12, batch_size=1)
    assert reference != bare  # the adapter changes the outputs, so agreement is its doing

    engine = create_engine(
        EngineConfig(base_model=str(embedded_base), adapters=str(imported), device="cpu", max_batch=16, max_loras=4)
    )
    greedy = SamplingParams(max_tokens=12, temperature=0)
    try:
        alone = {
            (a, p): engine.submit(p, a, greedy).result(120)[0] for a in ("foreign", "plain-r16", "") for p in PROMPTS
        }
        assert [alone["foreign", p] for p in PROMPTS] == reference
        streams = {(a, p): engine.submit(p, a, greedy) for p in PROMPTS for a in ("plain-r16", "foreign", "")}
        assert {key: s.result(120)[0] for key, s in streams.items()} == alone  # mixed ranks, mixed == solo
        assert engine.store.resident()["foreign"].rank == 8
        listing = asyncio.run(_list_adapters(engine))  # what /v1/models and ListAdapters are built from
        assert {a["adapter_id"]: a["provenance"] for a in listing["adapters"]} == {
            "foreign": "imported",
            "plain-r16": "trained",
        }
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_merge_and_gguf_lora_export_accept_it_and_llama_cpp_reads_it_back(imported, embedded_base, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.convert import llamacpp_check
    from loraplex.convert.gguf_export import write_gguf
    from loraplex.training.data import encode_prompt

    adapter, lora_gguf, merged_dir = imported / "foreign", tmp_path / "foreign.gguf", tmp_path / "merged"
    for command, out, fmt in (("adapter-export", lora_gguf, "gguf-lora"), ("merge-export", merged_dir, "hf")):
        done = run_cli(
            "-m",
            "loraplex.convert",
            command,
            "--base",
            str(embedded_base),
            "--adapter",
            str(adapter),
            "--out",
            str(out),
            "--format",
            fmt,
            "--no-verify",
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    assert "each checked = W + s*B@A" in done.stdout + done.stderr  # merge checked against lora_format's scaling
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base_gguf = write_gguf(embedded_base, tmp_path / "base-f16.gguf", "F16", progress=lambda _: None)
    with_lora = llamacpp_check.load_gguf(base_gguf, lora_path=lora_gguf)
    without = llamacpp_check.load_gguf(base_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    agree = changed = total = 0
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():
            ref = merged(torch.tensor([ids])).logits[0].argmax(-1)
        agree += (torch.from_numpy(llamacpp_check.logits(with_lora, ids)).argmax(-1) == ref).sum().item()
        changed += (torch.from_numpy(llamacpp_check.logits(without, ids)).argmax(-1) != ref).sum().item()
        total += len(ids)
    assert agree / total >= 0.97, agree / total
    assert changed > 0


async def _list_adapters(engine) -> dict:
    """ModelServer's listing over a real engine, without starting Ray (its method, unbound)."""
    from types import SimpleNamespace

    from loraplex.serving.model_server import ModelServer

    return await ModelServer.func_or_class.list_adapters(SimpleNamespace(engine=engine, replica_id="test"))


# -- refusals: each names the feature, and nothing reaches the store --------------------------------

REFUSED = {
    "dora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), "DoRA"),
    "lm_head": (dict(r=4, lora_alpha=8, target_modules=["v_proj", "lm_head"]), "lm_head"),
    "embedding": (dict(r=4, lora_alpha=8, target_modules=["v_proj", "embed_tokens"]), "embed_tokens"),
    "modules_to_save": (
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
    "rank": (dict(r=4, lora_alpha=8, target_modules=["v_proj"], rank_pattern={"v_proj": 96}), "above the maximum"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_unsupported_adapters_are_refused_by_name(embedded_base, tmp_path, kind):
    kwargs, feature = REFUSED[kind]
    src, _ = save_peft_adapter(embedded_base, tmp_path / kind, **kwargs)
    with pytest.raises(LoraplexError, match=feature):
        import_adapter(src, embedded_base, tmp_path / "store", warn=lambda _: None)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def _variant(src: Path, out: Path, tensors: dict) -> Path:
    out.mkdir()
    shutil.copyfile(src / "adapter_config.json", out / "adapter_config.json")
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_bad_weights_are_refused_by_name(embedded_base, tmp_path):
    src, peft_model = save_peft_adapter(embedded_base, tmp_path / "ok", r=4, lora_alpha=8, target_modules=["v_proj"])
    tensors = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    cases = {
        "nan": ({**tensors, key: torch.full_like(tensors[key], float("nan"))}, "non-finite"),
        "shapes": ({k: torch.zeros(4, 300) if "lora_A" in k else v for k, v in tensors.items()}, "do not fit the base"),
        "unknown": ({k.replace("v_proj", "x_proj"): v for k, v in tensors.items()}, "which the base does not have"),
    }
    store = tmp_path / "store"
    for name, (changed, message) in cases.items():
        with pytest.raises(LoraplexError, match=message):
            import_adapter(_variant(src, tmp_path / name, changed), embedded_base, store, warn=lambda _: None)
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    with pytest.raises(LoraplexError, match="pickle files \\(adapter_model.bin\\).*safe_serialization=True"):
        import_adapter(tmp_path / "bin", embedded_base, store, warn=lambda _: None)
    assert not store.exists() or not any(store.iterdir())


def test_a_trainer_s_pickles_beside_safetensors_weights_stay_behind(embedded_base, tmp_path):
    """Axolotl and TRL output folders hold training_args.bin: never loaded, never copied, named."""
    src, _ = save_peft_adapter(embedded_base, tmp_path / "trl-out", r=4, lora_alpha=8, target_modules=["v_proj"])
    (src / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    notes = []
    dest = import_adapter(src, embedded_base, tmp_path / "store", warn=notes.append)
    assert not (dest / "training_args.bin").exists()
    assert any("training_args.bin" in n for n in notes)


def test_cli_refuses_with_one_line_errors(embedded_base, tmp_path):
    src, _ = save_peft_adapter(
        embedded_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True
    )
    done = run_cli(
        "-m",
        "loraplex.cli",
        "adapters",
        "import",
        str(src),
        "--base",
        str(embedded_base),
        "--store",
        str(tmp_path / "store"),
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "DoRA" in done.stderr
    assert "Traceback" not in done.stderr
    ok, _ = save_peft_adapter(embedded_base, tmp_path / "ok", r=4, lora_alpha=8, target_modules=["v_proj"])
    import_adapter(ok, embedded_base, tmp_path / "store", warn=lambda _: None)
    with pytest.raises(DataError, match="already has an adapter 'ok'.*--id"):
        import_adapter(ok, embedded_base, tmp_path / "store", warn=lambda _: None)
    with pytest.raises(DataError, match="loraplex.json"):
        import_adapter(tmp_path / "store" / "ok", embedded_base, tmp_path / "store", adapter_id="again")


def test_slots_without_per_module_scaling_refuse_patterns_by_name(embedded_base, tmp_path):
    """The vLLM engine applies one alpha / r per adapter, so its slots (no per_module_scaling) must
    refuse rank/alpha patterns rather than serve them mis-scaled; plain adapters still load."""
    from types import SimpleNamespace

    from loraplex.serving.engine.store import AdapterStore
    from loraplex.serving.errors import AdapterRejected
    from loraplex.training.lora_format import base_linear_shapes

    loaded = {}
    slots = SimpleNamespace(
        n_slots=3,
        module_shapes=base_linear_shapes(embedded_base),
        load_slot=lambda slot, weights: loaded.update({slot: weights}),
        clear_slot=lambda slot: loaded.pop(slot, None),
    )
    for name, kwargs in (("patterned", FOREIGN), ("plain", dict(r=4, lora_alpha=8, target_modules=["v_proj"]))):
        src, _ = save_peft_adapter(embedded_base, tmp_path / name, **kwargs)
        import_adapter(src, embedded_base, tmp_path / "store", warn=lambda _: None)
    store = AdapterStore(tmp_path / "store", slots, base_fingerprint(embedded_base), max_rank=64)
    with pytest.raises(AdapterRejected, match="rank_pattern/alpha_pattern .* torch engine only"):
        store.acquire("patterned")
    store.release(store.acquire("plain"))
    assert [m.rank for m in next(iter(loaded.values())).values()] == [4] * 6
