"""llama.cpp's own llama-server as a peer of the loraplex engine: same model, same LoRA adapters.

serve_bench.py compares loraplex with a base-only ceiling and with naive PEFT switching; this puts
the reference C++ server beside them. The base goes out as a Q4_0 GGUF and every adapter as a GGUF
LoRA through the project's own exporters (convert/). llama-server loads every adapter and each
request sends every adapter's scale: 1.0 for its own, 0 for the rest (a zero-scale adapter costs
nothing); "base alone" runs on a server started without adapters. llama-server batches only slots
whose LoRA set is equal: a mixed step runs one adapter's slots at a time, the others wait.

The binary is built once (minutes) from the llama.cpp that the llama-cpp-python sdist vendors, at
the installed version, and kept in ~/.cache/loraplex/llama-server/<version>/bin/llama-server.

    python benchmarks/llama_server_peer.py [--clients 16] [--adapters 8] [--requests 64] [--max-tokens 32] [--rank 16]
                                           [--shape smollm2-135m | --base-model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHE = Path.home() / ".cache" / "loraplex" / "llama-server"
# portable CPU flags as in the Makefile (AMX off); no web UI download, no HTTPS, one static binary
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON"
    " -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
    " -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF"
).split()


def _log(message: str) -> None:
    print(f"[llama-server] {message}", flush=True)


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def _vendored_llama_cpp(version: str, tmp: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, extracted under `tmp`."""
    _log(f"downloading the llama-cpp-python=={version} sdist")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"]
    subprocess.run([*cmd, "--no-binary", ":all:", "--no-deps", "-q", "-d", str(tmp)], check=True)
    sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(tmp, members=members, filter="data")
    return next(tmp.glob("*/vendor/llama.cpp"))


def build_llama_server(version: str | None = None) -> Path:
    """The llama-server binary of the installed llama-cpp-python's llama.cpp, built on first use."""
    version = version or llama_cpp_version()
    binary = CACHE / version / "bin" / "llama-server"
    if binary.is_file():
        return binary
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        src, build = _vendored_llama_cpp(version, Path(tmp)), Path(tmp) / "build"
        _log(f"cmake configure {' '.join(CMAKE_FLAGS)}")
        subprocess.run(["nice", "-n", "10", "cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
        _log("cmake build --target llama-server (takes minutes)")
        jobs = f"-j{os.cpu_count() or 2}"
        subprocess.run(
            ["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama-server", jobs], check=True
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.replace(binary)
    _log(f"built {binary} in {time.perf_counter() - started:.0f} s")
    return binary


def _write_once(out: Path, write) -> Path:
    """Call write(partial path) unless `out` exists; a crash leaves no half file under the final name."""
    if not out.is_file():
        partial = out.with_name(out.name + ".partial")
        write(partial)
        partial.replace(out)
        _log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def export_for_llama(
    base_dir: Path, adapter_dirs: dict[str, Path], out_dir: Path, quant: str = "q4_0"
) -> tuple[Path, list[Path]]:
    """The base as a GGUF and each adapter as a GGUF LoRA, in `adapter_dirs` order; existing files are kept."""
    from loraplex.convert.gguf_export import write_gguf
    from loraplex.convert.gguf_lora import write_gguf_lora
    from loraplex.convert.merge import check_adapter_matches_base

    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = lambda _: None
    model = _write_once(out_dir / f"base-{quant.lower()}.gguf", lambda p: write_gguf(base_dir, p, quant.upper(), quiet))
    loras = []
    for name, folder in adapter_dirs.items():
        check_adapter_matches_base(base_dir, folder, False)
        loras.append(_write_once(out_dir / f"{name}.gguf", lambda p, f=folder: write_gguf_lora(base_dir, f, p, quiet)))
    return model, loras


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def llama_server(
    binary: Path, model_gguf: Path, lora_ggufs: list[Path], slots: int, ctx_per_slot: int = 512, timeout: float = 300
) -> Iterator[str]:
    """A running llama-server (its base URL), killed on exit; continuous batching is its default."""
    from benchmarks.served_load import free_port

    fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    port, log = free_port(), Path(log)
    cmd = [str(binary), "-m", str(model_gguf), *(a for f in lora_ggufs for a in ("--lora", str(f)))]
    cmd += ["--lora-init-without-apply", "--parallel", str(slots), "-c", str(slots * ctx_per_slot)]
    cmd += ["--threads", str(os.cpu_count() or 2), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    cmd += ["--cache-ram", "0"]  # every request pays its prompt, as in the loraplex engine
    proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not ready after {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


def complete(client: httpx.Client, url: str, prompt: str, adapter: int | None, n_loras: int, max_tokens: int) -> dict:
    """One greedy /completion of exactly max_tokens tokens on one adapter (None: the base alone)."""
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    # every scale explicit: an empty "lora" means the startup scales, which are 1.0 for every --lora
    # even with --lora-init-without-apply (that flag only skips applying them once at startup)
    body["lora"] = [{"id": i, "scale": float(i == adapter)} for i in range(n_loras)]
    response = client.post(f"{url}/completion", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


def _run_jobs(client, url: str, jobs, n_loras: int, clients: int, max_tokens: int) -> tuple[list[float], int, float]:
    """`clients` threads, each sending its share of jobs one after another."""
    from benchmarks.serve_bench import run_clients

    latencies, tokens, lock = [], [0], threading.Lock()

    def worker(share):
        for prompt, adapter in share:
            t0 = time.perf_counter()
            result = complete(client, url, prompt, adapter, n_loras, max_tokens)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += result.get("tokens_predicted") or result["timings"]["predicted_n"]

    seconds = run_clients(worker, jobs, clients)
    if len(latencies) != len(jobs):
        raise RuntimeError(f"{len(jobs) - len(latencies)} of {len(jobs)} requests failed (see the traceback above)")
    return latencies, tokens[0], seconds


def run_llama_server(
    binary: Path,
    model_gguf: Path,
    lora_ggufs: list[Path],
    jobs: list[tuple[str, int | None]],
    clients: int,
    max_tokens: int,
    name: str,
) -> dict:
    """Serve `jobs` (prompt, adapter index or None) from `clients` concurrent clients; serve_bench's summary."""
    from benchmarks.serve_bench import _summary

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    with llama_server(binary, model_gguf, lora_ggufs, clients) as url, httpx.Client(limits=limits) as client:
        _run_jobs(client, url, jobs[:clients], len(lora_ggufs), clients, 4)  # warm-up, not timed
        latencies, tokens, elapsed = _run_jobs(client, url, jobs, len(lora_ggufs), clients, max_tokens)
    return _summary(name, latencies, tokens, elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--shape", choices=["smollm2-135m", "llama-1b"], help="random-init model of this shape")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llama_server.json"))
    args = parser.parse_args()

    from benchmarks.serve_bench import PROMPTS
    from loraplex.training.base import ensure_base
    from loraplex.training.random_adapter import make_random_adapter

    base_dir = args.base_model or ensure_base()
    if args.shape:
        from benchmarks.shapes import build_shape

        base_dir = build_shape(args.shape, Path(tempfile.gettempdir()) / f"loraplex-shape-{args.shape}")
    binary = build_llama_server()
    # GGUFs are cached per base folder and rank (adapter i is always seed i)
    key = hashlib.sha1(str(Path(base_dir).resolve()).encode()).hexdigest()[:8]
    gguf_dir = Path(tempfile.gettempdir()) / f"loraplex-llama-peer-{Path(base_dir).name}-{key}-r{args.rank}"
    store = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    adapter_dirs = {
        f"bench-{i}": make_random_adapter(base_dir, store / f"bench-{i}", seed=i, rank=args.rank)
        for i in range(args.adapters)
    }
    model, loras = export_for_llama(base_dir, adapter_dirs, gguf_dir)
    jobs = [(PROMPTS[i % len(PROMPTS)], i % args.adapters) for i in range(args.requests)]
    base_jobs = [(prompt, None) for prompt, _ in jobs]
    results = [
        run_llama_server(binary, model, [], base_jobs, args.clients, args.max_tokens, "llama-server base alone"),
        run_llama_server(binary, model, loras, jobs, args.clients, args.max_tokens, "llama-server mixed"),
    ]
    print(f"\n{args.clients} clients over {args.adapters} adapters, {args.max_tokens} new tokens, Q4_0 {base_dir}")
    print(f"{'mode':<26}{'requests':>9}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}")
    for r in results:
        print(f"{r['mode']:<26}{r['requests']:>9}{r['tokens_per_s']:>10.1f}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}")
    report = {
        "config": {k: str(v) for k, v in vars(args).items()} | {"base_dir": str(base_dir), "binary": str(binary)},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
