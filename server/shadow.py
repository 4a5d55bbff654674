"""The shadow: mirror a fraction of image calls to a reference precision from a byte-bounded
queue, drained by one background task; a full queue drops (and counts) instead of waiting, so
the caller never pays for it."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from clipserve.calibration import compare_to_reference
from clipserve.endpoints import Precision, Tower

from .bounded_store import ENTRY_OVERHEAD
from .label_cache import LabelEmbeddingCache, LabelSetKey
from .metrics import ServerMetrics, ShadowDrop
from .repository import Catalog, EndpointSpec

log = logging.getLogger(__name__)


@dataclass
class ShadowJob:
    """One mirrored image call: the pixels the served endpoint got, and what it answered."""

    spec: EndpointSpec  # the serving image endpoint
    # uint8 [n, S, S, 3], or with GPU decode the padded encoded files (images.pack_encoded_groups)
    pixels: np.ndarray | list
    embeddings: np.ndarray  # float32 [n, D]
    key: LabelSetKey  # labels it was scored against, at the serving precision

    @property
    def nbytes(self) -> int:
        batch = self.pixels if isinstance(self.pixels, list) else [self.pixels]
        return sum(b.nbytes for b in batch) + self.embeddings.nbytes + ENTRY_OVERHEAD


class Shadow:
    """Mirror a fraction of image calls to the same scale at ``reference`` precision and export
    top-1 agreement, embedding cosine and KL(reference || served).

    :meth:`submit` is synchronous and O(1): it queues the already-decoded pixels and the served
    embeddings (nothing is decoded twice) or, when the queue holds ``max_bytes`` already, drops
    the job and counts it. :meth:`run` compares jobs one at a time in the background.

    Args:
        fraction: share of eligible calls mirrored (0 disables).
        reference: the precision compared against.
        catalog: to find the reference image endpoint.
        embed: runs an endpoint on a batch (chunked like served calls; no served-item metrics).
        labels: the label embedding cache (the reference's label embeddings come from its own
            text tower, as a call routed there would get).
        metrics: where results and drops go.
        max_bytes: queue memory bound.
        rng: sampling randomness.
    """

    def __init__(self, *, fraction: float, reference: Precision, catalog: Catalog,
                 embed: Callable[[EndpointSpec, np.ndarray], Awaitable[np.ndarray]],
                 labels: LabelEmbeddingCache, metrics: ServerMetrics, max_bytes: int,
                 rng: random.Random | None = None):
        self.fraction = fraction
        self.reference = reference
        self._catalog = catalog
        self._embed = embed
        self._labels = labels
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._rng = rng or random.Random()
        self._queue: deque[ShadowJob] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._busy = False

    @property
    def pending(self) -> int:
        """Jobs queued or being compared."""
        return len(self._queue) + self._busy

    def submit(self, spec: EndpointSpec, pixels: np.ndarray, embeddings: np.ndarray,
               key: LabelSetKey) -> bool:
        """Maybe mirror one served image call; returns whether it was queued. Never waits."""
        if self.fraction <= 0 or self._rng.random() >= self.fraction:
            return False
        if not self._catalog.has(spec.scale, self.reference, Tower.IMAGE):
            return False
        if self._catalog.get(spec.scale, self.reference, Tower.IMAGE).gpu_decode != \
                spec.gpu_decode:
            return False  # pixels and encoded bytes do not fit each other's Triton model
        job = ShadowJob(spec, pixels, embeddings, key)
        if self._queued_bytes + job.nbytes > self._max_bytes:
            self._metrics.observe_shadow_drop(spec.scale, spec.precision, ShadowDrop.QUEUE_FULL)
            return False
        self._queue.append(job)
        self._queued_bytes += job.nbytes
        self._metrics.shadow_queue_bytes.set(self._queued_bytes)
        self._wake.set()
        return True

    async def run(self) -> None:
        """Compare queued jobs until cancelled; a failed job is counted and logged."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self._queue.popleft()
            self._busy = True
            try:
                await self.compare(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._metrics.observe_shadow_drop(job.spec.scale, job.spec.precision,
                                                  ShadowDrop.ERROR)
                log.warning("shadow comparison of %s against %s failed: %s", job.spec.name,
                            self.reference.value, exc)
            finally:
                self._busy = False
                self._queued_bytes -= job.nbytes
                self._metrics.shadow_queue_bytes.set(self._queued_bytes)

    async def compare(self, job: ShadowJob) -> None:
        """Embed ``job``'s pixels at the reference precision and record the comparison."""
        spec = job.spec
        reference = self._catalog.get(spec.scale, self.reference, Tower.IMAGE)
        ref_key = LabelSetKey(spec.scale, self.reference, job.key.labels, job.key.templates)
        ref_vectors, served_labels, ref_labels = await asyncio.gather(
            self._embed(reference, job.pixels), self._labels.get(job.key),
            self._labels.get(ref_key))
        cosines, kl, agreements = await asyncio.to_thread(
            compare_to_reference, job.embeddings, served_labels, spec.sidecar.scoring_rule(),
            ref_vectors, ref_labels, reference.sidecar.scoring_rule())
        self._metrics.observe_shadow(spec.scale, spec.precision, self.reference, cosines, kl,
                                     agreements)
