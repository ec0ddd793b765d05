"""The servicer function Ray Serve's gRPC proxy imports: registers LoraplexService and the
standard health service, and installs the Ray patches (serving/ray_compat.py) that make client
cancellation reach the replica and carry the client's deadline to the Router.
"""

from __future__ import annotations

from loraplex.serving import ray_compat
from loraplex.v1 import loraplex_pb2_grpc

SERVICER_FUNCTION = "loraplex.serving.grpc_servicer.add_servicer_to_server"


def add_servicer_to_server(servicer, server) -> None:
    """LoraplexService, plus the standard grpc.health.v1.Health (answered by the Router's Check)."""
    from grpc_health.v1 import health_pb2_grpc

    ray_compat.install()
    loraplex_pb2_grpc.add_LoraplexServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
