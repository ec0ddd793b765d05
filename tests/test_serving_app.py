"""A real Ray Serve app on loopback, driven by a real gRPC channel and the `openai` client.

Every test runs on the torch engine and, where vllm is installed (`make test-vllm`), once more on
`--engine vllm` (vLLM's CPU build serves the base in bf16).
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from loraplex.training.data import load_jsonl
from loraplex.training.demo import demo_adapter_dir, demo_tenants, tenant_data
from loraplex.training.evaluate import is_exact_match
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _vllm_missing() -> str | None:
    from loraplex.serving.engine.vllm_args import vllm_unavailable_reason

    return vllm_unavailable_reason("nf4")


ENGINES = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "vllm",
        id="vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(_vllm_missing() is not None, reason=f"vllm engine: {_vllm_missing()}"),
        ],
    ),
]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, embedded_base, tmp_path_factory):
    from loraplex.serving.launch import ServeOptions, start, stop

    store = tmp_path_factory.mktemp("store")
    for tenant in demo_tenants():
        shutil.copytree(demo_adapter_dir(tenant), store / tenant)
    options = ServeOptions(
        base_model=str(embedded_base),
        adapters=str(store),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        num_cpus=2,
        max_batch=16,
        allow_unauthenticated=True,  # auth has its own tests (test_hardening.py)
        engine=request.param,
    )
    start(options)
    yield options, store
    stop()


@pytest.fixture(scope="module")
def stub(server):
    from loraplex.v1 import loraplex_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server[0].grpc_port}")
    yield loraplex_pb2_grpc.LoraplexServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0].http_port}/v1", api_key="unused", max_retries=0)


def grpc_generate(stub, prompt: str, adapter: str, **fields):
    from loraplex.v1 import loraplex_pb2 as pb

    request = pb.GenerateRequest(prompt=prompt, max_tokens=fields.pop("max_tokens", 8), temperature=0, **fields)
    return stub.Generate(request, metadata=(("multiplexed_model_id", adapter),), timeout=120)


def score(answer, rows: list[dict]) -> float:
    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(answer, [r["prompt"] for r in rows]))
    return sum(is_exact_match(o, r["completion"]) for o, r in zip(outputs, rows)) / len(rows)


@pytest.mark.parametrize("tenant", demo_tenants())
def test_tenant_bar_over_grpc_and_http(tenant, stub, openai_client):
    rows = load_jsonl(tenant_data(tenant)[1])
    over_grpc = score(lambda p: grpc_generate(stub, p, tenant).text, rows)
    over_http = score(
        lambda p: openai_client.completions.create(model=tenant, prompt=p, max_tokens=8, temperature=0).choices[0].text,
        rows,
    )
    base = score(lambda p: grpc_generate(stub, p, "").text, rows)
    print(f"{tenant}: grpc {over_grpc:.2f} http {over_http:.2f} base {base:.2f}")
    assert over_grpc >= 0.90 and over_http >= 0.90
    assert base <= 0.10


def test_stream_chunks_then_a_final_message(stub):
    from loraplex.v1 import loraplex_pb2 as pb

    tenant = demo_tenants()[0]
    prompt = load_jsonl(tenant_data(tenant)[1])[0]["prompt"]
    request = pb.GenerateRequest(prompt=prompt, max_tokens=8, temperature=0)
    messages = list(stub.GenerateStream(request, metadata=(("multiplexed_model_id", tenant),), timeout=60))
    assert messages[-1].finish_reason in ("stop", "length") and messages[-1].completion_tokens > 0
    assert all(m.finish_reason == "" for m in messages[:-1]) and len(messages) >= 2
    assert "".join(m.text for m in messages) == grpc_generate(stub, prompt, tenant).text
    assert messages[-1].adapter_id == tenant and messages[-1].request_id and messages[-1].adapter_version


def test_http_streaming_and_chat(openai_client):
    tenant = demo_tenants()[1]
    row = load_jsonl(tenant_data(tenant)[1])[0]
    chunks = list(
        openai_client.completions.create(model=tenant, prompt=row["prompt"], max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks).strip() == row["completion"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = openai_client.chat.completions.create(
        model="base", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Month number 3 is called"}]
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0


def test_models_lists_base_and_adapters(openai_client, server):
    models = {m.id: m for m in openai_client.models.list().data}
    assert {"base", *demo_tenants()} <= set(models)
    base = models["base"].model_extra
    if server[0].engine == "vllm" and base["precision"] != server[0].quantization:
        # vLLM's CPU build has no NF4: the base is served in bf16, and /v1/models says so
        assert (server[0].quantization, base["precision"]) == ("nf4", "bf16") and "NF4" in base["precision_note"]
    else:
        assert base["precision"] == server[0].quantization and base["precision_note"] == ""
    assert {models[t].model_extra["provenance"] for t in demo_tenants()} == {"trained"}  # not "imported"


def test_unknown_adapter_is_not_found(stub, openai_client):
    import openai

    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(stub, "hello\n", "no-such-tenant")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-tenant" in err.value.details()
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="no-such-tenant", prompt="hello\n", max_tokens=4)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"prompt": ""}, "empty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"prompt": "word " * 200, "max_tokens": 100}, "exceeds the context"),
    ],
)
def test_invalid_params_get_invalid_argument_and_400(stub, openai_client, fields, reason):
    import openai

    from loraplex.v1 import loraplex_pb2 as pb

    request = pb.GenerateRequest(**{"prompt": "hello\n", "max_tokens": 4, **fields})
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
    body = {"prompt": "hello\n", "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError, match=reason):
        openai_client.completions.create(model="base", **body)


def test_adapter_copied_in_after_start_is_served_without_restart(server, stub):
    _, store = server
    tenant = demo_tenants()[2]
    staging = store / ".incoming"
    shutil.copytree(demo_adapter_dir(tenant), staging)
    staging.rename(store / "late-tenant")
    row = load_jsonl(tenant_data(tenant)[1])[0]
    assert is_exact_match(grpc_generate(stub, row["prompt"], "late-tenant").text, row["completion"])


def test_admin_rpcs(stub):
    from loraplex.v1 import loraplex_pb2 as pb

    tenant = demo_tenants()[0]
    listing = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    assert {a.adapter_id for a in listing.adapters} >= set(demo_tenants())
    assert {a.provenance for a in listing.adapters if a.adapter_id in demo_tenants()} == {"trained"}
    assert listing.base_fingerprint.startswith("sha256:")
    md = (("multiplexed_model_id", tenant),)
    assert stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=tenant), metadata=md, timeout=30).adapter.resident
    assert stub.PinAdapter(pb.PinAdapterRequest(adapter_id=tenant, pinned=True), metadata=md, timeout=30).adapter.pinned
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=tenant), metadata=md, timeout=30).was_resident
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="../etc"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server[0].grpc_port}")
    health = serve_pb2_grpc.RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest(), timeout=10)
    assert health.message == "success"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    standard = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert standard.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "loraplex.v1.LoraplexService" in services
    channel.close()


def test_prometheus_metrics_per_adapter(server, stub):
    tenant = demo_tenants()[0]
    grpc_generate(stub, "hello\n", tenant)
    url = f"http://127.0.0.1:{server[0].http_port}/metrics"
    names = (
        "loraplex_requests_total",
        "loraplex_generated_tokens_total",
        "loraplex_prompt_tokens_total",
        "loraplex_request_latency_seconds_bucket",
        "loraplex_time_to_first_token_seconds",
        "loraplex_batch_size",
        "loraplex_adapter_loads_total",
        "loraplex_adapters_resident",
    )
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # Ray exports each series on its own schedule: wait for all of them
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if f'adapter="{tenant}"' in text and all(name in text for name in names):
            break
        time.sleep(3)
    for name in names:
        assert name in text, name
    assert f'adapter="{tenant}"' in text and 'code="OK"' in text
