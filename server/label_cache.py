"""Label text embeddings per (scale, precision, labels, prompt templates), computed once (single
flight) so neither live scoring nor Classify re-embeds prompts per call."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from clipserve.endpoints import Precision

from .bounded_store import ENTRY_OVERHEAD, BoundedStore
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

LABEL_SLOT = "{}"  # where a label goes in a prompt template


@dataclass(frozen=True)
class LabelSetKey:
    """A label set as one text endpoint embeds it."""

    scale: str
    precision: Precision
    labels: tuple[str, ...]
    templates: tuple[str, ...]

    def prompts(self) -> list[str]:
        """Label-major: the prompts of label 0, then of label 1, ..."""
        return [t.replace(LABEL_SLOT, label) for label in self.labels for t in self.templates]


class LabelEmbeddingCache:
    """Label embeddings [n_labels, D] per :class:`LabelSetKey`, computed at most once at a time.

    Args:
        compute: embeds one key's prompts (:meth:`.embedder.Embedder.embed_prompts`).
        metrics: gets hit/miss counts.
        max_bytes: memory budget (least recently used sets go first).
        retry_s: after a failed background fill, :meth:`prefetch` waits this long before
            trying the same key again (so a down text endpoint is not hammered per call).
    """

    def __init__(self, compute: Callable[[LabelSetKey], Awaitable[np.ndarray]],
                 metrics: ServerMetrics, max_bytes: int, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._compute = compute
        self._metrics = metrics
        self._done = BoundedStore(max_bytes, lru=True, clock=clock)
        self._pending: dict[LabelSetKey, asyncio.Task] = {}
        self._failed_at: dict[LabelSetKey, float] = {}
        self._retry_s = retry_s
        self._clock = clock
        self._hit = metrics.label_cache.labels(result="hit")
        self._miss = metrics.label_cache.labels(result="miss")

    def __len__(self) -> int:
        return len(self._done)

    def has(self, key: LabelSetKey) -> bool:
        """Whether ``key`` is computed (not counted as a lookup)."""
        return key in self._done

    def peek(self, key: LabelSetKey) -> np.ndarray | None:
        """The embeddings if computed, else None (never waits)."""
        value = self._done.get(key)
        (self._miss if value is None else self._hit).inc()
        return value

    async def get(self, key: LabelSetKey) -> np.ndarray:
        """The embeddings, computing them if needed; concurrent callers share one computation,
        and a caller that gives up (deadline) does not cancel it for the others.

        Raises:
            whatever ``compute`` raised (ServingError UNAVAILABLE while the endpoint is down).
        """
        value = self.peek(key)
        if value is not None:
            return value
        return await self.compute(key)

    async def compute(self, key: LabelSetKey) -> np.ndarray:
        """The embeddings of a key :meth:`peek` just missed: joins (or starts) the one
        computation of ``key`` without counting another lookup. Raises like :meth:`get`."""
        return await asyncio.shield(self._start(key))

    def prefetch(self, key: LabelSetKey) -> None:
        """Start computing ``key`` in the background unless done, under way, or failed less
        than retry_s ago."""
        if key in self._done or key in self._pending:
            return
        failed = self._failed_at.get(key)
        if failed is not None and self._clock() - failed < self._retry_s:
            return
        self._start(key)

    def _start(self, key: LabelSetKey) -> asyncio.Task:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._fill(key), name="label-embeddings")
            self._pending[key] = task
            task.add_done_callback(_retrieve)
        return task

    async def _fill(self, key: LabelSetKey) -> np.ndarray:
        try:
            value = await self._compute(key)
            self._done.put(key, value, value.nbytes + ENTRY_OVERHEAD)
            self._failed_at.pop(key, None)
            return value
        except Exception:
            if len(self._failed_at) > 1024:  # request label sets could be many: stay bounded
                self._failed_at.clear()
            self._failed_at[key] = self._clock()
            raise
        finally:
            self._pending.pop(key, None)


def _retrieve(task: asyncio.Task) -> None:
    # Mark the failure retrieved (a prefetch has no awaiter); callers that care log it.
    if not task.cancelled() and task.exception() is not None:
        log.debug("computing label embeddings failed: %s", task.exception())
