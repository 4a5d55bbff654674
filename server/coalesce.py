"""Coalesce concurrent calls to one endpoint into fuller Triton requests, without adding wait.

Each endpoint has a lane. A request for a lane goes to Triton at once while the lane has fewer
than ``max_in_flight`` requests in flight (the endpoint's Triton instance count: more would
only wait in Triton's queue). Otherwise it waits in the lane, and when an in-flight request
returns, everything waiting goes together, in arrival order, up to the endpoint's
``max_batch_size`` rows per request (from its config.pbtxt). Waiting rows that already fill
``max_batch_size`` go at once: a full batch gains nothing by waiting. No timer is involved: a
request waits only while Triton is busy with the lane anyway, which is the wait Triton's own
queue would have imposed on it.

Each caller gets its own rows back, in its order. A failure that is about the backend, not the
rows (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED), fails every caller of the
merged request, as it would have failed each of them alone; any other failure (Triton rejecting
the batch, a wrong output shape) sends each caller's rows again on their own, so only the
caller whose rows caused it fails. Undecodable images never get here: they fail in decode,
before their call reaches the backend (with GPU decode, a file corrupt past its header does
reach Triton, and this retry keeps it from failing the other callers of a merged request).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from .backend import Backend
from .errors import ServingError
from .repository import EndpointSpec

log = logging.getLogger(__name__)

# Failures that say nothing about the rows: every caller of the merged request gets them.
_BACKEND_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


@dataclass(eq=False)
class _Waiting:
    batch: np.ndarray
    deadline: float  # event-loop time
    future: asyncio.Future


@dataclass(eq=False)
class _Lane:
    """One endpoint's requests (and input layout: rows of different shapes never merge)."""

    spec: EndpointSpec
    max_in_flight: int
    in_flight: int = 0
    waiting: collections.deque = field(default_factory=collections.deque)
    waiting_rows: int = 0


class Coalescer:
    """Sends an endpoint's chunks to ``backend``, merging those that overlap (see module doc).

    Args:
        backend: the Triton client (or a fake).
        enabled: False sends every chunk as it comes (the behaviour before coalescing).
        on_send: called with (spec, rows) for every request sent to the backend, for
            ``clipserve_batch_size``.
    """

    def __init__(self, backend: Backend, enabled: bool = True,
                 on_send: Callable[[EndpointSpec, int], None] | None = None):
        self._backend = backend
        self.enabled = enabled
        self._on_send = on_send or (lambda spec, rows: None)
        self._lanes: dict[tuple, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    async def embed(self, spec: EndpointSpec, batch: np.ndarray,
                    timeout_s: float) -> np.ndarray:
        """``spec``'s embeddings of ``batch`` (at most ``spec.max_batch_size`` rows), one row
        per row, within ``timeout_s``. Raises what :meth:`Backend.embed` raises."""
        limit = spec.max_batch_size
        if not self.enabled or limit <= 1 or len(batch) >= limit:
            return await self._send(spec, batch, timeout_s)
        key = (spec.name, batch.shape[1:], batch.dtype.str)
        lane = self._lanes.get(key)
        if lane is None or lane.spec is not spec:  # new, or the catalog was reloaded
            lane = self._lanes[key] = _Lane(spec, max(1, spec.instance_count))
        if lane.in_flight < lane.max_in_flight:
            lane.in_flight += 1
            try:
                return await self._send(spec, batch, timeout_s)
            finally:
                lane.in_flight -= 1
                self._drain(lane)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(batch, loop.time() + timeout_s, loop.create_future())
        lane.waiting.append(waiting)
        lane.waiting_rows += len(batch)
        if lane.waiting_rows >= limit:
            self._drain(lane)
        # A caller cancelled here (deadline, client gone) cancels its future: it is skipped
        # when its lane drains, or its rows are ignored if they already went.
        return await waiting.future

    async def _send(self, spec: EndpointSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        self._on_send(spec, len(batch))
        return await self._backend.embed(spec.triton_model, spec.triton_input, batch,
                                         timeout_s)

    def _drain(self, lane: _Lane) -> None:
        """Start requests for the lane's waiting rows while it has room in flight, and for
        every full batch waiting regardless."""
        limit = lane.spec.max_batch_size
        while lane.waiting and (lane.in_flight < lane.max_in_flight
                                or lane.waiting_rows >= limit):
            group: list[_Waiting] = []
            rows = 0
            while lane.waiting and rows + len(lane.waiting[0].batch) <= limit:
                waiting = lane.waiting.popleft()
                lane.waiting_rows -= len(waiting.batch)
                if not waiting.future.done():  # done: its caller was cancelled
                    group.append(waiting)
                    rows += len(waiting.batch)
            if not group:
                continue
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run_group(lane, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_group(self, lane: _Lane, group: list[_Waiting]) -> None:
        try:
            await self._answer(lane.spec, group)
        finally:
            lane.in_flight -= 1
            self._drain(lane)

    async def _answer(self, spec: EndpointSpec, group: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        timeout_s = max(w.deadline for w in group) - loop.time()
        batch = (group[0].batch if len(group) == 1
                 else np.concatenate([w.batch for w in group]))
        try:
            if timeout_s <= 0:
                raise ServingError.deadline_exceeded()
            vectors = await self._send(spec, batch, timeout_s)
            if len(vectors) != len(batch):
                raise RuntimeError(f"{spec.name} returned {len(vectors)} rows for a batch of "
                                   f"{len(batch)}")
        except asyncio.CancelledError:
            for w in group:
                if not w.future.done():
                    w.future.cancel()
            raise
        except Exception as exc:
            if (len(group) > 1 and not (isinstance(exc, ServingError)
                                        and exc.code in _BACKEND_CODES)):
                # Not about the backend: maybe about one caller's rows. Each on its own.
                log.info("%s: a coalesced request of %d calls failed (%s); sending each call "
                         "on its own", spec.name, len(group), exc)
                await asyncio.gather(*(self._answer(spec, [w]) for w in group))
                return
            for w in group:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        start = 0
        for w in group:
            end = start + len(w.batch)
            if not w.future.done():
                w.future.set_result(vectors[start:end])
            start = end

    async def close(self) -> None:
        """Cancel merged requests still running (their callers get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
