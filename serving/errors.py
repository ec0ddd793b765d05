"""Serving's domain errors and the one table that maps them to gRPC codes and HTTP statuses."""

from __future__ import annotations

from loraplex.training.errors import InvalidAdapterId, LoraplexError


class InvalidRequest(LoraplexError):
    """Bad request parameters; the message says which and why."""


class AdapterNotFound(LoraplexError):
    """No adapter with this ID in the store."""


class AdapterRejected(LoraplexError):
    """The adapter exists but fails validation; the reason says why."""


class NoFreeSlot(LoraplexError):
    """Every adapter slot holds a pinned or busy adapter."""


class QueueFull(LoraplexError):
    """The bounded request queue is full."""


class DeadlineExceeded(LoraplexError):
    """The request ran past its deadline."""


class EngineStopped(LoraplexError):
    """The engine is shutting down and takes no new requests."""


class TenantLimitExceeded(LoraplexError):
    """A tenant's own limit: concurrent requests, prompt tokens or new tokens."""


class ReplicaUnavailable(LoraplexError):
    """The replica serving the request died or went away; a retry lands on a live one."""


class Unauthenticated(LoraplexError):
    """Missing or unknown API key."""


class PermissionDenied(LoraplexError):
    """The key is valid but may not use this adapter or RPC."""


# error type -> (gRPC status code name, HTTP status, OpenAI error type)
ERROR_TABLE: dict[type, tuple[str, int, str]] = {
    InvalidRequest: ("INVALID_ARGUMENT", 400, "invalid_request_error"),
    InvalidAdapterId: ("INVALID_ARGUMENT", 400, "invalid_request_error"),
    AdapterNotFound: ("NOT_FOUND", 404, "not_found_error"),
    AdapterRejected: ("FAILED_PRECONDITION", 422, "invalid_request_error"),
    NoFreeSlot: ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    QueueFull: ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    TenantLimitExceeded: ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 504, "timeout_error"),
    ReplicaUnavailable: ("UNAVAILABLE", 503, "server_error"),
    EngineStopped: ("UNAVAILABLE", 503, "server_error"),
    Unauthenticated: ("UNAUTHENTICATED", 401, "authentication_error"),
    PermissionDenied: ("PERMISSION_DENIED", 403, "permission_error"),
}


def classify(exc: BaseException) -> tuple[str, int, str]:
    """The (gRPC code, HTTP status, OpenAI type) for an exception; unknown errors are INTERNAL."""
    for kind in type(exc).__mro__:
        if kind in ERROR_TABLE:
            return ERROR_TABLE[kind]
    return ("INTERNAL", 500, "server_error")


def replica_cause(exc: BaseException) -> BaseException:
    """The original error behind Ray's RayTaskError wrapper; a dead replica becomes UNAVAILABLE."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (RayActorError, ActorUnavailableError)):
        return ReplicaUnavailable(
            f"the replica serving this request went away ({type(cause).__name__}); "
            "retry: Ray Serve routes it to a live replica"
        )
    return cause
