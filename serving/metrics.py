"""Every serving metric, defined once, with per-adapter labels.

Two exporters share these definitions: prometheus-client in a plain process (engine, tests),
and Ray's metrics inside Ray Serve replicas, which Ray exports in Prometheus text format on
each node's metrics port (`http://<node>:<metrics-export-port>/metrics`, names prefixed `ray_`).
"""

from __future__ import annotations

import logging

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# name -> (kind, description, labels, buckets)
DEFINITIONS = {
    "loraplex_requests_total": ("counter", "Requests by final status code", ("adapter", "code"), None),
    "loraplex_prompt_tokens_total": ("counter", "Prompt tokens processed", ("adapter",), None),
    "loraplex_generated_tokens_total": ("counter", "Tokens generated", ("adapter",), None),
    "loraplex_time_to_first_token_seconds": ("histogram", "Submit to first token", ("adapter",), LATENCY_BUCKETS),
    "loraplex_request_latency_seconds": ("histogram", "Submit to last token", ("adapter",), LATENCY_BUCKETS),
    "loraplex_queue_depth": ("gauge", "Requests waiting for a batch row", (), None),
    "loraplex_batch_size": ("histogram", "Requests decoded together per step", (), BATCH_BUCKETS),
    "loraplex_adapter_loads_total": ("counter", "Adapters loaded into a slot", ("adapter",), None),
    "loraplex_adapter_evictions_total": ("counter", "Adapters evicted from their slot", ("adapter",), None),
    "loraplex_adapter_load_seconds": (
        "histogram",
        "Validate + read + place one adapter",
        ("adapter",),
        LATENCY_BUCKETS,
    ),
    "loraplex_adapters_resident": ("gauge", "Adapters resident in memory", (), None),
}


class _PrometheusBackend:
    def __init__(self, registry=None) -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._metrics = {}
        for name, (kind, doc, labels, buckets) in DEFINITIONS.items():
            base = name.removesuffix("_total") if kind == "counter" else name
            cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[kind]
            extra = {"buckets": buckets} if buckets else {}
            self._metrics[name] = cls(base, doc, labels, registry=self.registry, **extra)

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        kind = DEFINITIONS[name][0]
        metric = self._metrics[name].labels(**labels) if labels else self._metrics[name]
        if kind == "counter":
            metric.inc(value)
        elif kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)

    def text(self) -> bytes:
        import prometheus_client as prom

        return prom.generate_latest(self.registry)


class _RayBackend:
    def __init__(self) -> None:
        from ray.util import metrics as ray_metrics

        self._metrics = {}
        for name, (kind, doc, labels, buckets) in DEFINITIONS.items():
            if kind == "counter":
                self._metrics[name] = ray_metrics.Counter(name, doc, tag_keys=labels)
            elif kind == "gauge":
                self._metrics[name] = ray_metrics.Gauge(name, doc, tag_keys=labels)
            else:
                self._metrics[name] = ray_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=labels)

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        kind = DEFINITIONS[name][0]
        if kind == "counter" and value <= 0:  # Ray counters refuse inc(0)
            return
        metric = self._metrics[name]
        tags = labels or None
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)

    def text(self) -> bytes:
        return b""  # Ray serves these on the node's metrics export port


class _Guarded:
    """A failing exporter logs and carries on: metrics must never break a request."""

    def __init__(self, backend) -> None:
        self._inner = backend

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        try:
            self._inner.record(name, value, labels)
        except Exception:
            logging.getLogger("loraplex.metrics").exception("recording %s failed", name)

    def text(self) -> bytes:
        return self._inner.text()


class ServingMetrics:
    """What the engine reports; one method per event, labels filled in here."""

    def __init__(self, backend: str = "prometheus") -> None:
        self._backend = _Guarded(_RayBackend() if backend == "ray" else _PrometheusBackend())

    def text(self) -> bytes:
        """Prometheus text exposition (prometheus backend only)."""
        return self._backend.text()

    def request_finished(
        self,
        adapter_id: str,
        reason: str,
        error,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
        ttft: float | None,
    ) -> None:
        from loraplex.serving.errors import classify

        adapter = adapter_id or "base"
        code = (
            "OK" if error is None and reason != "cancelled" else ("CANCELLED" if error is None else classify(error)[0])
        )
        self._backend.record("loraplex_requests_total", 1, {"adapter": adapter, "code": code})
        self._backend.record("loraplex_prompt_tokens_total", prompt_tokens, {"adapter": adapter})
        self._backend.record("loraplex_generated_tokens_total", completion_tokens, {"adapter": adapter})
        self._backend.record("loraplex_request_latency_seconds", latency, {"adapter": adapter})
        if ttft is not None:
            self._backend.record("loraplex_time_to_first_token_seconds", ttft, {"adapter": adapter})

    def request_refused(self, adapter_id: str, error: BaseException) -> None:
        """A request turned away before it reached the engine (bad params, auth, full queue)."""
        from loraplex.serving.errors import classify

        self._backend.record(
            "loraplex_requests_total", 1, {"adapter": adapter_id or "base", "code": classify(error)[0]}
        )

    def queue_depth(self, depth: int) -> None:
        self._backend.record("loraplex_queue_depth", depth, {})

    def batch_size(self, size: int) -> None:
        self._backend.record("loraplex_batch_size", size, {})

    def adapter_loaded(self, adapter_id: str, seconds: float, resident: int) -> None:
        self._backend.record("loraplex_adapter_loads_total", 1, {"adapter": adapter_id})
        self._backend.record("loraplex_adapter_load_seconds", seconds, {"adapter": adapter_id})
        self._backend.record("loraplex_adapters_resident", resident, {})

    def adapter_evicted(self, adapter_id: str, resident: int) -> None:
        self._backend.record("loraplex_adapter_evictions_total", 1, {"adapter": adapter_id})
        self._backend.record("loraplex_adapters_resident", resident, {})
