"""Ray Serve application: a Router ingress (gRPC + OpenAI HTTP) in front of multiplexed ModelServers.

    client --gRPC :9000 (metadata multiplexed_model_id)--> Router --handle.options(multiplexed_model_id)--> ModelServer
    client --HTTP :8000 (/v1/..., body "model")---------/                                                  (Engine)

Ray routes a request to a ModelServer replica that already holds its adapter when one exists
(`@serve.multiplexed`), so a replica's adapter slots stay warm for the tenants it serves.
"""


import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, fields, replace
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from loraplex.protos import ensure_stubs

ensure_stubs()
from loraplex.v1 import loraplex_pb2 as pb  # noqa: E402

from serving.auth import (  # noqa: E402
    AUTH_OFF_WARNING, KeyTable, TenantKey, TenantLimits, auth_from_args, authorize, require_admin,
)
from serving.engine.engine import EngineConfig  # noqa: E402
from serving.errors import (  # noqa: E402
    DeadlineExceeded, InvalidRequest, ReplicaUnavailable, TenantLimitExceeded, classify,
)
from serving.requests import (  # noqa: E402
    BASE_MODEL_ID, ChatCompletionBody, CompletionBody, GenerateCall, adapter_from_model, call_from_proto,
)

logger = logging.getLogger("ray.serve")

REPLICA_ATTEMPTS = 3  # sends of a request that finds its replica dead before any output
MAX_MULTIPLEXED = int(os.environ.get("LORAPLEX_MAX_LORAS", "8"))  # Ray fixes this when the class is defined


def _cause(exc: BaseException) -> BaseException:
    """The original error behind Ray's RayTaskError wrapper; a dead replica becomes UNAVAILABLE."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (RayActorError, ActorUnavailableError)):
        return ReplicaUnavailable(f"the replica serving this request went away ({type(cause).__name__}); "
                                  "retry: Ray Serve routes it to a live replica")
    return cause


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=60)
class ModelServer:
    """One engine per replica: the NF4 base once, adapters in slots."""

    def __init__(self, engine_config: dict) -> None:
        from serving.engine.engine import create_engine
        from serving.metrics import ServingMetrics

        self.engine = create_engine(EngineConfig(**engine_config), metrics=ServingMetrics("ray"))
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=MAX_MULTIPLEXED)
    async def get_adapter(self, adapter_id: str) -> str:
        """Tells Ray this replica holds the adapter (routing affinity); the store keeps the weights."""
        lease = await asyncio.to_thread(self.engine.store.acquire, adapter_id)
        self.engine.store.release(lease)
        return adapter_id

    async def _submit(self, call: GenerateCall):
        from serving.engine.sampling import SamplingParams

        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.get_adapter(adapter_id)
        prompt = call["prompt"]
        if call["messages"]:
            try:
                prompt = self.engine.tokenizer.apply_chat_template(call["messages"], tokenize=False,
                                                                   add_generation_prompt=True)
            except Exception as exc:  # the model's own template refuses these messages
                raise InvalidRequest(f"messages do not fit the chat template: {exc}"[:300]) from None
        try:
            params = SamplingParams(**call["params"])
        except TypeError as exc:
            raise InvalidRequest(str(exc)) from None
        prompt_ids = self.engine.encode(prompt or "")
        limits = TenantLimits(**call["limits"]) if call.get("limits") else None
        if limits is not None:
            limits.check_prompt_tokens(len(prompt_ids))
            limits.check_new_tokens(params.max_tokens)
            if params.max_tokens is None and limits.max_new_tokens is not None:
                room = max(1, self.engine.max_seq - len(prompt_ids))
                params = replace(params, max_tokens=min(limits.max_new_tokens, room))
        return adapter_id, self.engine.submit(prompt_ids, adapter_id, params, request_id=call["request_id"],
                                              timeout=call.get("timeout"))

    def _final(self, adapter_id: str, request_id: str, text: str, event) -> dict:
        if event.error is not None:
            raise event.error
        return {"text": text, "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens, "request_id": request_id,
                "adapter_id": adapter_id, "replica_id": self.replica_id, "final": True,
                "adapter_version": event.adapter_version}

    async def generate(self, call: GenerateCall) -> dict:
        adapter_id, stream = await self._submit(call)
        parts = []
        try:
            async for event in stream:
                parts.append(event.text)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        return self._final(adapter_id, call["request_id"], "".join(parts), event)

    async def generate_stream(self, call: GenerateCall):
        adapter_id, stream = await self._submit(call)
        try:
            async for event in stream:
                if event.final:
                    yield self._final(adapter_id, call["request_id"], "", event)
                elif event.text:
                    yield {"text": event.text, "final": False, "request_id": call["request_id"],
                           "adapter_id": adapter_id, "replica_id": self.replica_id}
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()
            raise

    async def list_adapters(self) -> dict:
        store = self.engine.store
        resident = store.resident()
        ids = sorted(set(store.available()) | set(resident))
        return {
            "adapters": [{"adapter_id": i, "resident": i in resident, "pinned": i in store.pinned,
                          "rank": resident[i].rank if i in resident else 0} for i in ids],
            "base_model": str(self.engine.base_dir), "base_fingerprint": self.engine.base_fingerprint,
            "replica_id": self.replica_id,
        }

    async def load_adapter(self, adapter_id: str) -> dict:
        await self.get_adapter(adapter_id)
        return self._info(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> bool:
        return await asyncio.to_thread(self.engine.store.unload, adapter_id)

    async def pin_adapter(self, adapter_id: str, pinned: bool) -> dict:
        await asyncio.to_thread(self.engine.store.pin, adapter_id, pinned)
        return self._info(adapter_id)

    def _info(self, adapter_id: str) -> dict:
        lease = self.engine.store.resident().get(adapter_id)
        return {"adapter_id": adapter_id, "resident": lease is not None,
                "pinned": adapter_id in self.engine.store.pinned, "rank": lease.rank if lease else 0}

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica_id": self.replica_id}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain=True, timeout=30)


# Everything the routes call is defined before the Router: `@serve.ingress` captures the
# module's globals when the class is decorated.
http_app = FastAPI(title="loraplex", description="OpenAI-compatible completions over tenant LoRA adapters")


def _openai_error(exc: BaseException) -> JSONResponse:
    _, status, kind = classify(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": str(exc), "type": kind, "code": status, "param": None}})


@http_app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return _openai_error(InvalidRequest(reasons or "invalid request body"))


def _openai_response(result: dict, chat: bool) -> dict:
    """`model` is the adapter that answered (from the replica), so a client can check it."""
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": _finish(result["finish_reason"])}
    else:
        choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": _finish(result["finish_reason"])}
    return {"id": result["request_id"], "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": result["adapter_id"] or BASE_MODEL_ID, "choices": [choice],
            "usage": usage,
            "system_fingerprint": result["replica_id"]}


def _finish(reason: str) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason, reason or None)


async def _sse(first: dict, chunks, chat: bool):
    def event(chunk: dict) -> str:
        finish = _finish(chunk["finish_reason"]) if chunk["final"] else None
        if chat:
            delta = {} if chunk["final"] else {"role": "assistant", "content": chunk["text"]}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk["text"], "logprobs": None, "finish_reason": finish}
        payload = {"id": chunk["request_id"], "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": chunk["adapter_id"] or BASE_MODEL_ID, "choices": [choice],
                   "system_fingerprint": chunk["replica_id"]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield event(first)
        if not first["final"]:
            async for chunk in chunks:
                yield event(chunk)
    except Exception as exc:  # headers are sent: report in band, as OpenAI does
        _, status, kind = classify(_cause(exc))
        yield f"data: {json.dumps({'error': {'message': str(_cause(exc)), 'type': kind, 'code': status}})}\n\n"
    yield "data: [DONE]\n\n"


async def _held(gate: contextlib.ExitStack, events):
    """Keep the tenant's place until the stream ends, however it ends (a closed connection too)."""
    with gate:
        async for event in events:
            yield event


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(http_app)
class Router:
    """Both surfaces: gRPC methods named after the RPCs, and the FastAPI routes below.

    Every request passes the same gate here: the API key (when auth is on), the adapter the
    key may use, and the tenant's concurrency limit, before anything reaches a ModelServer.
    """

    def __init__(self, model_server: DeploymentHandle, metrics_port: int | None = None,
                 api_keys: list[dict] | None = None, limits: dict | None = None) -> None:
        self.model = model_server
        self.metrics_port = metrics_port
        self.keys = KeyTable.from_config(api_keys) if api_keys is not None else None
        self.default_limits = TenantLimits(**(limits or {}))
        self.in_flight: Counter[str] = Counter()  # per tenant, on this Router replica
        if self.keys is None:
            logger.warning("loraplex: %s", AUTH_OFF_WARNING)

    def _to(self, adapter_id: str, stream: bool = False):
        return self.model.options(multiplexed_model_id=adapter_id, stream=stream)

    # -- the gate --------------------------------------------------------------------------------

    def _authenticate(self, authorization: str | None) -> TenantKey | None:
        return None if self.keys is None else self.keys.authenticate(authorization)

    @contextlib.contextmanager
    def _admitted(self, key: TenantKey | None, adapter_id: str, call: GenerateCall):
        """Authorize the adapter and hold one of the tenant's concurrent-request places."""
        authorize(key, adapter_id)
        tenant = key.name if key else f"adapter:{adapter_id}"
        limits = key.limits if key else self.default_limits
        if limits.max_concurrent is not None and self.in_flight[tenant] >= limits.max_concurrent:
            raise TenantLimitExceeded(f"tenant {tenant} has {limits.max_concurrent} requests in flight "
                                      "(its limit); retry when one finishes")
        call["limits"] = asdict(limits)  # the prompt and token limits are checked by the ModelServer
        self.in_flight[tenant] += 1
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]

    # -- to a ModelServer, past a replica that went away ----------------------------------------

    async def _attempts(self, call: GenerateCall):
        """Up to REPLICA_ATTEMPTS tries, each with the time left before the client's deadline.

        A request that met a dead replica before any output is sent again: Serve's router can
        still pick a replica in the second after it died, and nothing of the request was seen.
        """
        deadline = None if call.get("timeout") is None else time.time() + call["timeout"]
        for attempt in range(REPLICA_ATTEMPTS):
            if deadline is not None:
                call["timeout"] = deadline - time.time()
            yield attempt == REPLICA_ATTEMPTS - 1
            await asyncio.sleep(0.5 * (attempt + 1))

    async def _generate(self, adapter_id: str, call: GenerateCall) -> dict:
        async for last in self._attempts(call):
            try:
                return await self._to(adapter_id).generate.remote(call)
            except Exception as exc:
                cause = _cause(exc)
                if last or not isinstance(cause, ReplicaUnavailable):
                    raise cause from None
                logger.warning("loraplex: request %s met a dead replica; sending it again", call["request_id"])

    async def _generate_stream(self, adapter_id: str, call: GenerateCall):
        async for last in self._attempts(call):
            chunks, started, done = self._to(adapter_id, stream=True).generate_stream.remote(call), False, False
            try:
                async for chunk in chunks:
                    started = True
                    yield chunk
                done = True
                return
            except Exception as exc:
                cause = _cause(exc)
                if started or last or not isinstance(cause, ReplicaUnavailable):
                    raise cause from None  # output was sent: the client sees the failure
                logger.warning("loraplex: stream %s met a dead replica; sending it again", call["request_id"])
            finally:
                if not done:  # the client went away, or it failed: stop the replica's work too
                    chunks.cancel()

    # -- gRPC ------------------------------------------------------------------------------------

    @staticmethod
    def _grpc_fail(grpc_context, exc: BaseException) -> None:
        code, _, _ = classify(exc)
        grpc_context.set_code(getattr(grpc.StatusCode, code))
        grpc_context.set_details(str(exc))

    def _grpc_key(self, grpc_context) -> TenantKey | None:
        metadata = dict(grpc_context.invocation_metadata())
        return self._authenticate(metadata.get("authorization"))

    @staticmethod
    def _grpc_call(request, grpc_context) -> GenerateCall:
        """The call, with the time left before the client's gRPC deadline (see grpc_servicer)."""
        call = call_from_proto(request)
        deadline = getattr(grpc_context, "loraplex_deadline", None)
        if deadline is not None:
            call["timeout"] = deadline - time.time()
            if call["timeout"] <= 0:
                raise DeadlineExceeded("the request's deadline passed before it reached the server")
        return call

    async def Generate(self, request, grpc_context):  # noqa: N802 (RPC name)
        try:
            key, call = self._grpc_key(grpc_context), self._grpc_call(request, grpc_context)
            adapter_id = serve.get_multiplexed_model_id()
            with self._admitted(key, adapter_id, call):
                result = await self._generate(adapter_id, call)
        except Exception as exc:
            self._grpc_fail(grpc_context, _cause(exc))
            return pb.GenerateResponse()
        return pb.GenerateResponse(**{k: result[k] for k in (
            "text", "finish_reason", "prompt_tokens", "completion_tokens", "request_id", "adapter_id", "replica_id",
            "adapter_version")})

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        try:
            key, call = self._grpc_key(grpc_context), self._grpc_call(request, grpc_context)
            adapter_id = serve.get_multiplexed_model_id()
            with self._admitted(key, adapter_id, call):
                async for chunk in self._generate_stream(adapter_id, call):
                    chunk.pop("final")
                    yield pb.GenerateResponse(**chunk)
        except Exception as exc:
            self._grpc_fail(grpc_context, _cause(exc))
            raise  # in a stream the status only reaches the client with a raise

    async def ListAdapters(self, request, grpc_context):  # noqa: N802
        try:
            key = self._grpc_key(grpc_context)
            listing = await self.model.list_adapters.remote()
        except Exception as exc:
            self._grpc_fail(grpc_context, _cause(exc))
            return pb.ListAdaptersResponse()
        return pb.ListAdaptersResponse(
            adapters=[pb.AdapterInfo(**a) for a in listing["adapters"] if key is None or key.may_use(a["adapter_id"])],
            base_model=listing["base_model"], base_fingerprint=listing["base_fingerprint"])

    async def _admin(self, grpc_context, adapter_id: str, method: str, *args, empty, build):
        """Run an admin call (admin keys only) on the replica that holds, or will hold, the adapter."""
        try:
            require_admin(self._grpc_key(grpc_context), method)
            result = await getattr(self._to(adapter_id), method).remote(adapter_id, *args)
        except Exception as exc:
            self._grpc_fail(grpc_context, _cause(exc))
            return empty()
        return build(result)

    async def LoadAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(grpc_context, request.adapter_id, "load_adapter", empty=pb.LoadAdapterResponse,
                                 build=lambda info: pb.LoadAdapterResponse(adapter=pb.AdapterInfo(**info)))

    async def UnloadAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(grpc_context, request.adapter_id, "unload_adapter", empty=pb.UnloadAdapterResponse,
                                 build=lambda was: pb.UnloadAdapterResponse(was_resident=was))

    async def PinAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(grpc_context, request.adapter_id, "pin_adapter", request.pinned,
                                 empty=pb.PinAdapterResponse,
                                 build=lambda info: pb.PinAdapterResponse(adapter=pb.AdapterInfo(**info)))

    async def Check(self, request, grpc_context):  # noqa: N802 (grpc.health.v1.Health/Check)
        """SERVING once a ModelServer answers: what Kubernetes gRPC probes ask (no key needed)."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", "loraplex.v1.LoraplexService"):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        try:
            await self.model.stats.remote()
        except Exception:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # -- OpenAI-compatible HTTP ------------------------------------------------------------------

    @http_app.get("/v1/models")
    async def models(self, request: Request):
        try:
            key = self._authenticate(request.headers.get("authorization"))
            listing = await self.model.list_adapters.remote()
        except Exception as exc:
            return _openai_error(_cause(exc))
        now = int(time.time())
        entries = []
        if key is None or key.may_use(""):
            entries.append({"id": BASE_MODEL_ID, "object": "model", "created": now, "owned_by": "loraplex",
                            "root": listing["base_model"]})
        entries += [{"id": a["adapter_id"], "object": "model", "created": now, "owned_by": "loraplex",
                     "parent": BASE_MODEL_ID} for a in listing["adapters"] if key is None or key.may_use(a["adapter_id"])]
        return {"object": "list", "data": entries}

    @http_app.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: Request):
        return await self._openai(body, request, chat=False)

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionBody, request: Request):
        return await self._openai(body, request, chat=True)

    @http_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @http_app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        """The loraplex_* series from this node's Ray metrics exporter (scrape that port in a cluster)."""
        if not self.metrics_port:
            return PlainTextResponse("metrics export port not configured\n", status_code=404)
        import urllib.request

        raw = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read())
        lines = [line for line in raw.decode().splitlines() if "loraplex_" in line]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _openai(self, body, request: Request, chat: bool):
        gate = contextlib.ExitStack()
        try:
            key = self._authenticate(request.headers.get("authorization"))
            call = body.call(request.headers.get("x-request-id"))
            adapter_id = adapter_from_model(body.model)
            gate.enter_context(self._admitted(key, adapter_id, call))
            if not body.stream:
                with gate:
                    result = await self._generate(adapter_id, call)
                return JSONResponse(_openai_response(result, chat), headers={"x-request-id": call["request_id"]})
            chunks = self._generate_stream(adapter_id, call)
            first = await chunks.__anext__()  # errors before any output still get a proper status
            return StreamingResponse(_held(gate, _sse(first, chunks, chat)), media_type="text/event-stream",
                                     headers={"x-request-id": call["request_id"]})
        except Exception as exc:
            gate.close()
            return _openai_error(_cause(exc))


def build_app(args: dict | None = None):
    """Serve app builder (`import_path: serving.app:build_app`); args are EngineConfig fields plus
    `replicas` (or `autoscaling_config`), `metrics_port`, `replica_resources`, and auth:
    `api_keys` (a key file), `allow_unauthenticated`, `tenant_max_concurrent`,
    `tenant_max_prompt_tokens`, `tenant_max_new_tokens` (defaults for keys that set none).

    Auth is on whenever keys are configured; without keys the app serves only the demo store
    (no `adapters` arg) or when `allow_unauthenticated` says so, and logs a loud warning."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    metrics_port = args.pop("metrics_port", None)
    # custom Ray resources per replica, e.g. {"loraplex_slot": 1} on each node: one replica per node
    replica_resources = dict(args.pop("replica_resources", None) or {})
    # Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...) replaces `replicas`
    autoscaling = args.pop("autoscaling_config", None)
    table, limits = auth_from_args(args)  # pops the auth args; raises when keys are required
    api_keys = table.to_config() if table is not None else None
    if table is None:
        logger.warning("loraplex: %s", AUTH_OFF_WARNING)
    known = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown app args: {', '.join(unknown)}")
    if args.get("adapters") is None:  # relative paths would depend on the replica's cwd
        from training.demo import ADAPTERS_DIR

        args["adapters"] = str(ADAPTERS_DIR)
    config = EngineConfig(**args)
    # Ray hides GPUs from actors that did not ask for one: vLLM, or the torch engine on cuda, asks.
    gpus = 1 if config.engine == "vllm" or config.device == "cuda" else 0
    scale = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    server = ModelServer.options(**scale, ray_actor_options={
        "num_cpus": 0, "num_gpus": gpus, "resources": replica_resources})
    server = server.bind(asdict(config))
    return Router.bind(server, metrics_port, api_keys, asdict(limits))
