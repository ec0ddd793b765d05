"""Many adapters on disk, few slots: Zipf(1.0) popularity over 512 adapters with 16 slots.

Clones one random adapter into N (same shapes, each its own random B, written directly as
safetensors: building each through PEFT would load the model N times), draws each request's
adapter from a Zipf law, and runs the in-process engine. Reports tokens/s, time to first token
split by whether the request's adapter sat in a slot when it was sent (resident) or not (cold),
and the store's slot / host-tier / disk counts.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import torch

from benchmarks.serve_bench import _percentile, _summary, run_clients


def clone_adapters(template: Path, root: Path, count: int, prefix: str = "zipf") -> list[str]:
    """`count` adapters like `template` in `root` (kept between runs), each with its own random B."""
    from safetensors.torch import load_file, save_file

    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    tensors = load_file(str(template / "adapter_model.safetensors"))
    manifest = json.loads((template / "loraplex.json").read_text())
    for i, adapter_id in enumerate(ids):
        out = root / adapter_id
        if (out / "loraplex.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(1000 + i)
        fresh = {
            name: (torch.randn(t.shape, generator=generator) * 0.02).to(t.dtype) if "lora_B" in name else t
            for name, t in tensors.items()
        }
        save_file(fresh, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
        (out / "loraplex.json").write_text(json.dumps({**manifest, "adapter_id": adapter_id}, indent=2) + "\n")
    return ids


def zipf_jobs(prompts: list[str], ids: list[str], requests: int, s: float = 1.0, seed: int = 0) -> list:
    """(prompt, adapter) pairs; adapter k (0-based) is drawn with weight 1 / (k + 1) ** s."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(len(ids))]
    return [(prompts[i % len(prompts)], rng.choices(ids, weights)[0]) for i in range(requests)]


def run_with_ttft(engine, jobs: list[tuple[str, str]], clients: int, max_tokens: int, name: str) -> dict:
    """Like serve_bench.run_engine, streaming, with time to first token by residency at submit."""
    from loraplex.serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    latencies, ttft, tokens, lock = [], {"resident": [], "cold": []}, [0], threading.Lock()

    def client(share):
        for prompt, adapter in share:
            resident = not adapter or adapter in engine.store.resident()
            started, first, count = time.perf_counter(), None, 0
            for event in engine.submit(prompt, adapter, params):
                if event.error is not None:
                    raise event.error
                if first is None and event.text:
                    first = time.perf_counter() - started
                count = event.completion_tokens if event.final else count
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += count
                ttft["resident" if resident else "cold"].append(first)

    seconds = run_clients(client, jobs, clients)
    result = _summary(name, latencies, tokens[0], seconds)
    for kind, values in ttft.items():
        result[f"ttft_{kind}_n"] = len(values)
        if values:
            result[f"ttft_{kind}_p50_s"] = _percentile(values, 0.5)
            result[f"ttft_{kind}_p99_s"] = _percentile(values, 0.99)
    return result
