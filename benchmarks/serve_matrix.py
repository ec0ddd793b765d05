"""Serving benchmark matrix (engine v2): loraplex beside its peers, in one run, on one model.

For one model shape (the embedded base, a random-init SmolLM2-135M or 1B Llama shape), with
16 clients each sending its share of 64 requests of 32 new tokens (ignore_eos: same work
everywhere), in this order (one thing runs at a time):

  in-process   the torch engine: base alone; every request on its own adapter over 1, 8 and 16
               distinct adapters (rank 16); 8 adapters at ranks 8 and 64; naive PEFT set_adapter
  served       `loraplex serve` from outside (Ray Serve gRPC unary, gRPC stream, HTTP SSE), 8 adapters,
               and gRPC base alone: served / in-process at the same concurrency
  vllm         vLLM's CPU engine with enable_lora (in .venv-vllm: `make setup-vllm`), same model and
               adapter files, base alone and 8 adapters
  llama-server llama.cpp's own server (built from the llama-cpp-python sdist), the base as Q4_0 GGUF and
               the adapters as GGUF LoRAs from `convert`, each request choosing its adapter
  zipf         512 adapters on disk, Zipf(1.0) popularity, 16 slots: tokens/s against the 8-adapter
               case, time to first token for resident and cold adapters, slot / host-tier hit rates

Prints a table, writes JSON and a PNG bar chart beside it.

    python benchmarks/serve_matrix.py [--shape smollm2-135m] [--skip vllm,llama-server,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import PROMPTS, random_adapter, run_engine, run_naive_peft  # noqa: E402

SECTIONS = ("in-process", "ranks", "naive", "served", "vllm", "llama-server", "zipf")


def _jobs(ids: list[str], requests: int) -> list[tuple[str, str]]:
    return [(PROMPTS[i % len(PROMPTS)], ids[i % len(ids)] if ids else "") for i in range(requests)]


def _engine(base_dir: Path, store: Path, clients: int, max_loras: int, adapter_dtype: str):
    from loraplex.serving.engine import EngineConfig, create_engine

    config = EngineConfig(
        base_model=str(base_dir),
        adapters=str(store),
        max_batch=clients,
        max_loras=max_loras,
        adapter_dtype=adapter_dtype,
    )
    return create_engine(config)


def in_process(args, base_dir: Path, store: Path, ids: dict[int, list[str]]) -> list[dict]:
    """The torch engine: base alone, 1/8/16 distinct adapters at the main rank, 8 at the other ranks."""
    rows = []
    engine = _engine(base_dir, store, args.clients, 16, args.adapter_dtype)
    try:
        main = ids[args.rank]
        run_engine(engine, _jobs(main[:16], args.clients), args.clients, 4, "warm-up")
        # base and 8 adapters alternate `repeats` times: the median of each (a shared machine drifts)
        pair = {"loraplex base": _jobs([], args.requests), "loraplex 8 adapters": _jobs(main[:8], args.requests)}
        runs = {name: [] for name in pair}
        for _ in range(args.repeats):
            for name, jobs in pair.items():
                runs[name].append(run_engine(engine, jobs, args.clients, args.max_tokens, name))
        for found in runs.values():
            middle = sorted(found, key=lambda r: r["tokens_per_s"])[len(found) // 2]
            rows.append({**middle, "runs_tokens_per_s": [r["tokens_per_s"] for r in found]})
        for distinct in (d for d in args.distinct if d != 8):
            jobs = _jobs(main[:distinct], args.requests)
            rows.append(run_engine(engine, jobs, args.clients, args.max_tokens, f"loraplex {distinct} adapters"))
        for rank in (r for r in args.ranks if r != args.rank and "ranks" not in args.skip):
            jobs = _jobs(ids[rank][: args.adapters], args.requests)
            run_engine(engine, jobs[: args.clients], args.clients, 4, "warm-up")
            rows.append(run_engine(engine, jobs, args.clients, args.max_tokens, f"loraplex 8 adapters rank {rank}"))
    finally:
        engine.shutdown()
    return rows


def served_path(args, base_dir: Path, store: Path, ids: list[str]) -> list[dict]:
    from benchmarks.served_load import KINDS, run_served, served

    rows = []
    with served(base_dir, store, args.clients, 16, adapter_dtype=args.adapter_dtype) as ports:
        jobs = _jobs(ids[: args.adapters], args.requests)
        run_served("grpc", ports, jobs[: args.clients], args.clients, 4, "warm-up")
        rows.append(
            run_served("grpc", ports, _jobs([], args.requests), args.clients, args.max_tokens, "served base grpc")
        )
        for kind in KINDS:
            rows.append(run_served(kind, ports, jobs, args.clients, args.max_tokens, f"served 8 adapters {kind}"))
    return rows


def vllm_cpu(args, base_dir: Path, store: Path) -> list[dict]:
    """serve_bench.py on the vLLM engine, in vLLM's own venv, on the same adapter files."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        raise RuntimeError("vLLM's CPU build is not installed: run `make setup-vllm` (or --skip vllm)")
    out = Path(tempfile.mkdtemp()) / "vllm.json"
    command = [
        str(python),
        str(ROOT / "benchmarks" / "serve_bench.py"),
        *("--engine", "vllm", "--base-model", str(base_dir), "--adapter-store", str(store)),
        *("--adapter-prefix", f"r{args.rank}-"),
        *("--adapters", str(args.adapters), "--rank", str(args.rank), "--clients", str(args.clients)),
        *("--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--naive-requests", "0"),
        *("--out", str(out)),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    results = json.loads(out.read_text())["results"]
    names = {"base alone": "vLLM-CPU base", "loraplex": "vLLM-CPU 8 adapters"}
    return [{**r, "mode": names[r["mode"]]} for r in results if r["mode"] in names]


def llama_server(args, base_dir: Path, store: Path, ids: list[str]) -> list[dict]:
    from benchmarks.llama_server_peer import build_llama_server, export_for_llama, run_llama_server

    binary = build_llama_server()
    chosen = {adapter_id: store / adapter_id for adapter_id in ids[: args.adapters]}
    model, loras = export_for_llama(base_dir, chosen, store.parent / "gguf")
    jobs = [(prompt, None) for prompt, _ in _jobs([], args.requests)]
    rows = [run_llama_server(binary, model, loras, jobs, args.clients, args.max_tokens, "llama-server base")]
    jobs = [(PROMPTS[i % len(PROMPTS)], i % len(loras)) for i in range(args.requests)]
    rows.append(run_llama_server(binary, model, loras, jobs, args.clients, args.max_tokens, "llama-server 8 adapters"))
    return rows


def zipf(args, base_dir: Path, store: Path, ids: list[str]) -> list[dict]:
    from benchmarks.zipf_load import clone_adapters, run_with_ttft, zipf_jobs

    zipf_store = store.parent / f"zipf-{args.rank}"
    many = clone_adapters(store / ids[0], zipf_store, args.zipf_adapters)
    engine = _engine(base_dir, zipf_store, args.clients, 16, args.adapter_dtype)
    try:
        eight = _jobs(many[: args.adapters], args.zipf_requests)  # the 8 most popular, all resident
        run_engine(engine, eight[: args.clients], args.clients, 4, "warm-up")
        rows = [run_with_ttft(engine, eight, args.clients, args.max_tokens, "zipf baseline: 8 adapters")]
        before = dict(engine.store.counts)
        jobs = zipf_jobs(PROMPTS, many, args.zipf_requests)
        row = run_with_ttft(engine, jobs, args.clients, args.max_tokens, f"zipf {args.zipf_adapters} adapters")
        counts = {k: engine.store.counts[k] - before[k] for k in before}
        total = sum(counts.values()) or 1
        row |= {
            **counts,
            "slot_hit_rate": counts["slot_hits"] / total,
            "host_hit_rate": counts["host_hits"] / total,
            "distinct": len({a for _, a in jobs}),
        }
        rows.append(row)
    finally:
        engine.shutdown()
    return rows


def ratios(rows: list[dict]) -> dict:
    tps = {r["mode"]: r["tokens_per_s"] for r in rows}
    pairs = {
        "mixed / base (8 adapters)": ("loraplex 8 adapters", "loraplex base"),
        "mixed / base (16 adapters)": ("loraplex 16 adapters", "loraplex base"),
        "loraplex / naive PEFT": ("loraplex 8 adapters", "naive PEFT switching"),
        "served grpc / in-process (8 adapters)": ("served 8 adapters grpc", "loraplex 8 adapters"),
        "served grpc-stream / in-process": ("served 8 adapters grpc-stream", "loraplex 8 adapters"),
        "served http-sse / in-process": ("served 8 adapters http-sse", "loraplex 8 adapters"),
        "served base grpc / in-process base": ("served base grpc", "loraplex base"),
        "loraplex / vLLM-CPU (8 adapters)": ("loraplex 8 adapters", "vLLM-CPU 8 adapters"),
        "vLLM-CPU mixed / its base": ("vLLM-CPU 8 adapters", "vLLM-CPU base"),
        "served grpc / llama-server (8 adapters)": ("served 8 adapters grpc", "llama-server 8 adapters"),
        "llama-server mixed / its base": ("llama-server 8 adapters", "llama-server base"),
        "zipf 512 / 8 adapters": (next((m for m in tps if m.startswith("zipf 5")), ""), "zipf baseline: 8 adapters"),
    }
    return {name: tps[a] / tps[b] for name, (a, b) in pairs.items() if a in tps and b in tps}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    colors = [
        "tab:gray" if "base" in n else "tab:blue" if n.startswith(("loraplex", "served")) else "tab:orange"
        for n in names
    ]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("generated tokens/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=["embedded", "smollm2-135m", "llama-1b"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--distinct", default="1,8,16", help="distinct adapters per batch")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--naive-requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="in-process base and 8 adapters: median of this many")
    parser.add_argument("--zipf-adapters", type=int, default=512)
    parser.add_argument("--zipf-requests", type=int, default=128)
    parser.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "loraplex" / "bench")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/matrix-SHAPE.json)"
    )
    args = parser.parse_args()
    args.distinct = [int(d) for d in args.distinct.split(",")]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections in --skip: {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    out = args.out or ROOT / "benchmarks" / "results" / f"matrix-{args.shape}.json"

    from benchmarks.shapes import build_shape
    from loraplex.training.base import ensure_base

    work = args.work / args.shape
    base_dir = ensure_base() if args.shape == "embedded" else build_shape(args.shape, work / "model")
    store = work / "adapters"
    ranks = sorted({args.rank, *([] if "ranks" in args.skip else args.ranks)})
    count = max(16, args.adapters)
    ids = {}
    for rank in ranks:
        print(f"adapters: {count} at rank {rank} in {store}", flush=True)
        ids[rank] = [random_adapter(base_dir, store / f"r{rank}-{i}", i, rank).name for i in range(count)]

    rows: list[dict] = []
    failures: dict[str, str] = {}
    steps = [
        ("in-process", lambda: in_process(args, base_dir, store, ids)),
        (
            "naive",
            lambda: [
                run_naive_peft(
                    base_dir,
                    {i: store / i for i in ids[args.rank][: args.adapters]},
                    _jobs(ids[args.rank][: args.adapters], args.naive_requests),
                    args.max_tokens,
                )
            ],
        ),
        ("served", lambda: served_path(args, base_dir, store, ids[args.rank])),
        ("vllm", lambda: vllm_cpu(args, base_dir, store)),
        ("llama-server", lambda: llama_server(args, base_dir, store, ids[args.rank])),
        ("zipf", lambda: zipf(args, base_dir, store, ids[args.rank])),
    ]
    for section, step in steps:
        if section in args.skip:
            continue
        print(f"== {section}", flush=True)
        try:
            section_rows = step()
        except Exception as exc:  # one peer failing leaves the others' numbers standing
            print(f"   {section} failed: {type(exc).__name__}: {exc}", flush=True)
            failures[section] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        rows += [{**r, "section": section} for r in section_rows]
        for r in section_rows:
            print(f"   {r['mode']:<38}{r['tokens_per_s']:>9.1f} tok/s", flush=True)

    title = (
        f"{args.shape}: {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens, "
        f"rank {args.rank}, {args.adapter_dtype} adapters, {os.cpu_count()} CPUs"
    )
    print(f"\n{title}")
    print(f"{'mode':<38}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'ttft p99':>10}")
    for r in rows:
        ttft = r.get("ttft_p99_s", r.get("ttft_resident_p99_s"))
        ttft_text = f"{ttft:>10.2f}" if ttft is not None else f"{'':>10}"
        print(f"{r['mode']:<38}{r['tokens_per_s']:>10.1f}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}{ttft_text}")
    found = ratios(rows)
    print()
    for name, value in found.items():
        print(f"{name:<44}{value:>8.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
    }
    out.write_text(
        json.dumps({"config": config, "title": title, "results": rows, "ratios": found, "failed": failures}, indent=2)
        + "\n"
    )
    plot(rows, title, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
