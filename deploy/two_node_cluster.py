"""Try scale-out on one machine: a real two-node Ray cluster (two raylets), one replica per node.

    python deploy/two_node_cluster.py            # serves HTTP :8000 and gRPC :9000 until Ctrl-C

On real machines use the Ray CLI instead (see README "Scaling out"): each node offers one
`loraplex_slot`, and the app asks one per replica, so replicas spread one per node.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import HTTPOptions, gRPCOptions

    from loraplex.serving.app import build_app
    from loraplex.serving.grpc_servicer import SERVICER_FUNCTION
    from loraplex.training.base import ensure_base
    from loraplex.training.demo import ADAPTERS_DIR, ensure_demo_adapters

    base_dir = ensure_base()
    ensure_demo_adapters()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"loraplex_slot": 1}})
    nodes.add_node(num_cpus=1, resources={"loraplex_slot": 1})
    ray.init(address=nodes.address)
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=8000),
        grpc_options=gRPCOptions(port=9000, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    serve.run(
        build_app(
            {
                "base_model": str(base_dir),
                "adapters": str(ADAPTERS_DIR),
                "allow_unauthenticated": True,
                "replicas": 2,
                "replica_resources": {"loraplex_slot": 1},
            }
        ),
        name="loraplex",
        route_prefix="/",
    )
    print(
        "2 nodes, 2 replicas: http://127.0.0.1:8000/v1 and gRPC 127.0.0.1:9000 "
        "(the response's system_fingerprint / replica_id names the replica). Ctrl-C stops.",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
