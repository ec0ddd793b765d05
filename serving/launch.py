"""`loraplex serve`: start Ray, Serve's HTTP and gRPC proxies and the app, in the foreground.

SIGINT/SIGTERM shut Serve down, which drains requests in flight (graceful_shutdown_timeout_s).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field, fields

from loraplex.serving.engine.api import EngineConfig

APP_NAME = "loraplex"


@dataclass(frozen=True)
class ServeOptions(EngineConfig):
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP bind address (gRPC binds all interfaces)"})
    http_port: int = field(default=8000, metadata={"help": "OpenAI-compatible HTTP port"})
    grpc_port: int = field(default=9000, metadata={"help": "gRPC port (Ray Serve's gRPC proxy)"})
    metrics_port: int = field(default=8080, metadata={"help": "Ray's Prometheus exporter port on this node"})
    replicas: int = field(default=1, metadata={"help": "ModelServer replicas"})
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs Ray may use; default: all"})
    api_keys: str | None = field(
        default=None,
        metadata={
            "help": "tenant API key file (hashes; `loraplex keys add`); or $LORAPLEX_API_KEYS_FILE / $LORAPLEX_API_KEYS"
        },
    )
    allow_unauthenticated: bool = field(
        default=False,
        metadata={"help": "serve without API keys (local testing only; the demo store is served so by default)"},
    )
    tenant_max_concurrent: int | None = field(
        default=64, metadata={"help": "requests in flight per tenant (a key's own max_concurrent wins)"}
    )
    tenant_max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "prompt tokens per request, per tenant"}
    )
    tenant_max_new_tokens: int | None = field(default=None, metadata={"help": "max_tokens per request, per tenant"})


AUTH_ARGS = (
    "api_keys",
    "allow_unauthenticated",
    "tenant_max_concurrent",
    "tenant_max_prompt_tokens",
    "tenant_max_new_tokens",
)


def engine_args(options: ServeOptions) -> dict:
    """The app builder's args: the EngineConfig fields."""
    return {f.name: getattr(options, f.name) for f in fields(EngineConfig)}


def start(options: ServeOptions, demo: bool = False) -> None:
    """Start Ray (if needed), Serve and the app; returns once the app is running.

    demo: the CLI filled in the embedded base and the demo store, the one case served without keys
    by default."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from loraplex.serving.app import build_app
    from loraplex.serving.grpc_servicer import SERVICER_FUNCTION

    if options.engine == "vllm":  # say so before starting Ray, not from inside a failing replica
        from loraplex.serving.engine.vllm_args import INSTALL_HINT, VLLMUnavailable, vllm_unavailable_reason

        reason = vllm_unavailable_reason(options.quantization)
        if reason:
            raise VLLMUnavailable(f"{INSTALL_HINT}: {reason}")
    args = engine_args(options)
    auth = {name: getattr(options, name) for name in AUTH_ARGS}
    auth["allow_unauthenticated"] = options.allow_unauthenticated or demo
    # built before Ray starts: bad app args or a missing or bad key file stop us here
    app = build_app({**args, **auth, "replicas": options.replicas, "metrics_port": options.metrics_port})
    if options.engine == "torch":  # a family the torch engine would run wrongly: refuse here, not in a replica
        from loraplex.training.architectures import require_torch_engine_architecture

        require_torch_engine_architecture(options.base_model)
    if not ray.is_initialized():
        ray.init(
            num_cpus=options.num_cpus,
            include_dashboard=False,
            _metrics_export_port=options.metrics_port,
            log_to_driver=False,
        )
    serve.start(
        http_options=HTTPOptions(host=options.host, port=options.http_port),
        grpc_options=gRPCOptions(port=options.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    serve.run(app, name=APP_NAME, route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def auth_summary(options: ServeOptions) -> str:
    from loraplex.serving.auth import AUTH_OFF_WARNING, keys_configured

    if keys_configured(options.api_keys):
        return "  auth  API keys required (authorization: Bearer <key>)"
    return "  auth  " + "!" * 20 + "\n  " + AUTH_OFF_WARNING + "\n  " + "!" * 20


def engine_summary(options: ServeOptions) -> str:
    """Which engine serves, and in what precision (vLLM's CPU build serves an nf4 request in bf16)."""
    if options.engine == "vllm":
        from loraplex.serving.engine.vllm_args import engine_summary as vllm_summary

        return f"  engine {vllm_summary(options.quantization)}"
    return f"  engine torch, base in {options.quantization}"


def serve_forever(options: ServeOptions, demo: bool = False) -> int:
    started = time.time()
    start(options, demo)
    print(
        f"loraplex serving {options.base_model} in {time.time() - started:.1f}s\n"
        f"{engine_summary(options)}\n"
        f"{auth_summary(options)}\n"
        f"  HTTP  http://{options.host}:{options.http_port}/v1  (OpenAI-compatible; model = adapter ID)\n"
        f"  gRPC  {options.host}:{options.grpc_port}  loraplex.v1.LoraplexService (metadata multiplexed_model_id)\n"
        f"  metrics http://{options.host}:{options.http_port}/metrics  (Ray exporter :{options.metrics_port})\n"
        "Ctrl-C or SIGTERM drains and stops.",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("draining requests in flight and stopping ...", flush=True)
    stop()
    return 0
