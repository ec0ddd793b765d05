"""The tokenizer half of a GGUF export: byte-level BPE as llama.cpp's 'gpt2' model with the right
pre-tokenizer name, SentencePiece-style vocabularies as 'llama'. The tensors are gguf_export.py's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from loraplex.convert.errors import UnsupportedModel
from loraplex.training.pretokenizers import LLAMA_CPP_PRE_TOKENIZERS as BPE_PRE_TOKENIZERS


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE as 'gpt2' + a pre-tokenizer name; SentencePiece-style vocabularies as 'llama'."""
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        if tok["model"]["type"] == "BPE" and not tok["model"].get("byte_fallback"):
            _add_byte_level_bpe(writer, model_dir, tok, vocab_size)
            return
        if tok["model"]["type"] == "BPE":  # Llama 2 / Mistral fast tokenizers: SentencePiece BPE, byte fallback
            _add_sentencepiece(writer, model_dir, *_sentencepiece_from_tokenizer_json(tok), vocab_size)
            return
    if (model_dir / "tokenizer.model").is_file():
        try:  # gguf-py reads tokenizer.model through the optional sentencepiece package
            pieces = list(zip(*gguf.SentencePieceVocab(model_dir).all_tokens()))
        except RuntimeError as err:
            raise UnsupportedModel(f"tokenizer.model needs sentencepiece (pip install sentencepiece): {err}") from err
        _add_sentencepiece(writer, model_dir, *pieces, vocab_size)
        return
    raise UnsupportedModel(f"{model_dir}: no supported tokenizer (byte-level BPE or SentencePiece-style)")


def bpe_pre_tokenizer(tok: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json, read from its split regex.

    Without the right name llama.cpp falls back to a default split and about a third of the
    strings tokenize differently from Hugging Face.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if not regexes and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"  # ByteLevel with its built-in regex is GPT-2's split
    if len(regexes) == 1 and regexes[0] in BPE_PRE_TOKENIZERS:
        return BPE_PRE_TOKENIZERS[regexes[0]]
    raise UnsupportedModel(
        f"unrecognized BPE pre-tokenizer {regexes}; supported: {', '.join(sorted(set(BPE_PRE_TOKENIZERS.values())))}"
    )


def _pre_tokenizer_as_loaded(model_dir: Path, tok: dict) -> dict:
    """The split Hugging Face really applies, which can differ from tokenizer.json's.

    transformers picks the tokenizer class by model_type and some classes set their own split
    (Qwen2Tokenizer: digits one by one), so the file alone can name the wrong llama.cpp pre-tokenizer."""
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    except (OSError, ValueError, AttributeError):  # no fast tokenizer: the file is all there is
        return tok.get("pre_tokenizer") or {}
    return json.loads(backend.to_str()).get("pre_tokenizer") or {}


def _add_byte_level_bpe(writer: gguf.GGUFWriter, model_dir: Path, tok: dict, vocab_size: int) -> None:
    """tokens, types and merges of a byte-level BPE (Llama 3, Qwen2, GPT-2, ours)."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # config vocab may be padded past the tokenizer's
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in tok["model"]["vocab"].items():
        tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        # special tokens are never produced from text (CONTROL); other added tokens are matched whole
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer({"pre_tokenizer": _pre_tokenizer_as_loaded(model_dir, tok)}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)  # merges, bos/eos, add_bos


def _sentencepiece_from_tokenizer_json(tok: dict) -> tuple[list[bytes], list[float], list[int]]:
    """tokens, scores and types of a byte-fallback BPE, scored so llama.cpp merges in HF's order.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest;
    Hugging Face applies the lowest-ranked merge first. Score = -rank makes the two agree.
    """
    model = tok["model"]
    merge_rank: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merge_rank.setdefault(left + right, rank)
    entries = {token_id: (text, None) for text, token_id in model["vocab"].items()}
    entries.update({added["id"]: (added["content"], added["special"]) for added in tok.get("added_tokens", [])})
    tokens, scores, types = [], [], []
    for token_id in range(max(entries) + 1):
        text, special = entries.get(token_id, (f"[PAD{token_id}]", None))
        tokens.append(text.encode("utf-8"))
        scores.append(float(-merge_rank.get(text, 0)))
        types.append(_sentencepiece_type(text, special, token_id in entries, model.get("unk_token")))
    return tokens, scores, types


def _sentencepiece_type(text: str, special: bool | None, known: bool, unk: str | None) -> int:
    """llama.cpp's token type; BYTE matters: byte fallback and detokenizing <0xNN> depend on it."""
    if not known:
        return gguf.TokenType.UNUSED
    if text == unk:
        return gguf.TokenType.UNKNOWN
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
        return gguf.TokenType.BYTE
    if special is None:  # in the BPE vocabulary, not an added token
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED


def _add_sentencepiece(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    tokens: list[bytes],
    scores: list[float],
    types: list[int],
    vocab_size: int,
) -> None:
    """A SentencePiece-style vocabulary as llama.cpp tokenizer model 'llama', padded to the config's size."""
    pad = range(len(tokens), vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*tokens, *(f"[PAD{i}]".encode() for i in pad)])
    writer.add_token_scores([*scores, *(-1000.0 for _ in pad)])
    writer.add_token_types([*types, *(gguf.TokenType.UNUSED for _ in pad)])
    gguf.SpecialVocab(model_dir, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
