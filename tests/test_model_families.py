"""The shapes users bring, random-init from configs (training/random_checkpoint.py; nothing downloaded).

For each supported family: the serving runner's logits equal HF's forward (NF4 and bf16), a mixed
batch gives each request its solo greedy output, a short QLoRA run writes an adapter the store
serves, the GGUF export runs in llama.cpp with logits close to HF's and carries the chat
template. An unsupported architecture is refused with one line by the engine and by convert.

Widths, head counts, vocabularies and RoPE settings are the real ones; layers are cut to 2-3 so
each test takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraplex.training.architectures import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture
from loraplex.training.random_checkpoint import FAMILIES, build_family

SLOW = {"llama-3.2-1b"}  # hidden 2048: NF4 quantization alone takes ~10 s on 2 cores
PARAMS = [pytest.param(name, id=name, marks=[pytest.mark.slow] if name in SLOW else []) for name in FAMILIES]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Checkpoints built on first use, once per module."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, root / name)
        return built[name]

    return get


def test_one_supported_list_shared_by_engine_and_convert():
    from loraplex.convert.gguf_export import ARCHITECTURES

    assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)
    for _, fields, _ in FAMILIES.values():
        assert fields["hidden_size"] % 64 == 0  # NF4 blocks (64) divide every width here


def test_the_families_really_have_the_shapes_they_claim(family_dirs):
    smol = json.loads((family_dirs("smollm2-135m") / "config.json").read_text())
    assert (smol["hidden_size"], smol["num_attention_heads"], smol["num_key_value_heads"], smol["vocab_size"]) == (
        576,
        9,
        3,
        49152,
    ) and smol["tie_word_embeddings"]
    qwen = json.loads((family_dirs("qwen2.5-0.5b") / "config.json").read_text())
    assert qwen["architectures"] == ["Qwen2ForCausalLM"] and qwen["vocab_size"] == 151936
    from safetensors import safe_open

    with safe_open(str(family_dirs("qwen2.5-0.5b") / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"} <= names
    assert "lm_head.weight" not in names  # tied
    mistral = json.loads((family_dirs("mistral-swa") / "config.json").read_text())
    assert mistral["sliding_window"] == 12


# ---- serving: the runner against HF's forward --------------------------------------------------


def _runner_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits for positions prefill-1.. : one prefill, then one decode step per token."""
    from loraplex.serving.engine.lora_batch import LoraSlots
    from loraplex.serving.engine.runner import KVCacheRunner

    slots = LoraSlots(model, 1, 8, 2)
    slots.use([0])
    runner = KVCacheRunner(model, slots, 2, 64)
    rows = torch.tensor([1])
    out = [runner(ids[:, :prefill], torch.arange(prefill).view(1, -1), rows, torch.tensor([prefill - 1]))[0]]
    for p in range(prefill, ids.shape[1]):
        out.append(runner(ids[:, p : p + 1], torch.tensor([[p]]), rows, torch.tensor([0]))[0])
    return torch.stack(out)


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
@pytest.mark.parametrize("family", PARAMS)
def test_runner_logits_equal_hf_forward(family_dirs, family, quant):
    from loraplex.training.quant import load_dense_base, load_nf4_base

    path = family_dirs(family)
    model = (load_nf4_base(path, "cpu") if quant == "nf4" else load_dense_base(path, torch.bfloat16, "cpu")).eval()
    ids = torch.randint(3, 2000, (1, 36), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits[0, 15:].float()  # positions 15..35: past Mistral's 12-token window
    got = _runner_logits(model, ids, 16)
    scale = want.abs().max().item()
    # bf16 compute in both, in different orders: a few bf16 steps of the largest logit, no more.
    # A missing bias, window or RoPE scaling moves logits by a sizeable fraction of the scale.
    assert (got - want).abs().max().item() <= 0.02 * scale, ((got - want).abs().max().item(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_sliding_window_matters_for_the_mistral_family(family_dirs):
    """Guards the previous test: full attention would give visibly different logits here."""
    from loraplex.serving.engine import runner as runner_module
    from loraplex.training.quant import load_dense_base

    model = load_dense_base(family_dirs("mistral-swa"), torch.bfloat16, "cpu").eval()
    ids = torch.randint(3, 2000, (1, 36), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits[0, 15:].float()
    windowed = _runner_logits(model, ids, 16)
    model.config.sliding_window = None  # what the runner would do if it ignored the window
    full = _runner_logits(model, ids, 16)
    assert runner_module.layer_windows(model.config) == [None, None]
    assert (full - want).abs().max() > 5 * (windowed - want).abs().max()


@pytest.mark.parametrize("family", PARAMS)
def test_mixed_batch_equals_solo_greedy(family_dirs, family, tmp_path):
    from loraplex.serving.engine import EngineConfig
    from loraplex.serving.engine.engine import TorchEngine
    from loraplex.serving.engine.sampling import SamplingParams
    from loraplex.training.random_adapter import make_random_adapter

    base = family_dirs(family)
    for i in range(2):
        make_random_adapter(base, tmp_path / f"rand-{i}", seed=i, rank=4, std=0.5)
    engine = TorchEngine(
        EngineConfig(base_model=str(base), adapters=str(tmp_path), max_batch=8, max_loras=2, max_seq=64, device="cpu")
    )
    try:
        greedy = SamplingParams(max_tokens=6, temperature=0)
        prompts = ["Repeat after me: alice paris\n", "What number comes after 41?\n", "Ticket: my invoice\n"]
        adapters = ["", "rand-0", "rand-1"]
        alone = {(a, p): engine.submit(p, a, greedy).result(120)[0] for a in adapters for p in prompts}
        streams = {(a, p): engine.submit(p, a, greedy) for p in prompts for a in adapters}
        assert {key: s.result(120)[0] for key, s in streams.items()} == alone
        assert len(set(alone.values())) > len(prompts)  # the adapters change the outputs
    finally:
        engine.shutdown()


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", PARAMS)
def test_qlora_smoke_writes_an_adapter_the_store_serves(family_dirs, family, tmp_path):
    from loraplex.serving.engine import EngineConfig
    from loraplex.serving.engine.engine import TorchEngine
    from loraplex.serving.engine.sampling import SamplingParams
    from loraplex.training.config import TrainConfig
    from loraplex.training.run import train

    rows = [{"prompt": f"Add {i} and {i + 1}:\n", "completion": str(2 * i + 1)} for i in range(8)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    manifest = train(
        TrainConfig(
            data=str(data),
            output=str(store / "smoke"),
            base_model=str(family_dirs(family)),
            max_steps=2,
            batch_size=4,
            lora_r=4,
            max_seq_len=48,
            learning_rate=1e-3,
            gradient_checkpointing=False,
        )
    )
    assert manifest["steps"] == 2 and manifest["metrics"]["train_loss"] > 0
    engine = TorchEngine(
        EngineConfig(
            base_model=str(family_dirs(family)), adapters=str(store), max_batch=2, max_loras=1, max_seq=64, device="cpu"
        )
    )
    try:
        _, final = engine.submit("Add 3 and 4:\n", "smoke", SamplingParams(max_tokens=4, temperature=0)).result(120)
        assert final.final
    finally:
        engine.shutdown()


# ---- convert: GGUF in llama.cpp ----------------------------------------------------------------


@pytest.mark.parametrize("family", PARAMS)
def test_gguf_export_runs_in_llama_cpp_close_to_hf(family_dirs, family, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.convert import llamacpp_check
    from loraplex.convert.gguf_export import write_gguf

    base = family_dirs(family)
    path = write_gguf(base, tmp_path / f"{family}.gguf", "F16", progress=lambda _: None)

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == FAMILIES[family][2]  # the template travelled

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    llm = llamacpp_check.load_gguf(path, n_ctx=64)
    # within Mistral's window: llama.cpp's 'llama' graph attends over the full context (export warns)
    limit = FAMILIES[family][1].get("sliding_window") or 48
    for text in ["Repeat after me: alice paris\n", "What number comes after 41? The answer is 42."]:
        ids = tokenizer(text)["input_ids"][:limit]
        assert llamacpp_check.tokenize(llm, text)[:limit] == ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].float()
        got = torch.from_numpy(llamacpp_check.logits(llm, ids))[:, : want.shape[-1]]
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.02 * scale, ((got - want).abs().max().item(), scale)


# ---- unsupported: one line, never wrong output --------------------------------------------------


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory) -> Path:
    """Phi-3: fused qkv_proj and gate_up_proj, which the torch engine's runner does not have."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from loraplex.training.base import ensure_base

    out = tmp_path_factory.mktemp("phi3")
    config = Phi3Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=256,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    Phi3ForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_base() / name, out / name)
    return out


def test_unsupported_architecture_is_refused_by_the_engine(phi3_dir):
    from loraplex.serving.engine import EngineConfig
    from loraplex.serving.engine.engine import TorchEngine

    with pytest.raises(UnsupportedArchitecture) as err:
        TorchEngine(EngineConfig(base_model=str(phi3_dir), device="cpu"))
    message = str(err.value)
    assert message.startswith("architecture Phi3ForCausalLM is not supported by the torch engine; use --engine vllm")
    assert "\n" not in message


def test_runner_refuses_a_loaded_model_of_another_family():
    """Gemma has q/k/v/o and gate/up/down like Llama, so only the architecture check stops it."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from loraplex.serving.engine.runner import KVCacheRunner

    model = GemmaForCausalLM(
        GemmaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            vocab_size=512,
        )
    )
    with pytest.raises(UnsupportedArchitecture, match="GemmaForCausalLM is not supported by the torch engine"):
        KVCacheRunner(model, lora=None, max_rows=1, max_seq=8)


def test_unsupported_architecture_is_refused_by_convert(phi3_dir, tmp_path):
    from tests.conftest import run_cli

    done = run_cli(
        "-m",
        "loraplex.convert",
        "merge-export",
        "--base",
        str(phi3_dir),
        "--out",
        str(tmp_path / "phi3.gguf"),
        "--format",
        "gguf",
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: architecture Phi3ForCausalLM is not supported by convert's GGUF export")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "phi3.gguf").exists()


def test_loraplex_serve_refuses_it_before_starting_ray(phi3_dir):
    from tests.conftest import run_cli

    done = run_cli("-m", "loraplex.cli", "serve", "--base-model", str(phi3_dir), "--allow-unauthenticated", timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(
        "error: architecture Phi3ForCausalLM is not supported by the torch engine; use --engine vllm"
    )
    assert "Traceback" not in done.stderr


def test_gguf_pre_tokenizer_follows_the_tokenizer_transformers_loads(tmp_path):
    """transformers loads Qwen2Tokenizer for model_type qwen2, which splits digits one by one
    whatever tokenizer.json says; the GGUF must split like the tokenizer that really runs."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from loraplex.convert import llamacpp_check
    from loraplex.convert.gguf_export import write_gguf
    from loraplex.training.base import ensure_base

    config = Qwen2Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(ensure_base())).save_pretrained(tmp_path)  # Llama-3 split in the file
    path = write_gguf(tmp_path, tmp_path / "m.gguf", "F16", progress=lambda _: None)
    llm = llamacpp_check.load_gguf(path, n_ctx=64)
    text = "What number comes after 41? The answer is 42."
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert llamacpp_check.tokenize(llm, text) == AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"]
