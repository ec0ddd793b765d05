"""Serving benchmark: N concurrent clients over K adapters, side by side in one run.

  (a) base     the loraplex engine with no adapters (the ceiling for the same concurrency)
  (b) naive    one PEFT model holding all adapters, one request at a time, set_adapter per request
  (c) loraplex the engine with every request on its own adapter, continuous mixed batching:
               the batched LoRA op (each adapter read once per step), with float32 and with
               bfloat16 adapter storage, and the per-row bmm path it replaced (--compare-paths)

Reports generated tokens/s and p50/p99 request latency; prints a table and writes JSON.

    python benchmarks/serve_bench.py [--clients 16] [--adapters 8] [--requests 64] [--max-tokens 32] [--rank 16]
                                     [--shape smollm2-135m | --base-model DIR] [--compare-paths]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Write a sentence about the red cat:\n",
    "Repeat after me: alice paris\n",
    "How many words: dog tree\n",
    "Month number 7 is called\n",
    "Write a sentence about the old ship:\n",
    "First word of: bread lamp door\n",
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(name: str, latencies: list[float], tokens: int, elapsed: float) -> dict:
    return {
        "mode": name,
        "requests": len(latencies),
        "generated_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": _percentile(latencies, 0.99),
    }


def run_engine(engine, jobs: list[tuple[str, str]], clients: int, max_tokens: int, name: str) -> dict:
    """`clients` threads, each sending its share of jobs one after another."""
    from loraplex.serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)  # same work in every mode
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(share):
        for prompt, adapter in share:
            started = time.perf_counter()
            _, final = engine.submit(prompt, adapter, params).result(600)
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += final.completion_tokens

    seconds = run_clients(client, jobs, clients)
    return _summary(name, latencies, tokens[0], seconds)


def run_clients(client, jobs: list, clients: int) -> float:
    """`clients` threads, thread i calling client(jobs[i::clients]); the seconds until all are done."""
    threads = [threading.Thread(target=client, args=(jobs[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def run_naive_peft(
    base_dir: Path, adapter_dirs: dict[str, Path], jobs, max_tokens: int, precision: str = "nf4"
) -> dict:
    """What you get without a multi-adapter engine: switch the active adapter, generate, repeat."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.training.adapter_id import internal_name
    from loraplex.training.data import encode_prompt
    from loraplex.training.quant import load_dense_base, load_nf4_base

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = None
    for adapter_id, folder in adapter_dirs.items():
        if model is None:
            # the base in the precision the engine serves
            base = load_nf4_base(base_dir) if precision == "nf4" else load_dense_base(base_dir)
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=internal_name(adapter_id))
        else:
            model.load_adapter(str(folder), adapter_name=internal_name(adapter_id))
    model.eval()
    latencies, tokens = [], 0
    started = time.perf_counter()
    for prompt, adapter in jobs:
        t0 = time.perf_counter()
        model.set_adapter(internal_name(adapter))
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - t0)
    return _summary("naive PEFT switching", latencies, tokens, time.perf_counter() - started)


def random_adapter(base_dir: Path, folder: Path, seed: int, rank: int) -> Path:
    """A random adapter, kept where it is when an earlier run wrote it (every engine gets the same bytes)."""
    from loraplex.training.random_adapter import make_random_adapter

    if (folder / "loraplex.json").is_file():
        return folder
    return make_random_adapter(base_dir, folder, seed=seed, rank=rank)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--shape", choices=["smollm2-135m", "llama-1b"], help="random-init model of this shape")
    parser.add_argument(
        "--compare-paths", action="store_true", help="torch engine: also bf16 adapter storage and the per-row bmm path"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--naive-requests", type=int, default=16, help="(b) is slow: fewer requests, same per-request work; 0 skips it"
    )
    parser.add_argument(
        "--adapter-store", type=Path, default=None, help="folder to keep the random adapters in (reused when there)"
    )
    parser.add_argument("--adapter-prefix", default="bench-", help="adapter i is PREFIX + i in the store")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "bf16", "awq"])
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"], help="(a) and (c) run on this engine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()

    from loraplex.serving.engine import EngineConfig, create_engine
    from loraplex.training.base import ensure_base

    base_dir = args.base_model or ensure_base()
    if args.shape:
        from benchmarks.shapes import build_shape

        base_dir = build_shape(args.shape, Path(tempfile.gettempdir()) / f"loraplex-shape-{args.shape}")
    store = args.adapter_store or Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    names = [f"{args.adapter_prefix}{i}" for i in range(args.adapters)]
    adapter_dirs = {name: random_adapter(base_dir, store / name, i, args.rank) for i, name in enumerate(names)}
    ids = list(adapter_dirs)
    jobs = [(PROMPTS[i % len(PROMPTS)], ids[i % len(ids)]) for i in range(args.requests)]

    def start(**overrides):
        config = dict(
            base_model=str(base_dir),
            adapters=str(store),
            max_batch=args.clients,
            max_loras=args.adapters,
            quantization=args.quantization,
            engine=args.engine,
        )
        engine = create_engine(EngineConfig(**(config | overrides)))
        run_engine(engine, jobs[: args.clients], args.clients, 4, "warm-up")  # loads every adapter once
        return engine

    engine = start()
    # vLLM's CPU build serves an nf4 request in bf16: the naive baseline then runs on bf16 too
    precision = getattr(engine, "base_precision", args.quantization)
    base = run_engine(engine, [(p, "") for p, _ in jobs], args.clients, args.max_tokens, "base alone")
    ours = run_engine(engine, jobs, args.clients, args.max_tokens, "loraplex")
    extra = []
    if args.compare_paths and args.engine == "torch":
        for group in (g for layer in engine.slots.groups for g in layer.values()):
            group.use_op = False  # the per-row bmm path (engine v1; CUDA's path)
        extra.append(run_engine(engine, jobs, args.clients, args.max_tokens, "loraplex per-row bmm"))
        engine.shutdown()
        engine = start(adapter_dtype="bfloat16")
        extra.append(run_engine(engine, jobs, args.clients, args.max_tokens, "loraplex bf16 adapters"))
    engine.shutdown()
    # (b) last: torch work in this thread while the engine thread runs would slow the engine
    # (libgomp gives each thread its own worker pool; see serving/engine/engine.py)
    naive = None
    if args.naive_requests:
        naive = run_naive_peft(base_dir, adapter_dirs, jobs[: args.naive_requests], args.max_tokens, precision)
    results = [r for r in (base, naive, ours, *extra) if r]
    print(
        f"\n{args.clients} clients over {args.adapters} adapters, {args.max_tokens} new tokens, "
        f"{precision} base {base_dir}, {args.engine} engine"
    )
    print(f"{'mode':<22}{'requests':>9}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}")
    for r in results:
        print(f"{r['mode']:<22}{r['requests']:>9}{r['tokens_per_s']:>10.1f}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}")
    ratios = {
        "loraplex_vs_base": ours["tokens_per_s"] / base["tokens_per_s"],
        **{f"{r['mode']} vs base": r["tokens_per_s"] / base["tokens_per_s"] for r in extra},
    }
    if naive:
        ratios["loraplex_vs_naive"] = ours["tokens_per_s"] / naive["tokens_per_s"]
        print(f"\nloraplex / naive = {ratios['loraplex_vs_naive']:.1f}x", end="")
    print(f"   loraplex / base = {ratios['loraplex_vs_base']:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {**{k: str(v) for k, v in vars(args).items()}, "served_precision": precision}
    args.out.write_text(json.dumps({"config": config, "results": results, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
