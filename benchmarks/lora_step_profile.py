"""Where a decode step's time goes: the engine's forward with and without per-row LoRA, the
share of the adapter bmms, and the bmm pair against torch's grouped GEMM (SGMV) for one step.

    python benchmarks/lora_step_profile.py [--rows 16] [--adapters 8] [--rank 16]

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
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from loraplex.serving.engine.lora_batch import LoraSlots
    from loraplex.serving.engine.runner import KVCacheRunner
    from loraplex.serving.engine.store import AdapterStore
    from loraplex.training.base import ensure_base
    from loraplex.training.manifest import base_fingerprint
    from loraplex.training.quant import load_nf4_base
    from loraplex.training.random_adapter import make_random_adapter

    base = ensure_base()
    store = Path(tempfile.mkdtemp(prefix="loraplex-profile-"))
    for i in range(args.adapters):
        make_random_adapter(base, store / f"a{i}", seed=i, rank=args.rank)
    model = load_nf4_base(base, "cpu").eval()
    slots = LoraSlots(model, args.adapters + 1, 64, args.rows)
    runner = KVCacheRunner(model, slots, args.rows, 256)
    adapters = AdapterStore(store, slots, base_fingerprint(base), 64)
    leases = [adapters.acquire(f"a{i}") for i in range(args.adapters)]
    b = args.rows
    ids, positions = torch.randint(0, 2000, (b, 1)), torch.full((b, 1), 40)
    rows, last = torch.arange(b), torch.zeros(b, dtype=torch.long)
    layouts = {"base": [0] * b, "lora": [leases[i % args.adapters].slot for i in range(b)]}

    def step(layout: list[int]):
        slots.use(layout)
        return runner(ids, positions, rows, last, 0, None)

    step_ms = {name: _ms_per_call(lambda layout=layout: step(layout), args.steps) for name, layout in layouts.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step(layouts["lora"])
    bmm = next(e for e in prof.key_averages() if e.key == "aten::bmm")
    bmm_ms, bmm_calls = bmm.self_cpu_time_total / 50 / 1e3, bmm.count // 50

    # one step's LoRA (every layer's groups) as the engine does it, and as a grouped GEMM per adapter
    groups = [g for layer in slots.groups for g in layer.values()]
    x = {g: torch.randn(b, 1, g.in_features, dtype=torch.bfloat16) for g in groups}
    order = sorted(range(b), key=lambda i: layouts["lora"][i])
    gather, inverse = torch.tensor(order), torch.empty(b, dtype=torch.long)
    inverse[gather] = torch.arange(b)
    counts = torch.bincount(torch.tensor(layouts["lora"]), minlength=slots.n_slots)
    offsets = counts.cumsum(0).to(torch.int32)
    r = args.rank
    slot_A = {g: torch.cat([a[:, :, :r] for a in g.slot_A], dim=2).contiguous() for g in groups}
    slot_B = {g: [s[:, :r].contiguous() for s in g.slot_B] for g in groups}

    def bmm_pair():
        for g in groups:
            g(x[g], 0)

    def grouped():
        for g in groups:
            h = torch._grouped_mm(x[g].reshape(b, -1).index_select(0, gather).float(), slot_A[g], offs=offsets)
            for j, B in enumerate(slot_B[g]):
                torch._grouped_mm(h[:, j * r : (j + 1) * r].contiguous(), B, offs=offsets).index_select(0, inverse)

    slots.use(layouts["lora"])
    lora_ms = _ms_per_call(bmm_pair, args.steps)
    grouped_ms = _ms_per_call(grouped, args.steps)
    slots.use(layouts["base"])
    base_linear_ms = _ms_per_call(bmm_pair, args.steps)

    print(f"{b} rows over {args.adapters} rank-{r} adapters, NF4 embedded base, {torch.get_num_threads()} threads")
    print("| measure | ms per decode step |\n|---|---|")
    print(f"| forward, base only | {step_ms['base']:.2f} |")
    print(f"| forward, every row on its adapter | {step_ms['lora']:.2f} |")
    print(f"| of which adapter bmms ({bmm_calls} calls, profiler) | {bmm_ms:.2f} |")
    print(
        f"| LoRA of all linears as the engine does it: bmm pair (linears with minus without) | "
        f"{lora_ms - base_linear_ms:.2f} |"
    )
    print(f"| LoRA of all linears as grouped GEMMs per adapter (torch._grouped_mm) | {grouped_ms:.2f} |")
    print(f"base / lora forward = {step_ms['base'] / step_ms['lora']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
