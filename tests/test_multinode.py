"""A real two-node Ray cluster on this machine (two raylets), one ModelServer replica per node.

Shows adapter-affinity routing (repeated requests for one adapter land on the replica that loaded
it, read from the response's replica ID) and that the app keeps serving from the head node
after the second node is stopped.
"""

from __future__ import annotations

import shutil
import time

import pytest

from loraplex.training.demo import demo_adapter_dir, demo_tenants
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray Serve is part of the dev setup (make test)")

PROMPT = "Ticket: my invoice is wrong\nQueue:\n"


@pytest.fixture(scope="module")
def cluster(embedded_base, tmp_path_factory):
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import HTTPOptions

    from loraplex.serving.app import build_app

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    store = tmp_path_factory.mktemp("store")
    for tenant in demo_tenants():
        shutil.copytree(demo_adapter_dir(tenant), store / tenant)
    # each node offers one "loraplex_slot": a replica takes one, so the two replicas land on two nodes
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"loraplex_slot": 1}})
    worker = nodes.add_node(num_cpus=1, resources={"loraplex_slot": 1})
    ray.init(address=nodes.address)
    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    serve.run(
        build_app(
            {
                "base_model": str(embedded_base),
                "adapters": str(store),
                "replicas": 2,
                "allow_unauthenticated": True,
                "replica_resources": {"loraplex_slot": 1},
            }
        ),
        name="loraplex",
        route_prefix="/",
    )
    yield nodes, worker, f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()


def ask(base_url: str, adapter: str) -> str:
    """The answering replica's ID (OpenAI `system_fingerprint`)."""
    import httpx

    body = {"model": adapter, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{base_url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["system_fingerprint"]


def test_two_nodes_affinity_routing_then_survive_a_node_stop(cluster):
    nodes, worker, base_url = cluster
    from ray.util.state import list_actors

    replicas = list_actors(filters=[("class_name", "=", "ServeReplica:loraplex:ModelServer"), ("state", "=", "ALIVE")])
    assert len({r.node_id for r in replicas}) == 2  # one replica per node

    for tenant in demo_tenants():
        ask(base_url, tenant)  # loads the adapter on some replica
    # a replica reports the adapters it holds to Serve's controller, which pushes that to the
    # routers: affinity applies once that round trip is done. Poll for it (answers from one
    # replica in a row), then hold it to 8 more.
    deadline = time.monotonic() + 60
    while not all(len({ask(base_url, tenant) for _ in range(3)}) == 1 for tenant in demo_tenants()):
        assert time.monotonic() < deadline, "affinity never settled"
    for tenant in demo_tenants():
        first = ask(base_url, tenant)
        repeats = {ask(base_url, tenant) for _ in range(8)}
        assert repeats == {first}, (tenant, first, repeats)  # affinity: the replica that holds it

    nodes.remove_node(worker)
    deadline, answered, failures = time.monotonic() + 120, set(), 0
    while time.monotonic() < deadline and len(answered) < 10:
        try:
            answered.add(ask(base_url, "initech-tickets") + str(len(answered)))
        except Exception:
            failures += 1  # only while Serve notices the dead replica
            time.sleep(1)
    assert len(answered) == 10, failures
    print(f"\nafter the node stop: {failures} failed request(s) while Serve replaced its routing, then 10 served")
    # once the head's replica answers, it keeps answering: no outage beyond the switch
    assert all(ask(base_url, tenant) for tenant in demo_tenants())
