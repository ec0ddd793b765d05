"""GGUF export checked by real readers: gguf-py reads it back, llama.cpp runs it.

Golden relations, not snapshots: llama.cpp logits ~ transformers logits, llama.cpp's tokenizer
== the HF tokenizer, base GGUF + GGUF LoRA in llama.cpp ~ the HF merge of the same adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraplex.convert.gguf_export import write_gguf
from loraplex.convert.gguf_lora import write_gguf_lora
from loraplex.convert.merge import merge_adapter
from loraplex.training.data import encode_prompt, load_jsonl
from loraplex.training.demo import tenant_data
from loraplex.training.random_adapter import make_random_adapter

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")
from loraplex.convert import llamacpp_check  # noqa: E402

QUIET = dict(progress=lambda _: None)
EVAL_ROWS = load_jsonl(tenant_data("acme-fiscal")[1])[:20]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def sequences(tokenizer) -> list[list[int]]:
    out = []
    for row in EVAL_ROWS:
        ids = (
            encode_prompt(tokenizer, row["prompt"])
            + tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        )
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def merged(embedded_base, tmp_path_factory):
    """A random adapter merged at fp16 into the embedded base, saved as a HF folder."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gguf")
    adapter = make_random_adapter(embedded_base, root / "adapter", seed=11, rank=8, std=0.05)
    model = merge_adapter(embedded_base, adapter, "fp16", **QUIET)
    model.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(str(embedded_base)).save_pretrained(root / "merged")
    return root


def test_f16_round_trip_through_gguf_reader(merged):
    import gguf
    from safetensors.torch import load_file

    path = write_gguf(merged / "merged", merged / "m-f16.gguf", "F16", **QUIET)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 6 * 9 + 1  # embeddings, output norm, 9 per block, output
    weights = load_file(str(merged / "merged" / "model.safetensors"))
    down = tensors["blk.3.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.F16
    got = np.asarray(down.data).reshape(256, 768)
    assert np.array_equal(got, weights["model.layers.3.mlp.down_proj.weight"].numpy().astype(np.float16))
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama-bpe"


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_llama_cpp_logits_match_transformers(merged, quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(merged / "merged", merged / f"m-{quant}.gguf", quant, **QUIET)
    hf = AutoModelForCausalLM.from_pretrained(str(merged / "merged"), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged / "merged"))
    llm = llamacpp_check.load_gguf(path)
    agree = total = 0
    worst = 0.0
    for ids in sequences(tokenizer):
        ours = torch.from_numpy(llamacpp_check.logits(llm, ids))
        ref = hf_logits(hf, ids)
        agree += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        total += len(ids)
        worst = max(worst, (ours - ref).abs().max().item())
    floor = {"F16": 0.99, "Q8_0": 0.97, "Q4_K_M": 0.85}[quant]
    assert agree / total >= floor, (quant, agree / total, worst)
    if quant == "F16":
        assert worst < 0.1, worst


def test_llama_cpp_tokenizer_gives_the_hf_token_ids(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged / "merged"))
    llm = llamacpp_check.load_gguf(write_gguf(merged / "merged", merged / "tok.gguf", "Q8_0", **QUIET))
    texts = (
        [row["prompt"] for row in EVAL_ROWS]
        + [row["completion"] for row in EVAL_ROWS]
        + ["  leading spaces", "tabs\tand\nnewlines\n\n", "ünïcödé — dashes", "numbers 1234567 and 3.14", "emoji 🙂!"]
    )
    for text in texts:
        assert llamacpp_check.tokenize(llm, text) == encode_prompt(tokenizer, text), text


def test_gguf_lora_in_llama_cpp_matches_the_merged_model(embedded_base, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_gguf = write_gguf(embedded_base, merged / "base-f16.gguf", "F16", **QUIET)
    lora = write_gguf_lora(embedded_base, merged / "adapter", merged / "adapter.gguf", **QUIET)
    with_lora = llamacpp_check.load_gguf(base_gguf, lora_path=lora)
    without = llamacpp_check.load_gguf(base_gguf)
    hf = AutoModelForCausalLM.from_pretrained(str(merged / "merged"), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged / "merged"))
    agree = changed = total = 0
    for ids in sequences(tokenizer):
        ref = hf_logits(hf, ids).argmax(-1)
        agree += (torch.from_numpy(llamacpp_check.logits(with_lora, ids)).argmax(-1) == ref).sum().item()
        changed += (torch.from_numpy(llamacpp_check.logits(without, ids)).argmax(-1) != ref).sum().item()
        total += len(ids)
    assert agree / total >= 0.99, agree / total
    assert changed > 0  # the adapter matters, so agreement above is the LoRA's doing


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_configs_export_faithfully(embedded_base, tmp_path, family):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**dims, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**dims))
        for layer in model.model.layers:  # Qwen2's q/k/v biases: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    tokenizer.save_pretrained(tmp_path / family)
    llm = llamacpp_check.load_gguf(write_gguf(tmp_path / family, tmp_path / f"{family}.gguf", "F16", **QUIET))
    model = model.float().eval()
    for ids in sequences(tokenizer)[:5]:
        ours = torch.from_numpy(llamacpp_check.logits(llm, ids))
        ref = hf_logits(model, ids)
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json

    from loraplex.convert.gguf_export import UnsupportedModel

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "F16", **QUIET)
