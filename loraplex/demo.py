"""The demo: one NF4 base, every demo tenant's adapter, all held-out prompts in mixed batches."""

from __future__ import annotations

import time


def run_demo(retrain: bool = False, examples: int = 3) -> int:
    from loraplex.serving.engine import EngineConfig, create_engine
    from loraplex.serving.engine.sampling import SamplingParams
    from loraplex.training.base import ensure_base
    from loraplex.training.data import load_jsonl
    from loraplex.training.demo import ADAPTERS_DIR, ensure_demo_adapters, tenant_data
    from loraplex.training.evaluate import is_exact_match

    started = time.time()
    base_dir = ensure_base()
    tenants = list(ensure_demo_adapters(retrain=retrain))
    engine = create_engine(
        EngineConfig(base_model=str(base_dir), adapters=str(ADAPTERS_DIR), max_batch=32, max_queue=4096)
    )
    print(f"engine ready in {time.time() - started:.1f}s: {base_dir.name} in NF4, adapters from {ADAPTERS_DIR}\n")
    greedy = SamplingParams(max_tokens=8, temperature=0)
    try:
        jobs = {}  # every tenant's prompts, with and without its adapter, in flight together
        for tenant in tenants:
            for i, row in enumerate(load_jsonl(tenant_data(tenant)[1])):
                jobs[(tenant, i, tenant)] = (row, engine.submit(row["prompt"], tenant, greedy))
                jobs[(tenant, i, "")] = (row, engine.submit(row["prompt"], "", greedy))
        answers = {key: (row, stream.result(300)[0]) for key, (row, stream) in jobs.items()}
        finished = time.time() - started
        for tenant in tenants:
            mine = [answers[k] for k in answers if k[0] == tenant and k[2] == tenant]
            plain = [answers[k] for k in answers if k[0] == tenant and k[2] == ""]
            score = sum(is_exact_match(a, r["completion"]) for r, a in mine) / len(mine)
            base_score = sum(is_exact_match(a, r["completion"]) for r, a in plain) / len(plain)
            print(
                f"== {tenant}: exact match {score:.0%} with its adapter, {base_score:.0%} for the base "
                f"({len(mine)} held-out prompts)"
            )
            for (row, answer), (_, base_answer) in list(zip(mine, plain))[:examples]:
                print(f"   prompt {row['prompt']!r}\n     {tenant}: {answer!r}   base: {base_answer!r}")
            print()
        print(
            f"{len(jobs)} requests over {len(tenants)} adapters + the base in {finished:.1f}s "
            f"({engine.steps} decode steps, mixed batches of up to {engine.config.max_batch})"
        )
    finally:
        engine.shutdown()
    return 0
