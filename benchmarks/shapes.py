"""Random-init checkpoints of the model shapes the serving benchmarks run on (no download).

Real widths, heads, layer counts and vocabularies; the embedded base's tokenizer (rows of the
vocabulary past it are zero, as the padding rows of real checkpoints are untrained).
"""

from __future__ import annotations

from pathlib import Path

SHAPES = {
    # SmolLM2-135M: hidden 576, 30 layers, MLP 1536, GQA 9/3, tied 49k vocabulary
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=2048,
    ),
    # a 1B Llama (Llama-3.2-1B's widths and GQA; 16 layers, MLP 8192)
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=2048,
    ),
}


def build_shape(name: str, out: Path, seed: int = 0) -> Path:
    """Write the checkpoint once; later calls reuse the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from loraplex.training.base import ensure_base

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base()))
    config = LlamaConfig(
        **SHAPES[name],
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :] = 0
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
