"""The gateway's Prometheus metrics, all declared here, on a registry passed in.

Minimal for now (a later issue grows this module); the seam is :class:`ServerMetrics`. Naming:
prefix ``clipserve_``, base units (seconds), ``_total`` counters. Every label value comes from an
enum or from the repository's scales, never from request data, so cardinality is bounded:
``method`` is a :class:`Method`, ``precision`` a Precision value, ``code`` a grpc.StatusCode
name, ``scale`` a scale of the repository (or ``none`` when a call failed before routing).
"""

from __future__ import annotations

import enum

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clipserve.endpoints import Precision, Tower

NO_ROUTE = "none"  # scale/precision label of calls rejected before an endpoint was chosen

# Seconds. From ~1 ms (a cached small text batch) to the default 30 s deadline.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class Method(str, enum.Enum):
    """The RPCs, as metric label values."""

    EMBED_IMAGES = "EmbedImages"
    EMBED_TEXTS = "EmbedTexts"
    EMBED_STREAM = "EmbedStream"
    CLASSIFY = "Classify"
    LIST_MODELS = "ListModels"


class ServerMetrics:
    """Every gateway metric, registered on ``registry`` (tests pass a fresh one).

    Args:
        registry: where to register.
        scales: the repository's scales, the only values the ``scale`` label takes besides
            ``none``.
    """

    def __init__(self, registry: CollectorRegistry, scales: tuple[str, ...]):
        self._scales = frozenset(scales)
        self.requests = Counter(
            "clipserve_requests_total", "Finished calls, by outcome.",
            ["method", "scale", "precision", "code"], registry=registry)
        self.request_duration = Histogram(
            "clipserve_request_duration_seconds",
            "Wall time from receiving a call to its last response message.",
            ["method", "scale", "precision"], buckets=LATENCY_BUCKETS, registry=registry)
        self.items = Counter(
            "clipserve_items_total", "Images and texts embedded successfully.",
            ["tower", "scale", "precision"], registry=registry)
        self.backend_ready = Gauge(
            "clipserve_backend_ready", "1 while Triton reports itself ready, else 0.",
            registry=registry)
        self.routing_reloads = Counter(
            "clipserve_routing_reloads_total", "Routing file reloads, by result.",
            ["result"], registry=registry)
        for result in ("ok", "error"):
            self.routing_reloads.labels(result=result)

    def _scale(self, scale: str | None) -> str:
        return scale if scale in self._scales else NO_ROUTE

    def observe_call(self, method: Method, scale: str | None, precision: Precision | None,
                     code: grpc.StatusCode, seconds: float) -> None:
        """Record one finished call."""
        scale_label = self._scale(scale)
        precision_label = precision.value if precision is not None else NO_ROUTE
        self.requests.labels(method=method.value, scale=scale_label,
                             precision=precision_label, code=code.name).inc()
        self.request_duration.labels(method=method.value, scale=scale_label,
                                     precision=precision_label).observe(seconds)

    def observe_items(self, tower: Tower, scale: str, precision: Precision, count: int) -> None:
        """Record ``count`` items embedded by one endpoint."""
        self.items.labels(tower=tower.value, scale=self._scale(scale),
                          precision=precision.value).inc(count)
