"""Triton readiness, mirrored into the servicer's routing and into gRPC health.

A background task polls the backend; the servicer reads the last snapshot (:class:`BackendState`)
instead of asking Triton on every call, so a down Triton costs a call nothing but a dictionary
lookup before it gets UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Iterable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from .backend import Backend
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class BackendState:
    """One readiness snapshot.

    Attributes:
        server_ready: Triton answers and reports itself ready (with strict readiness: every
            model loaded).
        ready_models: models Triton reports READY; an endpoint outside it gets UNAVAILABLE.
    """

    server_ready: bool = False
    ready_models: frozenset[str] = frozenset()

    def is_ready(self, model: str) -> bool:
        return model in self.ready_models


class HealthMonitor:
    """Polls ``backend`` every ``interval_s`` and publishes what it sees.

    Args:
        backend: what to poll.
        health: the gRPC health servicer; the empty service name and each of ``services`` are
            SERVING exactly while Triton is ready.
        services: fully qualified service names to report besides "".
        metrics: gets ``backend_ready``.
        interval_s: seconds between polls (also each poll's timeout).
    """

    def __init__(self, backend: Backend, health: health_aio.HealthServicer,
                 services: Iterable[str], metrics: ServerMetrics, interval_s: float):
        self._backend = backend
        self._health = health
        self._services = ("", *services)
        self._metrics = metrics
        self._interval_s = interval_s
        self.state = BackendState()

    async def poll_once(self) -> BackendState:
        """Take one snapshot and publish it; returns it."""
        timeout = max(self._interval_s, 0.5)
        server_ready, models = await asyncio.gather(
            self._backend.server_ready(timeout), self._backend.ready_models(timeout))
        state = BackendState(server_ready=server_ready, ready_models=frozenset(models))
        if state.server_ready != self.state.server_ready:
            log.info("Triton is %s", "ready" if state.server_ready else "NOT ready")
        if state.ready_models != self.state.ready_models:
            log.info("ready endpoints: %s", ", ".join(sorted(state.ready_models)) or "none")
        self.state = state
        status = SERVING if state.server_ready else NOT_SERVING
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
