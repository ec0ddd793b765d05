"""BPE pre-tokenizer split regexes, defined once: the embedded base's tokenizer is built with
LLAMA3_SPLIT, and GGUF export maps each regex to the name llama.cpp knows it by (llama.cpp
hard-codes one regex per name, so an unknown regex cannot be exported faithfully)."""

from __future__ import annotations

# Llama-3's split: llama.cpp's pre-tokenizer "llama-bpe"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits digits one by one
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# as in tokenizer.json -> llama.cpp's tokenizer.ggml.pre
LLAMA_CPP_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}
