"""The Router deployment: the ingress for both surfaces (gRPC methods and OpenAI HTTP routes).

Every request passes one gate here (API key, the adapters the key may use, the tenant's
concurrency limit) and then goes to a ModelServer replica chosen by adapter
(`handle.options(multiplexed_model_id=...)`).
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import asdict

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from loraplex.serving import grpc_responses
from loraplex.serving.auth import AUTH_OFF_WARNING, KeyTable, TenantKey, TenantLimits, authorize, require_admin
from loraplex.serving.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ReplicaUnavailable,
    TenantLimitExceeded,
    classify,
    replica_cause,
)
from loraplex.serving.metrics import ServingMetrics
from loraplex.serving.openai_http import held, http_app, openai_error, openai_response, sse
from loraplex.serving.requests import (
    BASE_MODEL_ID,
    ChatCompletionBody,
    CompletionBody,
    GenerateCall,
    LoraAdapterBody,
    adapter_from_model,
    call_from_proto,
)
from loraplex.training.adapter_id import validate_adapter_id
from loraplex.v1 import loraplex_pb2 as pb

logger = logging.getLogger("ray.serve")

REPLICA_ATTEMPTS = 3  # sends of a request that finds its replica dead before any output


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(http_app)
class Router:
    """Both surfaces: gRPC methods named after the RPCs, and the FastAPI routes below.

    Every request passes the same gate here: the API key (when auth is on), the adapter the
    key may use, and the tenant's concurrency limit, before anything reaches a ModelServer.
    """

    def __init__(
        self,
        model_server: DeploymentHandle,
        metrics_port: int | None = None,
        api_keys: list[dict] | None = None,
        limits: dict | None = None,
    ) -> None:
        self.model = model_server
        self.metrics_port = metrics_port
        self.keys = KeyTable.from_config(api_keys) if api_keys is not None else None
        self.default_limits = TenantLimits(**(limits or {}))
        self.in_flight: Counter[str] = Counter()  # per tenant, on this Router replica
        self.metrics = ServingMetrics("ray")  # refusals at the gate never reach an engine's counters
        if self.keys is None:
            logger.warning("loraplex: %s", AUTH_OFF_WARNING)

    def _to(self, adapter_id: str, stream: bool = False):
        return self.model.options(multiplexed_model_id=adapter_id, stream=stream)

    # -- the gate --------------------------------------------------------------------------------

    def _authenticate(self, authorization: str | None, adapter_id: str | None = None) -> TenantKey | None:
        """The caller's key (None when auth is off); a refused generation request is counted."""
        try:
            return None if self.keys is None else self.keys.authenticate(authorization)
        except Exception as exc:
            if adapter_id is not None:
                self.metrics.request_refused(adapter_id, exc)
            raise

    @contextlib.contextmanager
    def _admitted(self, key: TenantKey | None, adapter_id: str, call: GenerateCall):
        """Authorize the adapter and hold one of the tenant's concurrent-request places."""
        tenant = key.name if key else f"adapter:{adapter_id}"
        limits = key.limits if key else self.default_limits
        try:
            authorize(key, adapter_id)
            if limits.max_concurrent is not None and self.in_flight[tenant] >= limits.max_concurrent:
                raise TenantLimitExceeded(
                    f"tenant {tenant} has {limits.max_concurrent} requests in flight "
                    "(its limit); retry when one finishes"
                )
        except Exception as exc:
            self.metrics.request_refused(adapter_id, exc)
            raise
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
                cause = replica_cause(exc)
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
                cause = replica_cause(exc)
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
        return self._authenticate(metadata.get("authorization"), serve.get_multiplexed_model_id())

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
            self._grpc_fail(grpc_context, replica_cause(exc))
            return pb.GenerateResponse()
        return grpc_responses.unary(result)

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        try:
            key, call = self._grpc_key(grpc_context), self._grpc_call(request, grpc_context)
            adapter_id = serve.get_multiplexed_model_id()
            with self._admitted(key, adapter_id, call):
                async for message in grpc_responses.stream(self._generate_stream(adapter_id, call), call["n"]):
                    yield message
        except Exception as exc:
            self._grpc_fail(grpc_context, replica_cause(exc))
            raise  # in a stream the status only reaches the client with a raise

    async def ListAdapters(self, request, grpc_context):  # noqa: N802
        try:
            key = self._grpc_key(grpc_context)
            listing = await self.model.list_adapters.remote()
        except Exception as exc:
            self._grpc_fail(grpc_context, replica_cause(exc))
            return pb.ListAdaptersResponse()
        return pb.ListAdaptersResponse(
            adapters=[pb.AdapterInfo(**a) for a in listing["adapters"] if key is None or key.may_use(a["adapter_id"])],
            base_model=listing["base_model"],
            base_fingerprint=listing["base_fingerprint"],
        )

    async def _admin(self, grpc_context, adapter_id: str, method: str, *args, empty, build):
        """Run an admin call (admin keys only) on the replica that holds, or will hold, the adapter."""
        try:
            require_admin(self._grpc_key(grpc_context), method)
            result = await getattr(self._to(adapter_id), method).remote(adapter_id, *args)
        except Exception as exc:
            self._grpc_fail(grpc_context, replica_cause(exc))
            return empty()
        return build(result)

    async def LoadAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(
            grpc_context,
            request.adapter_id,
            "load_adapter",
            empty=pb.LoadAdapterResponse,
            build=lambda info: pb.LoadAdapterResponse(adapter=pb.AdapterInfo(**info)),
        )

    async def UnloadAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(
            grpc_context,
            request.adapter_id,
            "unload_adapter",
            empty=pb.UnloadAdapterResponse,
            build=lambda was: pb.UnloadAdapterResponse(was_resident=was),
        )

    async def PinAdapter(self, request, grpc_context):  # noqa: N802
        return await self._admin(
            grpc_context,
            request.adapter_id,
            "pin_adapter",
            request.pinned,
            empty=pb.PinAdapterResponse,
            build=lambda info: pb.PinAdapterResponse(adapter=pb.AdapterInfo(**info)),
        )

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
            return openai_error(replica_cause(exc))
        now = int(time.time())
        entries = []
        if key is None or key.may_use(""):
            entries.append(
                {
                    "id": BASE_MODEL_ID,
                    "object": "model",
                    "created": now,
                    "owned_by": "loraplex",
                    "root": listing["base_model"],
                    "precision": listing.get("base_precision", ""),
                    "precision_note": listing.get("base_precision_note", ""),
                }
            )
        entries += [
            {
                "id": a["adapter_id"],
                "object": "model",
                "created": now,
                "owned_by": "loraplex",
                "parent": BASE_MODEL_ID,
                "provenance": a.get("provenance", ""),
            }
            for a in listing["adapters"]
            if key is None or key.may_use(a["adapter_id"])
        ]
        return {"object": "list", "data": entries}

    @http_app.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: Request):
        return await self._openai(body, request, chat=False)

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionBody, request: Request):
        return await self._openai(body, request, chat=True)

    @http_app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoraAdapterBody, request: Request):
        """vLLM's adapter admin route (admin keys only); the path must be the adapter's folder in the store."""
        try:
            require_admin(self._authenticate(request.headers.get("authorization")), "load_lora_adapter")
            validate_adapter_id(body.lora_name)
            if not body.lora_path:
                raise InvalidRequest("lora_path is required")
            await self._to(body.lora_name).load_lora_adapter.remote(body.lora_name, body.lora_path)
        except Exception as exc:
            return openai_error(replica_cause(exc))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @http_app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: LoraAdapterBody, request: Request):
        try:
            require_admin(self._authenticate(request.headers.get("authorization")), "unload_lora_adapter")
            validate_adapter_id(body.lora_name)
            await self._to(body.lora_name).unload_adapter.remote(body.lora_name)
        except Exception as exc:
            return openai_error(replica_cause(exc))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

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
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        )
        lines = [line for line in raw.decode().splitlines() if "loraplex_" in line]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _openai(self, body, request: Request, chat: bool):
        gate = contextlib.ExitStack()
        try:
            adapter_id = adapter_from_model(body.model)
            key = self._authenticate(request.headers.get("authorization"), adapter_id)
            call = body.call(request.headers.get("x-request-id"))
            gate.enter_context(self._admitted(key, adapter_id, call))
            logprobs = call["params"].get("logprobs") is not None
            if not body.stream:
                with gate:
                    result = await self._generate(adapter_id, call)
                return JSONResponse(
                    openai_response(result, chat, logprobs), headers={"x-request-id": call["request_id"]}
                )
            chunks = self._generate_stream(adapter_id, call)
            first = await chunks.__anext__()  # errors before any output still get a proper status
            events = sse(first, chunks, chat, logprobs, body.include_usage)
            return StreamingResponse(
                held(gate, events), media_type="text/event-stream", headers={"x-request-id": call["request_id"]}
            )
        except Exception as exc:
            gate.close()
            return openai_error(replica_cause(exc))
