"""Random-init checkpoints of the model families users bring, from configs written here (no
download): for tests (layers cut to 2-3) and benchmarks (the real layer counts, as overrides).

Widths, head counts, vocabularies and RoPE settings are the real ones. The tokenizer is the
embedded base's (2k tokens): the model vocab is larger, as the padded vocabularies of real
checkpoints are, and its rows past the tokenizer are zero (untrained in real checkpoints too).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_CHAT = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)

# family -> (config class, config fields, chat template). All GQA, all with dims that are not
# multiples of 256 somewhere (576, 896, 1536, 4864: k-quants fall back on those rows).
FAMILIES = {
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=3,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
        ),
        CHATML,
    ),
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(  # Qwen2 puts biases on q/k/v (and only there)
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=2,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        CHATML,
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=8192,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
        LLAMA3_CHAT,
    ),
    "mistral-swa": (
        "MistralConfig",
        dict(  # a window shorter than the test sequences: it must bite
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            sliding_window=12,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        MISTRAL_CHAT,
    ),
}


def build_family(name: str, out: Path, seed: int = 0, std: float = 0.02, **overrides) -> Path:
    """A random-init checkpoint of one family with the embedded tokenizer and a family chat
    template; overrides replace config fields (e.g. num_hidden_layers=30 for the real depth)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.training.base import ensure_base

    config_class, fields, template = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base()))
    tokenizer.chat_template = template
    config = getattr(transformers, config_class)(
        **(fields | overrides),
        initializer_range=std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # rows past the tokenizer are padding, untrained in real checkpoints too
        model.get_input_embeddings().weight[len(tokenizer) :] = 0
        model.get_output_embeddings().weight[len(tokenizer) :] = 0
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers picks the tokenizer class by model_type (Qwen2Tokenizer splits digits one by
    # one); save what it really loads, so tokenizer.json agrees with it as in real checkpoints
    AutoTokenizer.from_pretrained(str(out)).save_pretrained(out)
    return out
