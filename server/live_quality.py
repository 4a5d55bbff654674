"""Live quality signals per endpoint: OOD rate, confidence, ECE from delayed labels, shadow FP32.

The pieces, each small and separately tested:

- :class:`BoundedStore`: a map bounded by approximate bytes (and optionally by age); the memory
  bound behind every cache here.
- :class:`LabelEmbeddingCache`: label text embeddings per (scale, precision, labels, prompt
  templates), computed once (single flight) so neither live scoring nor Classify re-embeds
  prompts per call.
- :class:`OutcomeStore` and :class:`CalibrationWindow`: recent predictions by request id, and a
  sliding window of (confidence, correct) per endpoint that ``ReportOutcome`` feeds; the window's
  ECE is :func:`clipserve.calibration.score_ece`.
- :class:`Shadow`: mirrors a fraction of image calls to a reference precision from a
  byte-bounded queue, drained by one background task; a full queue drops (and counts) instead
  of waiting, so the caller never pays for it.
- :class:`LiveQuality`: what the servicer calls; owns the stores and the shadow, and shares
  the label cache and the :class:`~.embedder.Embedder` with the servicer.

The math is :mod:`clipserve.calibration`'s ``score_*`` functions; this module does bookkeeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Iterable, Sequence

import grpc
import numpy as np

from clipserve.calibration import (compare_to_reference, label_cosines, load_ood_state,
                                   score_ece, score_mcm, score_ood, softmax)
from clipserve.endpoints import Precision, Tower

from .config import ServerConfig
from .embedder import Embedder
from .errors import ServingError
from .metrics import Eviction, LabelSet, ServerMetrics, ShadowDrop, Unscored
from .repository import Catalog, EndpointSpec

log = logging.getLogger(__name__)

LABEL_SLOT = "{}"  # where a label goes in a prompt template
# Bytes a stored entry costs besides its arrays' data (objects, array headers, the key, the dict
# slot): tracemalloc measured ~650 for a stored prediction.
_ENTRY_OVERHEAD = 768


class BoundedStore:
    """A map whose entries are evicted oldest first once their total size passes ``max_bytes``
    or, with ``ttl_s``, once they are older than that.

    Args:
        max_bytes: budget for the sizes given to :meth:`put`.
        ttl_s: entries older than this are gone (None: no age limit).
        lru: a :meth:`get` hit makes the entry the newest (a cache); False keeps insertion
            order (a log whose TTL counts from insertion).
        clock: monotonic seconds (tests pass a fake).
        on_evict: called with the reason for each entry evicted (not for :meth:`pop`).
    """

    def __init__(self, max_bytes: int, ttl_s: float | None = None, lru: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[Eviction], None] | None = None):
        self.max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._lru = lru
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, tuple[object, int, float]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return self.get(key) is not None

    def put(self, key: Hashable, value: object, nbytes: int) -> None:
        """Store ``value`` as costing ``nbytes``; evicts the oldest entries to make room. A
        value larger than the whole budget is not stored."""
        self.pop(key)
        if nbytes > self.max_bytes:
            if self._on_evict:
                self._on_evict(Eviction.CAPACITY)
            return
        self._entries[key] = (value, nbytes, self._clock())
        self.nbytes += nbytes
        self._expire()
        while self.nbytes > self.max_bytes:
            self._evict_oldest(Eviction.CAPACITY)

    def get(self, key: Hashable) -> object | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._lru:
            self._entries.move_to_end(key)
        return entry[0]

    def pop(self, key: Hashable) -> object | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[1]
        return entry[0]

    def _evict_oldest(self, reason: Eviction) -> None:
        _, (_, nbytes, _) = self._entries.popitem(last=False)
        self.nbytes -= nbytes
        if self._on_evict:
            self._on_evict(reason)

    def _expire(self) -> None:
        if self._ttl_s is None:
            return
        horizon = self._clock() - self._ttl_s
        # With lru=False the front is the oldest insertion, so expired entries are a prefix.
        while self._entries and next(iter(self._entries.values()))[2] <= horizon:
            self._evict_oldest(Eviction.TTL)


# -- label text embeddings ------------------------------------------------------------------

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
            self._done.put(key, value, value.nbytes + _ENTRY_OVERHEAD)
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


# -- predictions and outcomes ----------------------------------------------------------------

def _digest(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=8).digest()


class LabelIndex:
    """Label -> position, held as 8-byte digests so a stored prediction keeps no label text
    (a Classify call may send up to max_labels labels of max_text_chars each)."""

    def __init__(self, labels: Sequence[str]):
        self._digests = b"".join(_digest(label) for label in labels)
        self.size = len(labels)

    @property
    def nbytes(self) -> int:
        return len(self._digests)

    def index(self, label: str) -> int | None:
        digest, start = _digest(label), 0
        while (i := self._digests.find(digest, start)) >= 0:
            if i % 8 == 0:
                return i // 8
            start = i + 1
        return None


@dataclass
class Prediction:
    """What one call predicted, kept until its outcomes arrive (or it ages out)."""

    scale: str
    precision: Precision
    labels: LabelIndex
    top: np.ndarray  # int32 [n_images]
    confidence: np.ndarray  # float32 [n_images]: what the client was told
    reported: np.ndarray  # bool [n_images]

    @property
    def nbytes(self) -> int:
        return (self.labels.nbytes + self.top.nbytes + self.confidence.nbytes
                + self.reported.nbytes + _ENTRY_OVERHEAD)


class CalibrationWindow:
    """The last ``size`` (confidence, correct) pairs of one endpoint."""

    def __init__(self, size: int):
        self._confidence: deque[float] = deque(maxlen=size)
        self._correct: deque[bool] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._confidence)

    def add(self, confidence: float, correct: bool) -> None:
        self._confidence.append(float(confidence))
        self._correct.append(bool(correct))

    def summary(self) -> tuple[float, float, float]:
        """(ECE over 15 bins, accuracy, mean confidence); zeros when empty."""
        if not self._confidence:
            return 0.0, 0.0, 0.0
        confidence = np.fromiter(self._confidence, dtype=np.float64)
        correct = np.fromiter(self._correct, dtype=np.float64)
        return score_ece(confidence, correct), float(correct.mean()), float(confidence.mean())


# -- shadow comparison -----------------------------------------------------------------------

@dataclass
class ShadowJob:
    """One mirrored image call: the pixels the served endpoint got, and what it answered."""

    spec: EndpointSpec  # the serving image endpoint
    pixels: np.ndarray  # uint8 [n, S, S, 3]
    embeddings: np.ndarray  # float32 [n, D]
    key: LabelSetKey  # labels it was scored against, at the serving precision

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes + self.embeddings.nbytes + _ENTRY_OVERHEAD


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
            compare_to_reference, job.embeddings, served_labels, spec.sidecar.temperature,
            ref_vectors, ref_labels, reference.sidecar.temperature)
        self._metrics.observe_shadow(spec.scale, spec.precision, self.reference, cosines, kl,
                                     agreements)


# -- the facade the servicer uses ------------------------------------------------------------

FIT_COMMAND = ("clipserve evaluate --repository REPO --eval-data DIR --write-sidecars "
               "(DIR: a labelled folder, one sub-folder per label)")


def check_ood_labels(catalog: Catalog, labels: Sequence[str]) -> None:
    """Refuse a deployment label set (``--ood-labels``) that no image endpoint's threshold was
    fitted for: an MCM threshold and a temperature belong to the labels they were fitted on.

    Raises:
        ValueError: naming the endpoints, the label sets they were fitted on, and the command
            that fits a threshold for ``labels``.
    """
    if not labels:
        return
    wanted = sorted(labels)
    unfitted = {spec.name: spec.sidecar.labels for spec in catalog if spec.tower is Tower.IMAGE
                and (spec.sidecar.ood_threshold is None
                     or sorted(spec.sidecar.labels or ()) != wanted)}
    if unfitted:
        shown = "; ".join(f"{name}: {', '.join(fitted) if fitted else 'none'}"
                          for name, fitted in sorted(unfitted.items()))
        raise ValueError(
            f"--ood-labels {','.join(labels)} has no fitted OOD threshold and temperature at "
            f"{len(unfitted)} image endpoint(s) (label sets fitted: {shown}). Fit them for "
            f"these labels with: {FIT_COMMAND}")

class LiveQuality:
    """Live OOD scoring, prediction bookkeeping for ReportOutcome, calibration windows and the
    shadow, for one servicer.

    Args:
        catalog: the repository's endpoints.
        metrics: where everything is published.
        config: the server config: the deployment label set (ood_labels, ood_prompts), the
            outcome store (outcome_store_mib, outcome_ttl_s, calibration_window) and the shadow
            (shadow_fraction, shadow_precision, shadow_queue_mib).
        labels: the label-embedding cache the servicer's Classify uses too.
        embedder: runs the shadow's reference endpoint.
        timeout_s: for the shadow's reference calls (no caller waits on them).
        rng: shadow sampling randomness.
        clock: monotonic seconds for TTLs.
    """

    warm_retry_s = 2.0  # between warm-up rounds while a label set cannot be embedded yet

    def __init__(self, *, catalog: Catalog, metrics: ServerMetrics, config: ServerConfig,
                 labels: LabelEmbeddingCache, embedder: Embedder, timeout_s: float,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self._catalog = catalog
        self._metrics = metrics
        self._config = config
        # The deployment label set as the config gives it (empty: each sidecar's own).
        self._id_labels, self._id_prompts = tuple(config.ood_labels), tuple(config.ood_prompts)
        self.labels = labels
        self.outcomes = BoundedStore(
            config.outcome_store_mib << 20, ttl_s=config.outcome_ttl_s, lru=False, clock=clock,
            on_evict=lambda reason: metrics.predictions_evicted.labels(reason=reason.value).inc())
        self.shadow = Shadow(fraction=config.shadow_fraction,
                             reference=config.shadow_reference, catalog=catalog,
                             embed=lambda spec, batch: embedder.embed_ready(spec, batch, timeout_s),
                             labels=self.labels, metrics=metrics,
                             max_bytes=config.shadow_queue_mib << 20, rng=rng)
        self._windows: dict[tuple[str, Precision], CalibrationWindow] = {}
        self._deployment_keys: dict[str, tuple[EndpointSpec, LabelSetKey | None]] = {}
        metrics.init_endpoints(catalog.targets(Tower.IMAGE))
        self._indexes: dict[LabelSetKey, LabelIndex] = {}  # one per deployment set
        self._ood_states: dict[tuple[str, int], tuple[str, dict]] = {}  # (endpoint, revision)
        check_ood_labels(catalog, self._id_labels)

    # -- OOD scores --------------------------------------------------------------------------

    def ood_scores(self, spec: EndpointSpec, vectors: np.ndarray, cosines: np.ndarray,
                   probabilities: np.ndarray | None = None) -> np.ndarray:
        """The endpoint's live OOD score of each image (higher = more in-distribution),
        comparable with ``spec.sidecar.ood_threshold``: MCM over ``cosines`` (the images
        against a label set) at the fitted T, or the sidecar's feature-space score of the
        embeddings themselves (label-free). ``probabilities``: softmax(cosines, T) when the
        caller computed it already (MCM is its row max, so it is not computed twice)."""
        car = spec.sidecar
        if car.ood_score in (None, "mcm"):
            if probabilities is not None:
                return probabilities.max(axis=-1)
            return score_mcm(cosines, car.temperature)
        key = (spec.name, car.revision)
        state = self._ood_states.get(key)
        if state is None:
            state = self._ood_states[key] = load_ood_state(spec.directory / car.ood_state)
        kind, fitted = state
        return score_ood(kind, fitted, vectors)

    # -- label sets --------------------------------------------------------------------------

    def deployment_key(self, spec: EndpointSpec) -> LabelSetKey | None:
        """The in-distribution label set images at ``spec`` are scored against live, or None
        when the endpoint has no fitted temperature/threshold or no label set."""
        # Asked twice per scored call; the answer depends only on the spec and the config,
        # so it is kept per spec object (a reloaded catalog brings new specs).
        cached = self._deployment_keys.get(spec.name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        key = self._deployment_key(spec)
        self._deployment_keys[spec.name] = (spec, key)
        return key

    def _deployment_key(self, spec: EndpointSpec) -> LabelSetKey | None:
        car = spec.sidecar
        if car.temperature is None or car.ood_threshold is None:
            return None
        if self._id_labels:  # the config's set; its templates or the labels verbatim
            labels, templates = self._id_labels, self._id_prompts
        else:
            labels = tuple(car.labels or ())
            templates = self._id_prompts or tuple(car.prompts or ())
        if len(labels) < 2:
            return None
        return LabelSetKey(spec.scale, spec.precision, tuple(labels),
                           tuple(templates or (LABEL_SLOT,)))

    def deployment_keys(self) -> list[LabelSetKey]:
        keys = []
        for spec in self._catalog:
            key = self.deployment_key(spec) if spec.tower is Tower.IMAGE else None
            if key is not None and self._catalog.has(spec.scale, spec.precision, Tower.TEXT):
                keys.append(key)
        return keys

    def _label_index(self, key: LabelSetKey, deployment: bool) -> LabelIndex:
        if not deployment:
            return LabelIndex(key.labels)
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = LabelIndex(key.labels)
        return index

    # -- recording ---------------------------------------------------------------------------

    def score_images(self, spec: EndpointSpec, vectors: np.ndarray, pixels: np.ndarray | None,
                     request_id: str | None) -> None:
        """Score embeddings served by image endpoint ``spec`` against the deployment label set
        (EmbedImages, EmbedStream), and mirror the call to the shadow when ``pixels`` are given.
        Never waits: while the label embeddings are not computed yet the images are counted as
        unscored and the computation is started. Never raises: a failure is logged and
        counted, the call is served regardless."""
        try:
            self._score_images(spec, vectors, pixels, request_id)
        except Exception:
            log.exception("live scoring of %s failed", spec.name)
            self._metrics.observe_unscored(spec.scale, spec.precision, Unscored.ERROR,
                                           len(vectors))

    def classified(self, spec: EndpointSpec, key: LabelSetKey, probabilities: np.ndarray,
                   ood_scores: np.ndarray, request_id: str | None, pixels: np.ndarray,
                   vectors: np.ndarray) -> None:
        """Record a Classify call's results (see :meth:`record`) and mirror it to the shadow.
        Never raises, like :meth:`score_images`."""
        try:
            self.record(spec, key, probabilities, ood_scores, request_id)
            self.shadow.submit(spec, pixels, vectors, key)
        except Exception:
            log.exception("live scoring of %s failed", spec.name)
            self._metrics.observe_unscored(spec.scale, spec.precision, Unscored.ERROR,
                                           len(vectors))

    def _score_images(self, spec: EndpointSpec, vectors: np.ndarray,
                      pixels: np.ndarray | None, request_id: str | None) -> None:
        key = self.deployment_key(spec)
        if key is None:
            self._metrics.observe_unscored(spec.scale, spec.precision, Unscored.NOT_CALIBRATED,
                                           len(vectors))
            return
        label_vectors = self.labels.peek(key)
        if label_vectors is None:
            self.labels.prefetch(key)
            self._metrics.observe_unscored(spec.scale, spec.precision, Unscored.LABELS_PENDING,
                                           len(vectors))
        else:
            cosines = label_cosines(vectors, label_vectors)
            probabilities = softmax(cosines, spec.sidecar.temperature)
            self.record(spec, key, probabilities,
                        self.ood_scores(spec, vectors, cosines, probabilities), request_id)
        if pixels is not None:
            self.shadow.submit(spec, pixels, vectors, key)

    def record(self, spec: EndpointSpec, key: LabelSetKey, probabilities: np.ndarray,
               ood_scores: np.ndarray, request_id: str | None) -> None:
        """Record one call's predictions by image endpoint ``spec`` over label set ``key``:
        OOD scores and flags, confidences, and (with a request id) the prediction for
        ReportOutcome."""
        deployment_key = self.deployment_key(spec)
        deployment = key is deployment_key or key == deployment_key
        label_set = LabelSet.DEPLOYMENT if deployment else LabelSet.REQUEST
        self._metrics.observe_ood(spec.scale, spec.precision, label_set, ood_scores,
                                  spec.sidecar.ood_threshold)
        confidence = probabilities.max(axis=1).astype(np.float32)
        self._metrics.observe_confidence(spec.scale, spec.precision, label_set, confidence)
        if request_id:
            prediction = Prediction(
                scale=spec.scale, precision=spec.precision,
                labels=self._label_index(key, deployment),
                top=probabilities.argmax(axis=1).astype(np.int32), confidence=confidence,
                reported=np.zeros(len(confidence), dtype=bool))
            self.outcomes.put(request_id, prediction, prediction.nbytes)
            self._publish_store()

    def _publish_store(self) -> None:
        self._metrics.predictions_stored.set(len(self.outcomes))
        self._metrics.predictions_stored_bytes.set(self.outcomes.nbytes)

    # -- outcomes ----------------------------------------------------------------------------

    def report(self, request_id: str, outcomes: Iterable[tuple[int, str]]) -> Prediction:
        """Apply true labels to a stored prediction: ``outcomes`` are (image index, true label).
        All are checked before any is applied. Returns the prediction (its endpoint).

        Raises:
            ServingError: INVALID_ARGUMENT (no outcomes, index out of range, label not among
                the call's labels), NOT_FOUND (unknown, expired or evicted request id),
                ALREADY_EXISTS (an image already has an outcome).
        """
        outcomes = list(outcomes)
        shown = request_id[:64]
        if not request_id:
            raise ServingError.invalid_argument("request_id is empty")
        if not outcomes:
            raise ServingError.invalid_argument("outcomes is empty: send at least one")
        prediction = self.outcomes.get(request_id)
        if not isinstance(prediction, Prediction):
            raise ServingError.not_found(
                f"no stored prediction for request id {shown!r}: unknown, older than "
                f"outcome_ttl_s ({self._config.outcome_ttl_s:g} s), or evicted")
        n = len(prediction.top)
        truths: dict[int, int] = {}
        for i, (index, label) in enumerate(outcomes):
            if index >= n:
                raise ServingError.invalid_argument(
                    f"outcome {i}: index {index}, but request {shown!r} scored {n} image(s)")
            truth = prediction.labels.index(label)
            if truth is None:
                raise ServingError.invalid_argument(
                    f"outcome {i}: true label {label[:100]!r} is not one of the "
                    f"{prediction.labels.size} labels request {shown!r} scored")
            if index in truths or prediction.reported[index]:
                raise ServingError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"outcome {i}: image {index} of request {shown!r} already "
                                   "has an outcome")
            truths[index] = truth
        window = self._windows.setdefault(
            (prediction.scale, prediction.precision),
            CalibrationWindow(self._config.calibration_window))
        correct = 0
        for index, truth in truths.items():
            right = int(prediction.top[index]) == truth
            window.add(float(prediction.confidence[index]), right)
            prediction.reported[index] = True
            correct += right
        self._metrics.observe_outcomes(prediction.scale, prediction.precision, correct,
                                       len(truths) - correct)
        ece, accuracy, confidence = window.summary()
        self._metrics.set_calibration(prediction.scale, prediction.precision, ece=ece,
                                      accuracy=accuracy, confidence=confidence,
                                      samples=len(window))
        if prediction.reported.all():  # nothing left to report: free it now
            self.outcomes.pop(request_id)
        self._publish_store()
        return prediction

    # -- background --------------------------------------------------------------------------

    async def warm(self) -> None:
        """Compute every deployment label set, retrying (Triton may come up after us) until all
        are cached, so live scoring covers images from the first calls on."""
        keys = self.deployment_keys()
        warned: set[LabelSetKey] = set()
        while keys:
            for key in keys:
                try:
                    await self.labels.get(key)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    level = logging.DEBUG if key in warned else logging.WARNING
                    warned.add(key)
                    log.log(level, "cannot embed the live OOD label set of %s %s yet (%s); "
                            "retrying every %g s", key.scale, key.precision.value, exc,
                            self.warm_retry_s)
            keys = [k for k in keys if not self.labels.has(k)]
            if keys:
                await asyncio.sleep(self.warm_retry_s)
        log.info("live OOD label sets cached for %d endpoint(s)", len(self.deployment_keys()))

    async def run(self) -> None:
        """Warm the label cache and run the shadow worker until cancelled."""
        await asyncio.gather(self.warm(), self.shadow.run())
