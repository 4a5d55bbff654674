"""Triton readiness, mirrored into the servicer's routing and into gRPC health.

A background task polls the backend; the servicer reads the last snapshot (:class:`BackendState`)
instead of asking Triton on every call, so a down Triton costs a call nothing but a dictionary
lookup before it gets UNAVAILABLE.

Warm-up is part of readiness: an endpoint of the repository that Triton reports READY becomes
routable only once it has answered one warm-up request from the gateway (a batch of one zero
input through the same Triton client the calls use, so its gRPC channel, Triton's scheduler and
the model's first run are paid before a user's call), and the gateway reports SERVING (gRPC
health, HTTP readiness) only once every such endpoint has. Triton's own ``model_warmup`` in
config.pbtxt warms each instance before the model is READY; this one also covers a repository
exported without it and the path from the gateway to Triton. An endpoint that leaves READY
(Triton restarted) warms up again when it comes back.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from clipserve.endpoints import Tower

from .backend import Backend
from .images import pack_encoded
from .metrics import ServerMetrics
from .repository import Catalog

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class BackendState:
    """One readiness snapshot.

    Attributes:
        server_ready: Triton answers and reports itself ready (with strict readiness: every
            model loaded).
        ready_models: models Triton reports READY that are routable (repository endpoints
            only once they answered their warm-up request); an endpoint outside it gets
            UNAVAILABLE.
        serving: what health and HTTP readiness report: Triton ready and every repository
            endpoint it reports READY warmed up.
    """

    server_ready: bool = False
    ready_models: frozenset[str] = frozenset()
    serving: bool = False

    def is_ready(self, model: str) -> bool:
        return model in self.ready_models


@dataclass(frozen=True)
class Warmup:
    """The warm-up request of one endpoint: ``batch`` fed as ``input_name``."""

    input_name: str
    batch: np.ndarray


@functools.lru_cache(maxsize=1)
def _warmup_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def catalog_warmups(catalog: Catalog) -> Callable[[str], Warmup | None]:
    """Warm-up requests for the endpoints of ``catalog`` (looked up when needed, so endpoints
    added to the catalog later warm up too): one zero input of the endpoint's shape and dtype,
    as Triton's ``zero_data`` warm-up (a GPU-decode endpoint's ensemble: a small JPEG, which also
    starts its DALI pipeline); None for a model that is not an endpoint."""
    def warmup(model: str) -> Warmup | None:
        spec = catalog.by_name(model)
        if spec is None:  # a GPU-decode ensemble: one small real JPEG (zeros would not decode)
            spec = next((s for s in catalog if s.gpu_decode and s.triton_model == model), None)
            return (None if spec is None
                    else Warmup(spec.triton_input, pack_encoded([_warmup_jpeg()])))
        if spec.tower is Tower.IMAGE:
            size = spec.sidecar.image_size
            return Warmup(spec.input_name, np.zeros((1, size, size, 3), np.uint8))
        return Warmup(spec.input_name, np.zeros((1, spec.sidecar.context_length), np.int32))
    return warmup


class HealthMonitor:
    """Polls ``backend`` every ``interval_s``, warms up newly ready endpoints, and publishes
    what it sees.

    Args:
        backend: what to poll.
        health: the gRPC health servicer; the empty service name and each of ``services`` are
            SERVING exactly while :attr:`BackendState.serving`.
        services: fully qualified service names to report besides "".
        metrics: gets ``backend_ready``.
        interval_s: seconds between polls (also each readiness RPC's timeout).
        warmups: the warm-up request of a model (None: the model needs none, e.g. not an
            endpoint); None: no warm-up at all, a READY model is routable at once.
        warmup_timeout_s: deadline of one warm-up request; one that fails or times out is
            logged and retried at the next poll, its endpoint not routable until it succeeds.
        on_models: called with Triton's READY models whenever that set changes, before they
            are warmed up (the gateway refreshes its catalog from the repository there, so a
            model added while serving is warmed up and routed in the same poll).

    Once the gateway has been SERVING, an endpoint it has never warmed up (added to the
    repository while serving) does not take it back to NOT_SERVING while Triton loads it and
    it warms up: it is simply not routable yet. One that was warm before and left READY
    (Triton restarted, the model failed) does; one removed from the catalog no longer counts.
    """

    def __init__(self, backend: Backend, health: health_aio.HealthServicer,
                 services: Iterable[str], metrics: ServerMetrics, interval_s: float,
                 warmups: Callable[[str], Warmup | None] | None = None,
                 warmup_timeout_s: float = 60.0,
                 on_models: Callable[[frozenset[str]], None] | None = None):
        self._backend = backend
        self._health = health
        self._services = ("", *services)
        self._metrics = metrics
        self._interval_s = interval_s
        self._warmups = warmups or (lambda model: None)
        self._warmup_timeout_s = warmup_timeout_s
        self._warm: set[str] = set()
        self._ever_warm: set[str] = set()
        self._served = False
        self._on_models = on_models
        self._models: frozenset[str] | None = None
        self.state = BackendState()

    async def _warm_up(self, model: str, warmup: Warmup) -> None:
        start = time.perf_counter()
        try:
            await self._backend.embed(model, warmup.input_name, warmup.batch,
                                      self._warmup_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ServingError or a backend bug: retried at the next poll
            log.warning("%s: warm-up request failed (%s); not routable until one succeeds",
                        model, exc)
            return
        self._warm.add(model)
        self._ever_warm.add(model)
        log.info("%s answered its warm-up request in %.1f ms", model,
                 (time.perf_counter() - start) * 1e3)

    async def poll_once(self) -> BackendState:
        """Take one snapshot, warm up the endpoints that became READY, publish it; returns
        it. Waits for those warm-ups (each bounded by ``warmup_timeout_s``)."""
        timeout = max(self._interval_s, 0.5)
        server_ready, models = await asyncio.gather(
            self._backend.server_ready(timeout), self._backend.ready_models(timeout))
        models = frozenset(models)
        if models != self._models and self._on_models is not None:
            try:
                self._on_models(models)
            except Exception:  # a catalog refresh bug must not stop readiness polling
                log.exception("handling Triton's model set failed")
        self._models = models
        self._warm &= models  # one that left READY (Triton restarted) warms up again
        pending = {m: w for m in sorted(models - self._warm)
                   if (w := self._warmups(m)) is not None}
        if pending:
            await asyncio.gather(*(self._warm_up(m, w) for m, w in pending.items()))
        routable = frozenset(m for m in models if m in self._warm or m not in pending)
        # Endpoints warmed up before and still in the catalog (a removed one has no warm-up).
        self._ever_warm = {m for m in self._ever_warm if self._warmups(m) is not None}
        if self._served and self._ever_warm:
            # Under --strict-readiness Triton is not ready while it loads a model added to a
            # polled repository; what the gateway serves is unaffected, so it stays SERVING
            # while every endpoint it has warmed up is READY and warm.
            serving = self._ever_warm <= routable
        else:
            serving = server_ready and routable == models
        state = BackendState(server_ready=server_ready, ready_models=routable, serving=serving)
        self._served = self._served or state.serving
        if state.server_ready != self.state.server_ready:
            log.info("Triton is %s", "ready" if state.server_ready else "NOT ready")
        if state.ready_models != self.state.ready_models:
            log.info("ready endpoints: %s", ", ".join(sorted(state.ready_models)) or "none")
        if state.serving != self.state.serving:
            log.info("health: %s", "SERVING" if state.serving else "NOT_SERVING")
        self.state = state
        status = SERVING if state.serving else NOT_SERVING
        for service in self._services:
            await self._health.set(service, status)
        self._metrics.backend_ready.set(1 if state.server_ready else 0)
        return state

    async def run(self) -> None:
        """Poll until cancelled; a failing poll is logged and retried, never fatal."""
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("readiness poll failed")
            await asyncio.sleep(self._interval_s)
