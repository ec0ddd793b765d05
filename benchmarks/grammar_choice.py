"""Which grammar library runs response_format (#15): xgrammar vs llguidance on the demo tokenizer, CPU.

For one small JSON schema: compile time (first and cached), and the per-token cost of what the
engine does each step for a constrained row (fill the token mask, apply it to the logits row,
advance by the chosen token), over random logits (the mask work does not depend on the model).
llguidance is measured only where it is installed (`pip install llguidance`).

    python benchmarks/grammar_choice.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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
    while len(steps) < tokens:
        matcher = xgr.GrammarMatcher(compiled)
        while not matcher.is_terminated():
            logits = torch.randn(1, len(tokenizer), generator=generator)
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            matcher.accept_token(int(torch.argmax(logits)))
            steps.append(time.perf_counter() - start)
    return first, cached, statistics.median(steps)


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
    while len(steps) < tokens:
        matcher = llguidance.LLMatcher(lltok, grammar)
        while not matcher.is_stopped():
            logits = torch.randn(1, len(tokenizer), generator=generator)
            start = time.perf_counter()
            lgt.fill_next_token_bitmask(matcher, mask, 0)
            lgt.apply_token_bitmask_inplace(logits, mask)
            matcher.consume_token(int(torch.argmax(logits)))
            steps.append(time.perf_counter() - start)
    return times[0], times[1], statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000, help="constrained tokens measured per library")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from loraplex.training.base import ensure_base

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_base()))
    print(f"{'library':>10} {'compile ms':>11} {'cached ms':>10} {'per token us (median)':>22}")
    for name, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
        try:
            first, cached, step = run(tokenizer, args.tokens)
        except ImportError as exc:
            print(f"{name:>10} not installed ({exc.name})")
            continue
        print(f"{name:>10} {first * 1e3:>11.2f} {cached * 1e3:>10.3f} {step * 1e6:>22.1f}")


if __name__ == "__main__":
    main()
