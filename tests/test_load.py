"""The #5 load bar on loopback: 2,000 requests over 8 adapters, gRPC and HTTP, auth on, one of
two replicas killed midway. Nothing lost, duplicated or answered by the wrong adapter; only
requests in flight on the killed replica may fail, each with UNAVAILABLE / 503."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "benchmarks"))


def test_2000_requests_over_8_adapters_with_a_replica_killed_midway(embedded_base, tmp_path):
    from load_test import MUST_BE_ZERO, PROMPTS, prepare_store, run_load

    from loraplex.serving.launch import ServeOptions, start, stop

    adapters, keys, key_file = prepare_store(tmp_path, embedded_base)
    options = ServeOptions(
        base_model=str(embedded_base),
        adapters=str(tmp_path / "store"),
        api_keys=str(key_file),
        replicas=2,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        num_cpus=2,
        max_batch=16,
    )
    start(options)
    try:
        result = run_load(
            options.grpc_port, options.http_port, adapters, keys, clients=16, requests=2000, kill_at=0.5, time_limit=900
        )
    finally:
        stop()
    checks = result.checks
    print({k: v for k, v in checks.items() if k != "replicas_seen"}, f"{result.seconds:.0f}s")
    assert checks["requests"] == 2000 and checks["adapters"] == 8 and result.killed
    assert set(checks["by_kind"]) == {"grpc", "grpc-stream", "http", "http-stream"}
    # the check can see a wrong adapter: the 8 adapters answer each prompt differently
    assert all(n >= 6 for n in checks["distinct_answers_per_prompt"]) and len(
        checks["distinct_answers_per_prompt"]
    ) == len(PROMPTS)
    for name in MUST_BE_ZERO:
        assert checks[name] == 0, (name, checks)
    assert checks["failed"] <= 16  # at most the clients' requests in flight at the kill
    assert len(checks["replicas_seen"]) >= 2  # both replicas served
