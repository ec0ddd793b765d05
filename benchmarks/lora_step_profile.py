"""Where a decode step's time goes: the engine's forward base-only, with every row on its own
adapter through the batched LoRA op, and through the per-row bmm path it replaced; and how much
of the op step is spent inside the op itself.

    python benchmarks/lora_step_profile.py [--rows 16] [--adapters 8] [--rank 16] [--shape smollm2-135m]

Runs in one thread, outside the engine (no second OpenMP pool at work); prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ms_per_call(fn, calls: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--shape", choices=["smollm2-135m", "llama-1b"], help="random-init model of this shape")
    parser.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from loraplex.serving.engine import lora_op
    from loraplex.serving.engine.lora_batch import LoraSlots
    from loraplex.serving.engine.runner import KVCacheRunner
    from loraplex.serving.engine.store import AdapterStore
    from loraplex.training.base import ensure_base
    from loraplex.training.manifest import base_fingerprint
    from loraplex.training.quant import load_nf4_base
    from loraplex.training.random_adapter import make_random_adapter

    base = ensure_base()
    if args.shape:
        from benchmarks.shapes import build_shape

        base = build_shape(args.shape, Path(tempfile.gettempdir()) / f"loraplex-shape-{args.shape}")
    store = Path(tempfile.mkdtemp(prefix="loraplex-profile-"))
    for i in range(args.adapters):
        make_random_adapter(base, store / f"a{i}", seed=i, rank=args.rank)
    model = load_nf4_base(base, "cpu").eval()
    dtype = getattr(torch, args.adapter_dtype)
    slots = LoraSlots(model, args.adapters + 1, 64, args.rows, dtype)
    runner = KVCacheRunner(model, slots, args.rows, 256)
    adapters = AdapterStore(store, slots, base_fingerprint(base), 64)
    leases = [adapters.acquire(f"a{i}") for i in range(args.adapters)]
    b = args.rows
    ids, positions = torch.randint(0, 2000, (b, 1)), torch.full((b, 1), 40)
    rows, last = torch.arange(b), torch.zeros(b, dtype=torch.long)
    layouts = {"base": [0] * b, "lora": [leases[i % args.adapters].slot for i in range(b)]}
    groups = [g for layer in slots.groups for g in layer.values()]

    def step(layout: list[int]):
        slots.use(layout)
        return runner(ids, positions, rows, last, 0, None)

    def path(use_op: bool):
        for group in groups:
            group.use_op = use_op

    base_ms = _ms_per_call(lambda: step(layouts["base"]), args.steps)
    path(True)
    op_ms = _ms_per_call(lambda: step(layouts["lora"]), args.steps)
    inside = [0.0]
    original = lora_op.lora_add

    def timed(*a):
        started = time.perf_counter()
        original(*a)
        inside[0] += time.perf_counter() - started

    lora_op.lora_add = timed
    _ms_per_call(lambda: step(layouts["lora"]), args.steps, warmup=0)
    lora_op.lora_add = original
    path(False)
    bmm_ms = _ms_per_call(lambda: step(layouts["lora"]), args.steps)

    print(
        f"{b} rows over {args.adapters} rank-{args.rank} adapters ({args.adapter_dtype}), NF4 "
        f"{args.shape or 'embedded base'}, {torch.get_num_threads()} threads"
    )
    print("| measure | ms per decode step |\n|---|---|")
    print(f"| forward, base only | {base_ms:.2f} |")
    print(f"| forward, every row on its adapter: batched LoRA op | {op_ms:.2f} |")
    print(f"| of which inside the op ({len(groups)} calls) | {inside[0] / args.steps * 1e3:.2f} |")
    print(f"| forward, every row on its adapter: per-row bmm path | {bmm_ms:.2f} |")
    print(f"base / op forward = {base_ms / op_ms:.0%}; base / bmm forward = {base_ms / bmm_ms:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
