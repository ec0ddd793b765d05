"""Issue #5 on a real Ray Serve app with auth on: keys, tenant walls, hostile adapters, limits,
deadlines, cancellation, a killed replica and a graceful drain, over real gRPC and HTTP.

Over 400 lines: every test here shares one live app with auth on (starting one costs ~20 s)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.training.data import load_jsonl
from loraplex.training.demo import demo_adapter_dir, tenant_data
from loraplex.training.evaluate import is_exact_match
from tests.conftest import free_port

pytestmark = pytest.mark.slow

ACME, GLOBEX, INITECH = "acme-fiscal", "globex-routing", "initech-tickets"
LONG = 200  # max_tokens of a request that is still running when the test acts on it


@pytest.fixture(scope="module")
def server(embedded_base, tmp_path_factory):
    from loraplex.serving.auth import add_key
    from loraplex.serving.launch import ServeOptions, start, stop

    store, outside = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("outside")
    for tenant in (ACME, GLOBEX, INITECH):
        shutil.copytree(demo_adapter_dir(tenant), store / tenant)
    shutil.copytree(demo_adapter_dir(GLOBEX), store / "bad-pickle")
    (store / "bad-pickle" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.loads would run it
    shutil.copytree(demo_adapter_dir(GLOBEX), outside / "evil")
    os.symlink(outside / "evil", store / "bad-symlink")
    shutil.copytree(demo_adapter_dir(GLOBEX), store / "bad-truncated")
    weights = store / "bad-truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    shutil.copytree(demo_adapter_dir(INITECH), store / "rotting")
    marker = tmp_path_factory.mktemp("markers") / "code-ran"
    plant_code(store / "bad-pickle", store / "with-code", marker)

    key_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys = {
        "acme": add_key(key_file, "acme", [ACME]),
        "globex": add_key(key_file, "globex", [GLOBEX, ""]),
        "solo": add_key(key_file, "solo", [INITECH], max_concurrent=1),
        "capped": add_key(key_file, "capped", [INITECH], max_new_tokens=16, max_prompt_tokens=24),
        "any": add_key(key_file, "any", ["*"]),  # every adapter, but not admin
        "admin": add_key(key_file, "admin", [], admin=True),
    }
    assert all(key not in key_file.read_text() for key in keys.values())  # only hashes on disk
    options = ServeOptions(
        base_model=str(embedded_base),
        adapters=str(store),
        api_keys=str(key_file),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        num_cpus=2,
        max_batch=16,
        max_loras=6,  # not the default: the routing cap must follow it
    )
    start(options)
    yield options, store, keys, marker
    stop()


def plant_code(pickle_adapter, code_adapter, marker) -> None:
    """Payloads that would create `marker` if anything executed them: a pickle whose unpickling
    runs a command, and Python files with an `auto_map` pointing at them (as remote code does)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (pickle_adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    shutil.copytree(demo_adapter_dir(GLOBEX), code_adapter)
    for name in ("__init__.py", "adapter_model.py", "modeling_lora.py", "configuration_lora.py"):
        (code_adapter / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((code_adapter / "adapter_config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_lora.Model", "AutoConfig": "configuration_lora.Config"}
    (code_adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def stub(server):
    from loraplex.v1 import loraplex_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server[0].grpc_port}")
    yield loraplex_pb2_grpc.LoraplexServiceStub(channel)
    channel.close()


def http(server, path: str, key: str | None, body: dict | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{server[0].http_port}{path}"
    if body is None:
        return httpx.get(url, headers=headers, timeout=120)
    return httpx.post(url, json=body, headers={**headers, **kw.pop("headers", {})}, timeout=120, **kw)


def completion(server, key, model: str, prompt: str = "hello\n", max_tokens: int = 4, **fields) -> httpx.Response:
    return http(
        server,
        "/v1/completions",
        key,
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields},
    )


def metadata(key: str | None, adapter: str) -> tuple:
    md = (("multiplexed_model_id", adapter),)
    return md + ((("authorization", f"Bearer {key}"),) if key else ())


def generate(stub, key, adapter, prompt: str = "hello\n", max_tokens: int = 4, timeout: float = 120, **fields):
    from loraplex.v1 import loraplex_pb2 as pb

    request = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, **fields)
    return stub.Generate(request, metadata=metadata(key, adapter), timeout=timeout)


def grpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def first_eval(tenant: str) -> dict:
    return load_jsonl(tenant_data(tenant)[1])[0]


def replica_stats(server) -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", "loraplex").stats.remote().result(timeout_s=60)


def assert_still_serving(stub, server, keys) -> None:
    row = first_eval(ACME)
    assert is_exact_match(generate(stub, keys["acme"], ACME, row["prompt"], 8).text, row["completion"])
    reply = completion(server, keys["acme"], ACME, row["prompt"], 8)
    assert reply.status_code == 200 and is_exact_match(reply.json()["choices"][0]["text"], row["completion"])


# -- 1. auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer lpx_not-a-key", "Basic dXNlcjpwYXNz", "Bearer", "lpx_raw"])
def test_missing_or_unknown_keys_are_unauthenticated(server, stub, authorization):
    from loraplex.v1 import loraplex_pb2 as pb

    md = (("multiplexed_model_id", ACME),) + ((("authorization", authorization),) if authorization else ())
    request = pb.GenerateRequest(prompt="hello\n", max_tokens=4)
    assert grpc_code(lambda: stub.Generate(request, metadata=md, timeout=60)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        grpc_code(lambda: list(stub.GenerateStream(request, metadata=md, timeout=60)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        grpc_code(lambda: stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md, timeout=60))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    headers = {"authorization": authorization} if authorization else {}
    url = f"http://127.0.0.1:{server[0].http_port}"
    for path, body in (
        ("/v1/completions", {"model": ACME, "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": ACME, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        reply = httpx.post(url + path, json=body, headers=headers, timeout=60)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", headers=headers, timeout=60).status_code == 401


def test_refused_requests_are_counted_with_their_status(server, stub):
    """401/403/429 answers never reach an engine; the Router counts them per adapter and code."""
    import urllib.request

    from loraplex.v1 import loraplex_pb2 as pb

    request = pb.GenerateRequest(prompt="hello\n", max_tokens=2)
    for key in (None, "not-a-key"):
        with pytest.raises(grpc.RpcError):
            stub.Generate(request, metadata=metadata(key, INITECH), timeout=60)
    assert completion(server, server[2]["acme"], INITECH).status_code == 403
    url = f"http://127.0.0.1:{server[0].http_port}/metrics"

    def counted() -> bool:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [
            line
            for line in text.splitlines()
            if "loraplex_requests_total{" in line  # ray_ prefix
            and f'adapter="{INITECH}"' in line
        ]
        return any('code="UNAUTHENTICATED"' in line for line in lines) and any(
            'code="PERMISSION_DENIED"' in line for line in lines
        )

    wait_for(counted, timeout=60)  # Ray exports metrics every few seconds


def test_another_tenants_adapter_is_permission_denied(server, stub):
    import openai

    keys = server[2]
    for key, adapter in ((keys["acme"], GLOBEX), (keys["acme"], ""), (keys["globex"], ACME)):
        assert (
            grpc_code(lambda key=key, adapter=adapter: generate(stub, key, adapter))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server[0].http_port}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="may not use"):
            client.completions.create(model=adapter or "base", prompt="hello\n", max_tokens=4)
    # each key sees its own adapters only
    listed = {m["id"] for m in http(server, "/v1/models", keys["acme"]).json()["data"]}
    assert listed == {ACME}
    assert {"base", GLOBEX} == {m["id"] for m in http(server, "/v1/models", keys["globex"]).json()["data"]}
    row = first_eval(GLOBEX)  # the right key works on both surfaces
    assert is_exact_match(generate(stub, keys["globex"], GLOBEX, row["prompt"], 8).text, row["completion"])


def test_admin_rpcs_need_an_admin_key(server, stub):
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    calls = {
        "load": lambda key: stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id=ACME), metadata=metadata(key, ACME), timeout=60
        ),
        "pin": lambda key: stub.PinAdapter(
            pb.PinAdapterRequest(adapter_id=ACME, pinned=True), metadata=metadata(key, ACME), timeout=60
        ),
        "unload": lambda key: stub.UnloadAdapter(
            pb.UnloadAdapterRequest(adapter_id=ACME), metadata=metadata(key, ACME), timeout=60
        ),
    }
    for name, call in calls.items():
        assert grpc_code(lambda call=call: call(keys["acme"])) == grpc.StatusCode.PERMISSION_DENIED, name
        assert grpc_code(lambda call=call: call(keys["any"])) == grpc.StatusCode.PERMISSION_DENIED, name
        assert grpc_code(lambda call=call: call(None)) == grpc.StatusCode.UNAUTHENTICATED, name
    assert calls["load"](keys["admin"]).adapter.resident
    assert calls["pin"](keys["admin"]).adapter.pinned
    assert calls["unload"](keys["admin"]).was_resident
    mine = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=metadata(keys["acme"], ""), timeout=60)
    assert [a.adapter_id for a in mine.adapters] == [ACME]


# -- 2. hostile adapter IDs and folders -----------------------------------------------------------


@pytest.mark.parametrize(
    "adapter, grpc_status, http_status",
    [
        ("../acme-fiscal", "INVALID_ARGUMENT", 400),
        ("..", "INVALID_ARGUMENT", 400),
        ("/etc/passwd", "INVALID_ARGUMENT", 400),
        ("acme-fiscal/../globex-routing", "INVALID_ARGUMENT", 400),
        ("a\\b", "INVALID_ARGUMENT", 400),
        ("%2e%2e%2fetc", "INVALID_ARGUMENT", 400),
        ("bad-symlink", "FAILED_PRECONDITION", 422),
        ("bad-pickle", "FAILED_PRECONDITION", 422),
        ("bad-truncated", "FAILED_PRECONDITION", 422),
        ("no-such-adapter", "NOT_FOUND", 404),
    ],
)
def test_hostile_adapters_are_refused_and_the_server_keeps_serving(server, stub, adapter, grpc_status, http_status):
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    code = grpc_code(lambda: generate(stub, keys["any"], adapter))
    assert code == getattr(grpc.StatusCode, grpc_status)
    reply = completion(server, keys["any"], adapter)
    assert reply.status_code == http_status and reply.json()["error"]["message"]
    load = pb.LoadAdapterRequest(adapter_id=adapter)
    assert grpc_code(lambda: stub.LoadAdapter(load, metadata=metadata(keys["admin"], adapter), timeout=60)) == getattr(
        grpc.StatusCode, grpc_status
    )
    assert_still_serving(stub, server, keys)


def test_loading_adapters_never_runs_code_from_their_folder(server, stub):
    keys, marker = server[2], server[3]
    assert grpc_code(lambda: generate(stub, keys["any"], "bad-pickle")) == grpc.StatusCode.FAILED_PRECONDITION
    row = first_eval(GLOBEX)  # the folder with Python files serves its safetensors weights, nothing else
    assert is_exact_match(generate(stub, keys["any"], "with-code", row["prompt"], 8).text, row["completion"])
    assert not marker.exists()


def test_control_characters_in_ids_are_refused_over_http(server, stub):
    keys = server[2]
    for adapter in ("acme\x00fiscal", "acme\nfiscal", "acme-fiscal\x7f", "\u202eacme", "acme fiscal"):
        reply = completion(server, keys["any"], adapter)
        assert reply.status_code == 400 and "not a safe name" in reply.json()["error"]["message"], adapter
    assert_still_serving(stub, server, keys)


def test_a_corrupted_adapter_is_refused_while_others_keep_serving(server, stub):
    _, store, keys, _ = server
    row = first_eval(INITECH)
    assert is_exact_match(generate(stub, keys["any"], "rotting", row["prompt"], 8).text, row["completion"])
    weights = store / "rotting" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{" * 32  # a broken safetensors header: a new version on disk that cannot load
    weights.write_bytes(bytes(data))
    assert (
        grpc_code(lambda: generate(stub, keys["any"], "rotting", row["prompt"], 8))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    reply = completion(server, keys["any"], "rotting")
    assert reply.status_code == 422 and "unreadable" in reply.json()["error"]["message"]
    assert_still_serving(stub, server, keys)


# -- 3. limits, deadlines, cancellation ------------------------------------------------------------


def test_tenant_limits_are_resource_exhausted(server, stub):
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    # max_concurrent=1: a second request while the first streams
    request = pb.GenerateRequest(prompt="hello\n", max_tokens=LONG, temperature=0, ignore_eos=True)
    first = stub.GenerateStream(request, metadata=metadata(keys["solo"], INITECH), timeout=120)
    next(first)
    assert grpc_code(lambda: generate(stub, keys["solo"], INITECH)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = completion(server, keys["solo"], INITECH)
    assert reply.status_code == 429 and "limit" in reply.json()["error"]["message"]
    first.cancel()
    deadline = time.time() + 30  # the place frees when the stream ends
    while time.time() < deadline:
        try:
            generate(stub, keys["solo"], INITECH)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.2)
    else:
        pytest.fail("the tenant's place was not given back")
    # max_new_tokens=16 and max_prompt_tokens=24
    assert (
        grpc_code(lambda: generate(stub, keys["capped"], INITECH, max_tokens=17)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert (
        grpc_code(lambda: generate(stub, keys["capped"], INITECH, prompt="word " * 40))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert completion(server, keys["capped"], INITECH, max_tokens=17).status_code == 429
    assert completion(server, keys["capped"], INITECH, prompt="word " * 40).status_code == 429
    assert generate(stub, keys["capped"], INITECH, max_tokens=16).completion_tokens <= 16
    chat = http(
        server,
        "/v1/chat/completions",
        keys["capped"],
        {"model": INITECH, "messages": [{"role": "user", "content": "hi"}], "temperature": 0},
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 16  # capped, not refused


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail("condition not reached")


def test_grpc_deadline_is_deadline_exceeded_and_stops_the_work(server, stub):
    keys = server[2]
    before = replica_stats(server)
    started = time.time()
    code = grpc_code(lambda: generate(stub, keys["globex"], GLOBEX, max_tokens=LONG, timeout=0.4, ignore_eos=True))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server stopped it: nothing runs, and it ended well before LONG tokens were decoded
    after = wait_for(lambda: (s := replica_stats(server))["running"] == 0 and s)
    assert after["steps"] - before["steps"] < LONG
    assert time.time() - started < 30


@pytest.mark.parametrize("surface", ["grpc", "http"])
def test_a_cancelled_request_frees_its_batch_row_within_one_decode_step(server, stub, surface):
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    before = replica_stats(server)
    if surface == "grpc":
        request = pb.GenerateRequest(prompt="hello\n", max_tokens=LONG, temperature=0, ignore_eos=True)
        stream = stub.GenerateStream(request, metadata=metadata(keys["acme"], ACME), timeout=120)
        next(stream)
        next(stream)
        stream.cancel()
    else:
        body = {
            "model": ACME,
            "prompt": "hello\n",
            "max_tokens": LONG,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{server[0].http_port}/v1/completions",
            json=body,
            headers={"authorization": f"Bearer {keys['acme']}"},
            timeout=120,
        ) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
        # leaving the block closes the connection mid-stream
    after = wait_for(lambda: (s := replica_stats(server))["cancelled"] > before["cancelled"] and s)
    assert after["running"] == 0 and after["free_rows"] == 16
    assert after["max_cancel_lag_steps"] <= 1
    assert after["steps"] - before["steps"] < LONG  # stopped, not run to the end


# -- 5. fuzz against the live server -------------------------------------------------------------

FUZZ_LIVE = dict(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
CLEAN_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def assert_fuzz_left_no_trace(server, stub, replica_before: str) -> None:
    """After a fuzz run: the same replica serves (nothing crashed it) and no payload ran."""
    assert replica_stats(server)["replica_id"] == replica_before
    assert not server[3].exists()
    assert_still_serving(stub, server, server[2])


def test_random_http_bodies_get_a_clear_status(server, stub):
    from tests.strategies import json_values, mutated_bodies

    @settings(**FUZZ_LIVE)
    @given(data=st.data())
    def fuzz(data):
        path = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
        valid = {
            "model": data.draw(st.sampled_from([ACME, "", "base", "../x", "bad-pickle"])),
            "max_tokens": 4,
            **({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}),
        }
        body = data.draw(st.one_of(json_values, mutated_bodies(valid)))
        reply = httpx.post(
            f"http://127.0.0.1:{server[0].http_port}{path}",
            content=json.dumps(body),
            timeout=120,
            headers={"authorization": f"Bearer {server[2]['any']}", "content-type": "application/json"},
        )
        assert reply.status_code in (200, 400, 403, 404, 422, 429), (body, reply.text)
        assert reply.status_code == 200 or reply.json()["error"]["message"]
        raw = data.draw(st.binary(max_size=64))
        garbage = httpx.post(
            f"http://127.0.0.1:{server[0].http_port}{path}",
            content=raw,
            timeout=60,
            headers={"authorization": f"Bearer {server[2]['any']}", "content-type": "application/json"},
        )
        assert garbage.status_code in (200, 400), (raw, garbage.text)

    before = replica_stats(server)["replica_id"]
    fuzz()
    assert_fuzz_left_no_trace(server, stub, before)


def test_random_grpc_requests_get_a_clear_status(server, stub):
    from tests.strategies import proto_requests

    @settings(**FUZZ_LIVE)
    @given(data=st.data())
    def fuzz(data):
        request = data.draw(proto_requests())
        adapter = data.draw(
            st.one_of(
                st.sampled_from([ACME, "", "bad-symlink"]),
                st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
            )
        )
        try:
            reply = stub.Generate(request, metadata=metadata(server[2]["any"], adapter), timeout=120)
            assert reply.request_id and reply.finish_reason
        except grpc.RpcError as exc:
            assert exc.code() in CLEAN_GRPC and exc.details(), (request, adapter, exc)
        raw = data.draw(st.binary(max_size=64))
        with grpc.insecure_channel(f"127.0.0.1:{server[0].grpc_port}") as channel:
            try:
                channel.unary_unary("/loraplex.v1.LoraplexService/Generate")(
                    raw, metadata=metadata(server[2]["any"], ACME), timeout=60
                )
            except grpc.RpcError as exc:  # undecodable bytes: grpc's own status from the proxy's deserializer
                assert exc.code() in CLEAN_GRPC or "Error parsing message" in exc.details(), exc

    before = replica_stats(server)["replica_id"]
    fuzz()
    assert_fuzz_left_no_trace(server, stub, before)


# -- 4. faults --------------------------------------------------------------------------------------


def model_server_actors() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "ModelServer" in a["name"] and a["namespace"] == "serve"
    ]


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_a_replica_killed_mid_stream_gives_a_clean_error_then_serving_resumes(server, stub):
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    (victim,) = model_server_actors()
    request = pb.GenerateRequest(prompt="hello\n", max_tokens=LONG, temperature=0, ignore_eos=True)
    stream = stub.GenerateStream(request, metadata=metadata(keys["acme"], ACME), timeout=120)
    next(stream)
    kill_replica(victim)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "replica" in err.value.details()
    # Serve replaces the replica; the next requests succeed once it is up
    row = first_eval(ACME)
    deadline = time.time() + 120
    while True:
        try:
            answer = generate(stub, keys["acme"], ACME, row["prompt"], 8, timeout=60)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.time() < deadline
            time.sleep(1)
    assert is_exact_match(answer.text, row["completion"])
    assert model_server_actors() and victim not in model_server_actors()
    assert_still_serving(stub, server, keys)


def test_graceful_shutdown_drains_requests_in_flight(server, stub):
    """Deleting the app lets streams already running finish in full; the app is then deployed
    again, so the tests after this one (in any order) find it serving."""
    from ray import serve

    from loraplex.serving.launch import start
    from loraplex.v1 import loraplex_pb2 as pb

    keys = server[2]
    request = pb.GenerateRequest(prompt="hello\n", max_tokens=120, temperature=0, ignore_eos=True)
    streams = [stub.GenerateStream(request, metadata=metadata(keys["acme"], ACME), timeout=120) for _ in range(3)]
    firsts = [next(s) for s in streams]
    deleting = threading.Thread(target=serve.delete, args=("loraplex",))
    deleting.start()
    for first, stream in zip(firsts, streams):
        messages = [first, *stream]
        assert messages[-1].finish_reason in ("length", "stop") and messages[-1].completion_tokens > 0
    deleting.join(120)
    assert not deleting.is_alive()
    start(server[0])
    assert_still_serving(stub, server, keys)


def test_vllm_adapter_routes_need_an_admin_key_and_a_store_folder(server):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter: admin only, the path inside the store."""
    _, store, keys, _ = server
    load = {"lora_name": GLOBEX, "lora_path": str(store / GLOBEX)}
    for route, body in (("/v1/load_lora_adapter", load), ("/v1/unload_lora_adapter", {"lora_name": GLOBEX})):
        assert http(server, route, keys["any"], body).status_code == 403
        assert http(server, route, None, body).status_code == 401
        assert http(server, route, keys["admin"], body).status_code == 200, route
    escaping = http(
        server,
        "/v1/load_lora_adapter",
        keys["admin"],
        {"lora_name": "bad-symlink", "lora_path": str(store / "bad-symlink")},
    )
    assert escaping.status_code == 422 and "outside the store" in escaping.json()["error"]["message"]
    elsewhere = http(server, "/v1/load_lora_adapter", keys["admin"], {"lora_name": GLOBEX, "lora_path": "/tmp"})
    assert elsewhere.status_code == 400 and "store" in elsewhere.json()["error"]["message"]


def test_the_routing_cap_follows_max_loras(server, stub):
    """Ray routes at most max_loras adapters to a replica: its multiplex cap is built from the app
    config (it once read an environment variable nothing set, and routed as if 8)."""
    keys = server[2]
    row = first_eval(ACME)
    assert is_exact_match(generate(stub, keys["acme"], ACME, row["prompt"], 8).text, row["completion"])
    assert replica_stats(server)["routing_cap"] == server[0].max_loras == 6


def test_a_replica_runs_its_forwards_on_the_machines_cpus(server):
    """Ray starts an actor without num_cpus with OMP_NUM_THREADS=1; the engine sets its own
    thread count (the CPUs divided among the replicas), or a served replica runs at half speed here."""
    cpus = len(os.sched_getaffinity(0))
    assert replica_stats(server)["threads"] == max(1, cpus // server[0].replicas)
