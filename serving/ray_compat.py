"""Every patch loraplex makes to Ray internals, in one place.

Each patch names the Ray versions it was checked against, asserts the signature of what it
replaces (a clear startup error, never a silent no-op, when Ray changes), and links the
upstream behaviour. `tests/test_ray_compat.py` fails when a patched target's source changes.

1. Cancel on early close. Ray Serve's gRPC proxy can miss a client's cancel of a server
   stream: when the cancel lands while the proxy writes a message, the stream closes with
   GeneratorExit, which `gRPCProxy.send_request_to_replica` swallows without cancelling the
   replica's request (3-5 of 10 cancels were lost here). The wrapper cancels the request when
   its stream closes early (20/20).
   Upstream: ray/serve/_private/proxy.py, gRPCProxy.send_request_to_replica.
2. Carry the deadline. grpc turns the `grpc-timeout` header into a deadline and strips it, and
   the serializable `RayServegRPCContext` copies the metadata but not the deadline, so a
   replica could not stop a request at its deadline. The proxy side records it as
   `loraplex_deadline` (epoch seconds). The metadata cannot carry it instead: the context is
   built from the proxy's own grpc context, after grpc has consumed the header, and Ray gives no
   hook in between.
   Upstream: ray/serve/grpc_util.py, RayServegRPCContext.__init__.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable

logger = logging.getLogger("ray.serve")

# Ray minor versions these patches were read against; outside them, startup stops with a message.
TESTED_RAY = ("2.60",)
# sha256 of inspect.getsource() of each target, as read in the tested release
TARGET_SOURCE_SHA256 = {
    "gRPCProxy.send_request_to_replica": "6672adde24dba281f2b3f163d45a680bfe488fcf34b0b8fdb0272cce8fcc8282",
    "RayServegRPCContext.__init__": "997528f315057d06685a5b5b5845243a691afe5955fbf2ab02c08571e7bf1375",
}
SIGNATURES = {
    "gRPCProxy.send_request_to_replica": [
        "self",
        "request_id",
        "internal_request_id",
        "handle",
        "proxy_request",
        "app_is_cross_language",
    ],
    "RayServegRPCContext.__init__": ["self", "grpc_context"],
}


class RayCompatError(RuntimeError):
    """The installed Ray is not one these patches were checked against."""


def ray_minor() -> str:
    import ray

    return ".".join(ray.__version__.split(".")[:2])


def targets() -> dict[str, Callable]:
    from ray.serve._private.proxy import gRPCProxy
    from ray.serve.grpc_util import RayServegRPCContext

    return {
        "gRPCProxy.send_request_to_replica": gRPCProxy.send_request_to_replica,
        "RayServegRPCContext.__init__": RayServegRPCContext.__init__,
    }


def source_sha256(function: Callable) -> str:
    function = getattr(function, "loraplex_original", function)
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def check_ray() -> None:
    """Refuse to patch a Ray whose version or target signatures differ from what was checked."""
    if ray_minor() not in TESTED_RAY:
        raise RayCompatError(
            f"loraplex's Ray patches (serving/ray_compat.py) were checked on Ray {TESTED_RAY}, "
            f"not {ray_minor()}: install ray[serve]=={TESTED_RAY[-1]}.* or re-check them"
        )
    for name, function in targets().items():
        params = list(inspect.signature(getattr(function, "loraplex_original", function)).parameters)
        if params != SIGNATURES[name]:
            raise RayCompatError(
                f"Ray's {name} changed signature ({params}, expected {SIGNATURES[name]}): "
                "re-check serving/ray_compat.py"
            )


def _cancel_on_early_close() -> None:
    from ray.serve._private.proxy import gRPCProxy

    original = gRPCProxy.send_request_to_replica
    if hasattr(original, "loraplex_original"):
        return

    async def send_request_to_replica(self, *args, handle, **kwargs):
        responses = []

        class RecordingHandle:
            def __getattr__(self, name):
                return getattr(handle, name)

            def remote(self, *a, **kw):
                responses.append(handle.remote(*a, **kw))
                return responses[-1]

        inner = original(self, *args, handle=RecordingHandle(), **kwargs)
        completed = False
        try:
            async for message in inner:
                yield message
            completed = True
        finally:
            if not completed:
                for response in responses:
                    response.cancel()
                await inner.aclose()

    send_request_to_replica.loraplex_original = original
    gRPCProxy.send_request_to_replica = send_request_to_replica
    logger.info("loraplex: gRPC proxy cancels replica requests when a client goes away")


def _carry_deadline() -> None:
    from ray.serve.grpc_util import RayServegRPCContext

    original = RayServegRPCContext.__init__
    if hasattr(original, "loraplex_original"):
        return

    def __init__(self, grpc_context) -> None:
        original(self, grpc_context)
        remaining = grpc_context.time_remaining()
        self.loraplex_deadline = (
            None if remaining is None or math.isinf(remaining) or remaining > 1e7 else time.time() + remaining
        )

    __init__.loraplex_original = original
    RayServegRPCContext.__init__ = __init__


def install() -> None:
    """Apply both patches (idempotent); called where Ray's gRPC proxy loads our servicer."""
    check_ray()
    _cancel_on_early_close()
    _carry_deadline()
