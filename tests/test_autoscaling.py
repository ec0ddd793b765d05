"""Serve autoscaling on loopback: a bounded load scales ModelServer 1 -> 2 replicas, and back to 1."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from loraplex.training.demo import demo_adapter_dir, demo_tenants

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Serve is part of the dev setup (make test)")


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["loraplex"].deployments["ModelServer"]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_bounded_load_scales_one_to_two_and_back(embedded_base, tmp_path):
    import httpx
    from ray import serve
    from ray.serve.config import HTTPOptions

    from loraplex.serving.app import build_app
    from tests.conftest import free_port

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    for tenant in demo_tenants():
        shutil.copytree(demo_adapter_dir(tenant), tmp_path / tenant)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        scaling = {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        }
        serve.run(
            build_app(
                {
                    "base_model": str(embedded_base),
                    "adapters": str(tmp_path),
                    "autoscaling_config": scaling,
                    "allow_unauthenticated": True,
                }
            ),
            name="loraplex",
            route_prefix="/",
        )
        assert running_replicas() == 1

        stop, sent, errors = threading.Event(), [0], []
        body = {
            "model": "initech-tickets",
            "prompt": "Ticket: my invoice is wrong\nQueue:\n",
            "max_tokens": 32,
            "temperature": 0,
        }

        def client():
            with httpx.Client(timeout=120) as http:
                while not stop.is_set() and sent[0] < 2000:  # bounded in time (below) and in count
                    try:
                        http.post(f"http://127.0.0.1:{port}/v1/completions", json=body).raise_for_status()
                        sent[0] += 1
                    except Exception as exc:
                        errors.append(exc)

        clients = [threading.Thread(target=client) for _ in range(12)]
        for c in clients:
            c.start()
        try:
            scaled_up = wait_for(lambda: running_replicas() == 2, timeout=90)
        finally:
            stop.set()
            for c in clients:
                c.join(150)
        assert scaled_up, serve.status().applications["loraplex"].deployments["ModelServer"]
        assert not errors, errors[:3]
        assert wait_for(lambda: running_replicas() == 1, timeout=90)  # idle again: back to min_replicas
        print(f"\n1 -> 2 -> 1 replicas; {sent[0]} requests, none failed")
    finally:
        serve.shutdown()
        ray.shutdown()
