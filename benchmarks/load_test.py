"""Loopback load test: N clients x M requests over 8 adapters, over gRPC and HTTP (unary and
streaming), with auth on, optionally killing a ModelServer replica midway. Bounded in count and
time; stops by itself.

Over 400 lines: four client surfaces, the answer checks and the table live together in one script.

Every answer is checked: its request ID and adapter ID must be the ones sent, and its text must
equal that adapter's answer to that prompt measured alone before the load (greedy decoding is
batch-invariant, and the 8 adapters answer differently). Nothing may be lost or duplicated; only
requests in flight when the replica died may fail, each with UNAVAILABLE / 503.

    python benchmarks/load_test.py [--clients 16] [--requests 2000] [--kill-at 0.5] [--replicas 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("grpc", "grpc-stream", "http", "http-stream")
# checks that must be 0 for a run to pass (the table prints "ok" and "failed" beside them)
MUST_BE_ZERO = (
    "lost",
    "duplicated",
    "wrong_request_id",
    "wrong_adapter",
    "wrong_text",
    "inconsistent_stream",
    "unclean_failures",
    "failed_outside_kill",
)
PROMPTS = [
    "Write a sentence about the red cat:\n",
    "Month number 7 is called\n",
    "First word of: bread lamp door\n",
    "Ticket: printer on fire\n",
]


@dataclass
class Outcome:
    request_id: str
    kind: str
    adapter: str
    prompt: int
    sent: float
    ended: float = 0.0
    status: str = ""  # "OK", or the gRPC code / HTTP status of the failure
    detail: str = ""
    got_request_id: str = ""
    got_adapter: str = ""
    text: str = ""
    replica: str = ""


@dataclass
class LoadResult:
    issued: int
    outcomes: list[Outcome]
    expected: dict
    kill_time: float | None
    killed: str | None
    started: float
    seconds: float
    checks: dict = field(default_factory=dict)


def prepare_store(root: Path, base_dir: Path) -> tuple[list[str], dict[str, str], Path]:
    """8 adapters (the 3 demo tenants + 5 random ones), one API key each; returns IDs, keys, key file."""
    from loraplex.serving.auth import add_key
    from loraplex.training.demo import demo_adapter_dir, demo_tenants
    from loraplex.training.random_adapter import make_random_adapter

    store = root / "store"
    store.mkdir(parents=True)
    adapters = list(demo_tenants())
    for tenant in adapters:
        shutil.copytree(demo_adapter_dir(tenant), store / tenant)
    for i in range(8 - len(adapters)):
        make_random_adapter(base_dir, store / f"tenant-{i}", seed=100 + i, rank=8, std=0.2)
        adapters.append(f"tenant-{i}")
    key_file = root / "keys.yaml"
    keys = {adapter: add_key(key_file, adapter, [adapter]) for adapter in adapters}
    return adapters, keys, key_file


class Client:
    """One load client: a request of any kind, with its checks' raw material recorded."""

    def __init__(self, grpc_port: int, http_port: int) -> None:
        import grpc
        import httpx

        from loraplex.v1 import loraplex_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = loraplex_pb2_grpc.LoraplexServiceStub(self.channel)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120)

    def close(self) -> None:
        self.channel.close()
        self.http.close()

    def run(self, outcome: Outcome, prompt: str, key: str, max_tokens: int) -> Outcome:
        import grpc

        try:
            if outcome.kind.startswith("grpc"):
                self._grpc(outcome, prompt, key, max_tokens)
            else:
                self._http(outcome, prompt, key, max_tokens)
        except grpc.RpcError as exc:
            outcome.status, outcome.detail = exc.code().name, exc.details() or ""
        except Exception as exc:  # a transport failure is an outcome too, never a lost request
            outcome.status, outcome.detail = type(exc).__name__, str(exc)
        outcome.ended = time.time()
        return outcome

    def _grpc(self, outcome: Outcome, prompt: str, key: str, max_tokens: int) -> None:
        from loraplex.v1 import loraplex_pb2 as pb

        request = pb.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, request_id=outcome.request_id
        )
        md = (("multiplexed_model_id", outcome.adapter), ("authorization", f"Bearer {key}"))
        if outcome.kind == "grpc":
            reply = self.stub.Generate(request, metadata=md, timeout=120)
            final, text = reply, reply.text
        else:
            messages = list(self.stub.GenerateStream(request, metadata=md, timeout=120))
            final, text = messages[-1], "".join(m.text for m in messages)
            if any(m.request_id != final.request_id for m in messages):
                outcome.detail = "request IDs differ inside one stream"
        outcome.status, outcome.text = "OK", text
        outcome.got_request_id, outcome.got_adapter, outcome.replica = (
            final.request_id,
            final.adapter_id,
            final.replica_id,
        )

    def _http(self, outcome: Outcome, prompt: str, key: str, max_tokens: int) -> None:
        body = {
            "model": outcome.adapter,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": outcome.kind == "http-stream",
        }
        headers = {"authorization": f"Bearer {key}", "x-request-id": outcome.request_id}
        if outcome.kind == "http":
            reply = self.http.post("/v1/completions", json=body, headers=headers)
            data = reply.json()
            if reply.status_code != 200:
                outcome.status, outcome.detail = str(reply.status_code), data["error"]["message"]
                return
            outcome.status, outcome.text = "OK", data["choices"][0]["text"]
            outcome.got_request_id, outcome.got_adapter, outcome.replica = (
                data["id"],
                data["model"],
                data["system_fingerprint"],
            )
            return
        with self.http.stream("POST", "/v1/completions", json=body, headers=headers) as reply:
            if reply.status_code != 200:
                outcome.status, outcome.detail = str(reply.status_code), reply.read().decode()[:300]
                return
            events = [
                json.loads(line[6:])
                for line in reply.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
        errors = [e["error"] for e in events if "error" in e]
        if errors:  # the stream had started: the failure comes in band, as OpenAI sends it
            outcome.status, outcome.detail = str(errors[0]["code"]), errors[0]["message"]
            return
        if len({e["id"] for e in events}) != 1 or len({e["model"] for e in events}) != 1:
            outcome.detail = "IDs differ inside one stream"
        outcome.status, outcome.text = "OK", "".join(e["choices"][0]["text"] for e in events)
        outcome.got_request_id, outcome.got_adapter, outcome.replica = (
            events[-1]["id"],
            events[-1]["model"],
            events[-1]["system_fingerprint"],
        )


def expected_answers(
    grpc_port: int, http_port: int, adapters: list[str], keys: dict[str, str], max_tokens: int
) -> dict[tuple[str, int], str]:
    """Each adapter's answer to each prompt, one request at a time (no batch around it)."""
    client = Client(grpc_port, http_port)
    try:
        answers = {}
        for adapter, (i, prompt) in itertools.product(adapters, enumerate(PROMPTS)):
            outcome = client.run(
                Outcome(uuid.uuid4().hex, "grpc", adapter, i, time.time()), prompt, keys[adapter], max_tokens
            )
            if outcome.status != "OK":
                raise RuntimeError(f"solo request for {adapter} failed: {outcome.status} {outcome.detail}")
            answers[(adapter, i)] = outcome.text
        return answers
    finally:
        client.close()


def model_server_replicas() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "ModelServer" in a["name"] and a["namespace"] == "serve"
    ]


def run_load(
    grpc_port: int,
    http_port: int,
    adapters: list[str],
    keys: dict[str, str],
    *,
    clients: int = 16,
    requests: int = 2000,
    max_tokens: int = 6,
    kill_at: float | None = 0.5,
    time_limit: float = 900,
    progress: bool = True,
) -> LoadResult:
    """The load itself: `clients` threads share `requests`; at `kill_at` of them one replica is killed."""
    import ray

    expected = expected_answers(grpc_port, http_port, adapters, keys, max_tokens)
    counter, lock = itertools.count(), threading.Lock()
    outcomes: list[Outcome] = []
    done = Counter()
    kill = {"time": None, "name": None}
    started = time.time()

    def killer_due() -> bool:
        return kill_at is not None and kill["time"] is None and done["n"] >= kill_at * requests

    def worker(index: int) -> None:
        client = Client(grpc_port, http_port)
        try:
            while time.time() - started < time_limit:
                n = next(counter)
                if n >= requests:
                    return
                adapter, prompt = adapters[n % len(adapters)], (n // len(adapters)) % len(PROMPTS)
                outcome = Outcome(
                    f"load-{n:05d}-{uuid.uuid4().hex[:8]}", KINDS[(n // 7) % len(KINDS)], adapter, prompt, time.time()
                )
                with lock:
                    outcomes.append(outcome)
                client.run(outcome, PROMPTS[prompt], keys[adapter], max_tokens)
                with lock:
                    done["n"] += 1
                    if killer_due():
                        kill["time"], kill["name"] = time.time(), model_server_replicas()[0]
                        ray.kill(ray.get_actor(kill["name"], namespace="serve"), no_restart=True)
                        if progress:
                            print(f"  killed replica {kill['name']} after {done['n']} requests", flush=True)
                    if progress and done["n"] % 250 == 0:
                        print(f"  {done['n']}/{requests} done, {time.time() - started:.0f}s", flush=True)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(time_limit + 180)
    result = LoadResult(
        len(outcomes),
        outcomes,
        {f"{a}|{p}": t for (a, p), t in expected.items()},
        kill["time"],
        kill["name"],
        started,
        time.time() - started,
    )
    result.checks = check(result, expected)
    return result


def check(result: LoadResult, expected: dict[tuple[str, int], str]) -> dict:
    """Lost, duplicated, mismatched and unclean outcomes (all must be zero), and the failures."""
    ok = [o for o in result.outcomes if o.status == "OK"]
    failed = [o for o in result.outcomes if o.status != "OK"]
    ids = Counter(o.got_request_id for o in ok)
    in_flight = lambda o: result.kill_time is not None and o.sent <= result.kill_time <= o.ended
    distinct = [len({expected[(a, p)] for a in {k[0] for k in expected}}) for p in range(len(PROMPTS))]
    return {
        "requests": result.issued,
        "ok": len(ok),
        "failed": len(failed),
        "lost": sum(1 for o in result.outcomes if not o.status),
        "duplicated": sum(n - 1 for n in ids.values() if n > 1),
        "wrong_request_id": sum(o.got_request_id != o.request_id for o in ok),
        "wrong_adapter": sum(o.got_adapter != o.adapter for o in ok),
        "wrong_text": sum(o.text != expected[(o.adapter, o.prompt)] for o in ok),
        "inconsistent_stream": sum(bool(o.detail) for o in ok),
        "unclean_failures": sum(o.status not in ("UNAVAILABLE", "503") for o in failed),
        "failed_outside_kill": sum(not in_flight(o) for o in failed),
        "failures": Counter(f"{o.kind}: {o.status}" for o in failed),
        "replicas_seen": sorted({o.replica for o in ok}),
        "distinct_answers_per_prompt": distinct,
        "adapters": len({o.adapter for o in result.outcomes}),
        "by_kind": Counter(o.kind for o in result.outcomes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of requests done; negative: no kill")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; no new requests after this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args(argv)

    from loraplex.serving.launch import ServeOptions, start, stop
    from loraplex.training.base import ensure_base
    from tests.conftest import free_port

    base_dir = ensure_base()
    with tempfile.TemporaryDirectory() as tmp:
        adapters, keys, key_file = prepare_store(Path(tmp), base_dir)
        options = ServeOptions(
            base_model=str(base_dir),
            adapters=str(Path(tmp) / "store"),
            api_keys=str(key_file),
            replicas=args.replicas,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            max_batch=16,
        )
        start(options)
        try:
            result = run_load(
                options.grpc_port,
                options.http_port,
                adapters,
                keys,
                clients=args.clients,
                requests=args.requests,
                max_tokens=args.max_tokens,
                kill_at=args.kill_at if args.kill_at >= 0 else None,
                time_limit=args.time_limit,
            )
        finally:
            stop()
    checks = result.checks
    print(
        f"\n{checks['requests']} requests, {args.clients} clients, {checks['adapters']} adapters, "
        f"{args.replicas} replicas, {result.seconds:.0f}s ({checks['requests'] / result.seconds:.1f} req/s)"
        + (f"; a replica killed at {result.kill_time - result.started:.0f}s" if result.kill_time else "")
    )
    print("| check | count |\n|---|---|")
    for name in ("ok", "failed", *MUST_BE_ZERO):
        print(f"| {name} | {checks[name]} |")
    print(
        f"failures: {dict(checks['failures'])}; by kind: {dict(checks['by_kind'])}; "
        f"distinct answers per prompt (of 8): {checks['distinct_answers_per_prompt']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "checks": checks,
                "seconds": result.seconds,
                "killed": result.killed,
                "outcomes": [asdict(o) for o in result.outcomes],
            },
            indent=1,
            default=str,
        )
    )
    bad = sum(checks[k] for k in MUST_BE_ZERO)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
