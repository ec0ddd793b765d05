"""Which grammar library runs response_format (#15): xgrammar, llguidance, outlines-core (demo tokenizer, CPU).

For one small JSON schema: compile time (first and cached), the per-token cost of what the
engine does each step for a constrained row (fill the token mask, apply it to the logits row,
advance by the chosen token) over random logits (the mask work does not depend on the model),
and how many finished outputs validate against the schema (random logits are the weakest
model there is). llguidance and outlines-core are measured where installed (vLLM's pins:
`pip install "llguidance<1.8" "outlines_core==0.2.14"`).

    python benchmarks/grammar_choice.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "ok"],
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
}


def run_xgrammar(tokenizer, tokens: int) -> tuple[float, float, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    cached = time.perf_counter() - start
    mask, steps, generator = xgr.allocate_token_bitmask(1, info.vocab_size), [], torch.Generator().manual_seed(0)
    outputs = []
    while len(steps) < tokens:
        matcher, out = xgr.GrammarMatcher(compiled), []
        while not matcher.is_terminated():
            logits = torch.randn(1, len(tokenizer), generator=generator)
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            out.append(int(torch.argmax(logits)))
            matcher.accept_token(out[-1])
            steps.append(time.perf_counter() - start)
        outputs.append(tokenizer.decode(out, skip_special_tokens=True))
    return first, cached, statistics.median(steps), valid_share(outputs)


def run_llguidance(tokenizer, tokens: int) -> tuple[float, float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
        )
        llguidance.LLMatcher(lltok, grammar)
        times.append(time.perf_counter() - start)
    mask, steps, generator = lgt.allocate_token_bitmask(1, lltok.vocab_size), [], torch.Generator().manual_seed(0)
    outputs = []
    while len(steps) < tokens:
        matcher, out = llguidance.LLMatcher(lltok, grammar), []
        while not matcher.is_stopped():
            logits = torch.randn(1, len(tokenizer), generator=generator)
            start = time.perf_counter()
            lgt.fill_next_token_bitmask(matcher, mask, 0)
            lgt.apply_token_bitmask_inplace(logits, mask)
            out.append(int(torch.argmax(logits)))
            matcher.consume_token(out[-1])
            steps.append(time.perf_counter() - start)
        outputs.append(tokenizer.decode(out, skip_special_tokens=True))
    return times[0], times[1], statistics.median(steps), valid_share(outputs)


def run_outlines_core(tokenizer, tokens: int) -> tuple[float, float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = Vocabulary(tokenizer.eos_token_id, byte_vocabulary(tokenizer))
    times = []
    for _ in range(2):  # outlines-core keeps no cache: every request builds its index
        start = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
        times.append(time.perf_counter() - start)
    steps, generator, outputs = [], torch.Generator().manual_seed(0), []
    while len(steps) < tokens:
        guide, out = Guide(index), []
        while not guide.is_finished() and len(out) < 400:
            logits = torch.randn(len(tokenizer), generator=generator)
            start = time.perf_counter()
            allowed = torch.tensor(guide.get_tokens())
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            out.append(int(torch.argmax(masked)))
            guide.advance(out[-1])
            steps.append(time.perf_counter() - start)
            if out[-1] == tokenizer.eos_token_id:
                break
        outputs.append(tokenizer.decode(out, skip_special_tokens=True))
    return times[0], times[1], statistics.median(steps), valid_share(outputs)


def byte_vocabulary(tokenizer) -> dict[bytes, list[int]]:
    """Token bytes -> IDs for a byte-level BPE tokenizer (GPT-2's byte-to-character map undone)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id not in tokenizer.all_special_ids:
            vocabulary.setdefault(bytes(chars[c] for c in token), []).append(token_id)
    return vocabulary


def valid_share(outputs: list[str]) -> str:
    valid = 0
    for text in outputs:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return f"{valid}/{len(outputs)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000, help="constrained tokens measured per library")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from loraplex.training.base import ensure_base

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base()))
    print(f"{'library':>13} {'compile ms':>11} {'again ms':>9} {'per token us (median)':>22} {'schema-valid':>13}")
    runs = (("xgrammar", run_xgrammar), ("llguidance", run_llguidance), ("outlines-core", run_outlines_core))
    for name, run in runs:
        try:
            first, again, step, valid = run(tokenizer, args.tokens)
        except ImportError as exc:
            print(f"{name:>13} not installed ({exc.name})")
            continue
        print(f"{name:>13} {first * 1e3:>11.2f} {again * 1e3:>9.3f} {step * 1e6:>22.1f} {valid:>13}")


if __name__ == "__main__":
    main()
