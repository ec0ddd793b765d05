"""Per-token streaming cost from 16 generated tokens up to the context limit (#15).

Two lines per output length:
  - detok: the host-side cost of turning one token into text to send (stop strings on), with
    the engine's incremental detokenizer (serving/engine/detokenize.py) and, for contrast, the
    scheme it replaced (re-decode the whole output every step, then search it for stops);
  - engine: per streamed token of one request on the torch engine (ignore_eos), on the embedded
    demo base in NF4 on CPU: the time in the engine's token step after the forward (sampling,
    detokenizing, stop search, the event), and the whole wall time (the forward dominates it,
    and attention grows with the context).

    python benchmarks/stream_cost.py [--lengths 16,64,128,240] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = (
    "The red cat holds the river in boston, and the café on the corner sells naïve crêpes. "
    "Numbers: 41 42 43; dates 2022-09-18; 日本語 and emoji 🐈 too. "
)
STOPS = ("###", "END OF ANSWER")


def token_stream(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def detok_new(tokenizer, ids, params) -> float:
    from loraplex.serving.engine.detokenize import StopDetokenizer

    start = time.perf_counter()
    detok = StopDetokenizer(tokenizer, params)
    for token in ids:
        detok.add(token)
    detok.flush()
    return (time.perf_counter() - start) / len(ids)


def detok_old(tokenizer, ids, params) -> float:
    """The replaced scheme: decode everything so far and search all of it, every step."""
    start, sent, generated = time.perf_counter(), "", []
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if params.find_stop(text) is not None:
            break
        ready = text[: len(text) - (params.longest_stop - 1)]
        if not ready.endswith("\ufffd") and len(ready) > len(sent):
            sent = ready
    return (time.perf_counter() - start) / len(ids)


def engine_per_token(engine, n: int) -> tuple[float, float]:
    """(seconds in the token step, wall seconds) per generated token."""
    from loraplex.serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, stop=STOPS)
    engine.accept_seconds = 0.0
    start = time.perf_counter()
    events = list(engine.submit("Write a sentence about the red cat:\n", "", params))
    elapsed = time.perf_counter() - start
    assert events[-1].completion_tokens == n, events[-1]
    return engine.accept_seconds / n, elapsed / n


def timed_token_step(engine) -> None:
    """Wrap the engine's token step (after the forward) to add up its time."""
    step = engine._accept_tokens

    def timed(requests, logits):
        start = time.perf_counter()
        step(requests, logits)
        engine.accept_seconds += time.perf_counter() - start

    engine.accept_seconds, engine._accept_tokens = 0.0, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,128,240", help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="runs per length (the median is shown)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    from loraplex.serving.engine import EngineConfig
    from loraplex.serving.engine.engine import TorchEngine
    from loraplex.serving.engine.sampling import SamplingParams
    from loraplex.training.base import ensure_base

    base = ensure_base()
    with tempfile.TemporaryDirectory() as empty:
        engine = TorchEngine(EngineConfig(base_model=str(base), adapters=empty, max_batch=4, device="cpu"))
        try:
            prompt_tokens = len(engine.encode("Write a sentence about the red cat:\n"))
            limit = engine.max_seq - prompt_tokens - 1
            lengths = [min(n, limit) for n in lengths]
            params = SamplingParams(stop=STOPS)
            timed_token_step(engine)
            engine_per_token(engine, 8)  # warm-up
            print(f"context limit {engine.max_seq} tokens (prompt {prompt_tokens}); median of {args.repeats} runs")
            print(
                f"{'tokens':>6} {'detok new us/tok':>17} {'detok old us/tok':>17} {'engine step us/tok':>19} "
                f"{'engine wall ms/tok':>19}"
            )
            for n in lengths:
                ids = token_stream(engine.tokenizer, n)
                new = statistics.median(detok_new(engine.tokenizer, ids, params) for _ in range(args.repeats))
                old = statistics.median(detok_old(engine.tokenizer, ids, params) for _ in range(args.repeats))
                runs = [engine_per_token(engine, n) for _ in range(args.repeats)]
                step = statistics.median(r[0] for r in runs)
                wall = statistics.median(r[1] for r in runs)
                print(f"{n:>6} {new * 1e6:>17.1f} {old * 1e6:>17.1f} {step * 1e6:>19.1f} {wall * 1e3:>19.2f}")
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
