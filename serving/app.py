"""Ray Serve application: a Router ingress (gRPC + OpenAI HTTP) in front of multiplexed ModelServers.

    client --gRPC :9000 (metadata multiplexed_model_id)--> Router --handle.options(multiplexed_model_id)--> ModelServer
    client --HTTP :8000 (/v1/..., body "model")---------/                                                  (Engine)

`serving/router.py` is the ingress, `serving/model_server.py` the engine replica,
`serving/openai_http.py` the OpenAI shapes; this module builds the app from its args.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, fields
from pathlib import Path

from loraplex.serving.auth import AUTH_OFF_WARNING, auth_from_args
from loraplex.serving.engine.api import EngineConfig, require_base_dir
from loraplex.serving.engine.vllm_args import vllm_needs_gpu
from loraplex.serving.model_server import ModelServer
from loraplex.serving.router import Router

logger = logging.getLogger("ray.serve")


def build_app(args: dict | None = None):
    """Serve app builder (`import_path: loraplex.serving.app:build_app`); args are EngineConfig fields plus
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
    for name in ("base_model", "adapters", "adapter_base"):  # replicas do not share the driver's cwd
        if args.get(name):
            args[name] = str(Path(args[name]).resolve())
    if not args.get("threads"):  # replicas on one machine share its CPUs (Ray would give each one thread)
        most = int((autoscaling or {}).get("max_replicas", replicas))
        args["threads"] = max(1, len(os.sched_getaffinity(0)) // max(1, most))
    config = EngineConfig(**args)
    require_base_dir(config)  # a missing base fails here, not in every replica
    # Ray hides GPUs from actors that did not ask for one: vLLM (unless its CPU build is what is
    # installed), or the torch engine on cuda, asks.
    gpus = 1 if config.device == "cuda" or config.engine == "vllm" and vllm_needs_gpu() else 0
    scale = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    server = ModelServer.options(
        **scale, ray_actor_options={"num_cpus": 0, "num_gpus": gpus, "resources": replica_resources}
    )
    server = server.bind(asdict(config))
    return Router.bind(server, metrics_port, api_keys, asdict(limits))
