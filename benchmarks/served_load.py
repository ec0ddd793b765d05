"""The served path under load: the same jobs as the in-process engine, sent from outside through
`loraplex serve` (Ray Serve's gRPC and HTTP proxies, the Router, the ModelServer).

serve_matrix.py divides these tokens/s by the in-process engine's at the same concurrency: what
is lost is the path around the engine (proxies, the Router hop, serialization, client threads on
the same two cores).

Each run also records time to first token where it streams (gRPC stream, HTTP SSE).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.serve_bench import _percentile, _summary, run_clients

KINDS = ("grpc", "grpc-stream", "http-sse")


def free_port() -> int:
    """A loopback port nothing listens on now (Serve's ports here, llama-server's in llama_server_peer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(base_dir: Path, store: Path, max_batch: int, max_loras: int, **engine):
    """`loraplex serve` in this process's Ray (one ModelServer replica), yielding its (grpc, http) ports."""
    from loraplex.serving.launch import ServeOptions, start, stop

    options = ServeOptions(
        base_model=str(base_dir),
        adapters=str(store),
        allow_unauthenticated=True,
        max_batch=max_batch,
        max_loras=max_loras,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        **engine,
    )
    start(options)
    try:
        yield options.grpc_port, options.http_port
    finally:
        stop()


def _grpc_call(stub, prompt: str, adapter: str, max_tokens: int, stream: bool) -> tuple[int, float | None]:
    """One request: (completion tokens, seconds to its first text or None when unary)."""
    from loraplex.v1 import loraplex_pb2 as pb

    request = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    metadata = (("multiplexed_model_id", adapter),) if adapter else ()
    if not stream:
        return stub.Generate(request, metadata=metadata, timeout=600).completion_tokens, None
    started, first, last = time.perf_counter(), None, None
    for message in stub.GenerateStream(request, metadata=metadata, timeout=600):
        if first is None and message.text:
            first = time.perf_counter() - started
        last = message
    return last.completion_tokens, first


def _http_sse(client, prompt: str, adapter: str, max_tokens: int) -> tuple[int, float | None]:
    body = {
        "model": adapter or "base",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.read().decode()[:300]}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first


def run_served(
    kind: str, ports: tuple[int, int], jobs: list[tuple[str, str]], clients: int, max_tokens: int, name: str
) -> dict:
    """`clients` threads, each with its own channel or connection, sending its share of jobs in turn."""
    import grpc
    import httpx

    from loraplex.v1 import loraplex_pb2_grpc

    grpc_port, http_port = ports
    latencies, ttfts, tokens, errors, lock = [], [], [0], [], threading.Lock()

    def client(share):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = loraplex_pb2_grpc.LoraplexServiceStub(channel)
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600)
        try:
            for prompt, adapter in share:
                started = time.perf_counter()
                try:
                    if kind == "http-sse":
                        count, first = _http_sse(http, prompt, adapter, max_tokens)
                    else:
                        count, first = _grpc_call(stub, prompt, adapter, max_tokens, kind == "grpc-stream")
                except Exception as exc:  # counted and shown: a benchmark that drops requests says so
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens[0] += count
                    if first is not None:
                        ttfts.append(first)
        finally:
            channel.close()
            http.close()

    seconds = run_clients(client, jobs, clients)
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} of {len(jobs)} requests failed, first: {errors[0]}")
    result = _summary(name, latencies, tokens[0], seconds)
    if ttfts:
        result |= {"ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99)}
    return result
