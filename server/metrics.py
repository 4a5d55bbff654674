"""The gateway's Prometheus metrics, all declared here, on a registry passed in.

Naming: prefix ``clipserve_``, base units (seconds), ``_total`` counters. Every label value comes
from an enum or from the repository's scales, never from request data, so cardinality is
bounded:

- ``method``: a :class:`Method`; ``code``: a grpc.StatusCode name (HTTP calls too: the status
  their error maps from); ``protocol``: a :class:`Protocol`;
- ``scale``: a scale of the repository, or ``none`` when a call failed before routing;
- ``precision``, ``reference``: a :class:`~clipserve.endpoints.Precision` value (or ``none``);
- ``tower``: a :class:`~clipserve.endpoints.Tower` value; ``phase``: a :class:`Phase`;
- ``label_set``: a :class:`LabelSet`; ``reason``, ``result``: the enums below.

What the families mean and the PromQL that reads them is in the README's ``## Metrics``.
"""

from __future__ import annotations

import enum
import importlib.metadata
from typing import Iterable

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clipserve.calibration import ECE_BINS
from clipserve.endpoints import Precision, Tower

NO_ROUTE = "none"  # scale/precision label of calls rejected before an endpoint was chosen
API = "clipserve.v1"

# Seconds. From 0.5 ms (a cached small text batch on a GPU) to the default 30 s deadline, dense
# between 5 ms and 1 s where CPU and GPU CLIP calls sit.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# Items per Triton request: powers of two up to the largest max_batch_size we export.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# MCM scores lie in [1/n_labels, 1]; 0.05 steps resolve a threshold to a bucket.
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# Top-1 probability in the same 15 equal-width bins as the ECE, so the histogram is the
# confidence half of a reliability diagram.
CONFIDENCE_BUCKETS = tuple((i + 1) / ECE_BINS for i in range(ECE_BINS))
# Shadow cosine between a precision and its reference: the interesting part is just below 1.
COSINE_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999,
                  0.99999, 1.0)
# KL(reference || serving) in nats.
KL_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class Method(str, enum.Enum):
    """The RPCs, as metric label values."""

    EMBED_IMAGES = "EmbedImages"
    EMBED_TEXTS = "EmbedTexts"
    EMBED_STREAM = "EmbedStream"
    CLASSIFY = "Classify"
    LIST_MODELS = "ListModels"
    REPORT_OUTCOME = "ReportOutcome"
    # HTTP POST /v1/embeddings refused before its input was read (no key, over the concurrency
    # bound, a body that is not JSON); the calls it makes count as EmbedImages/EmbedTexts.
    EMBEDDINGS = "Embeddings"


class Protocol(str, enum.Enum):
    """The front end a call came through (``clipserve_requests_total`` and
    ``clipserve_request_duration_seconds``)."""

    GRPC = "grpc"
    HTTP = "http"


class Phase(str, enum.Enum):
    """Parts of a call's latency (``clipserve_request_phase_seconds``).

    - ``queue``: waiting in the gateway before work starts (for images: for a decode slot and
      thread; the longest wait of the call's images).
    - ``preprocess``: decoding and resizing images, or tokenizing texts (includes ``queue``).
    - ``triton``: the round trip to Triton for the call's batch (all chunks, concurrently).

    Phases of one call may overlap (Classify embeds images and labels at once), so they need
    not add up to ``clipserve_request_duration_seconds``.
    """

    QUEUE = "queue"
    PREPROCESS = "preprocess"
    TRITON = "triton"


class LabelSet(str, enum.Enum):
    """Which labels an image was scored against for live OOD and confidence."""

    DEPLOYMENT = "deployment"  # the deployment's in-distribution set (config or sidecar)
    REQUEST = "request"  # a Classify call's own labels or prompt templates


class Unscored(str, enum.Enum):
    """Why an image got no live OOD score."""

    LABELS_PENDING = "labels_pending"  # the label embeddings are still being computed
    NOT_CALIBRATED = "not_calibrated"  # the sidecar has no temperature/threshold/label set
    ERROR = "error"  # scoring failed (logged)


class ShadowDrop(str, enum.Enum):
    """Why a mirrored request was not compared."""

    QUEUE_FULL = "queue_full"
    ERROR = "error"  # reference endpoint failed or not ready (logged)


class Eviction(str, enum.Enum):
    """Why a stored prediction left the ReportOutcome store."""

    TTL = "ttl"
    CAPACITY = "capacity"


class OutcomeResult(str, enum.Enum):
    CORRECT = "correct"
    INCORRECT = "incorrect"


def _version() -> str:
    try:
        return importlib.metadata.version("clipserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Mode:
    """How each gauge of ``clipserve serve --workers N`` is merged over the workers on the one
    /metrics page (prometheus_client's ``multiprocess_mode``; ignored with one process).
    Counters and histograms always add up, including those of workers that have exited."""

    # The same value in every worker (build info): one series, the largest.
    SAME = "max"
    # Amounts held by each live worker (calls in flight, stored predictions and their bytes,
    # queued shadow bytes, outcomes in the windows): the total is the sum of the live ones.
    ADD = "livesum"
    # Readiness as each worker's own health poll sees it: 1 only if every live worker sees
    # Triton ready, so a worker that cannot reach it shows as 0.
    ALL_READY = "livemin"
    # Statistics of each worker's own outcome window (ECE, accuracy, mean confidence): no
    # merge of per-window values gives the pooled figure (ECE is not additive, windows differ
    # in size), so each live worker's value is its own series with a pid label; dashboards and
    # alerts take max() / min() over them.
    PER_WORKER = "liveall"


class ServerMetrics:
    """Every gateway metric, registered on ``registry`` (tests pass a fresh one).

    Args:
        registry: where to register.
        scales: the repository's scales, the only values the ``scale`` label takes besides
            ``none``.
    """

    def __init__(self, registry: CollectorRegistry, scales: tuple[str, ...]):
        self._scales = frozenset(scales)
        # Label children by (family, label values), or by a method's raw arguments
        # (:meth:`_bound`), bound on first use and reused: a call's
        # dozen .labels() lookups (each validates and sorts its keywords) become dict hits.
        # Label values still come only from enums and the repository's scales, so the cache is
        # as bounded as the series themselves.
        self._children: dict[tuple, object] = {}
        endpoint = ["scale", "precision"]
        self.build_info = Gauge(
            "clipserve_build_info", "Always 1; the labels say what is running.",
            ["version", "api"], registry=registry, multiprocess_mode=Mode.SAME)
        self.build_info.labels(version=_version(), api=API).set(1)

        # -- traffic and speed --------------------------------------------------------------
        self.requests = Counter(
            "clipserve_requests_total", "Finished calls, by outcome.",
            ["method", *endpoint, "code", "protocol"], registry=registry)
        self.request_duration = Histogram(
            "clipserve_request_duration_seconds",
            "Wall time from receiving a call to its last response message.",
            ["method", *endpoint, "protocol"], buckets=LATENCY_BUCKETS, registry=registry)
        self.request_phase = Histogram(
            "clipserve_request_phase_seconds",
            "Wall time of one part of a call (queue, preprocess, triton); see Phase.",
            ["method", *endpoint, "phase"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "clipserve_requests_in_flight", "Calls being served now.", ["method"],
            registry=registry, multiprocess_mode=Mode.ADD)
        self.items = Counter(
            "clipserve_items_total", "Images and texts embedded successfully for clients.",
            ["tower", *endpoint], registry=registry)
        self.batch_size = Histogram(
            "clipserve_batch_size", "Items per request sent to Triton (after chunking to the "
            "endpoint's max_batch_size; before Triton's dynamic batching).",
            ["tower", *endpoint], buckets=BATCH_BUCKETS, registry=registry)
        self.backend_ready = Gauge(
            "clipserve_backend_ready", "1 while Triton reports itself ready, else 0.",
            registry=registry, multiprocess_mode=Mode.ALL_READY)
        self.routing_reloads = Counter(
            "clipserve_routing_reloads_total", "Routing file reloads, by result.",
            ["result"], registry=registry)
        for result in ("ok", "error"):
            self.routing_reloads.labels(result=result)

        # -- live OOD -----------------------------------------------------------------------
        self.ood_score = Histogram(
            "clipserve_ood_score", "Live OOD score of each image (higher = more "
            "in-distribution): the score the endpoint's sidecar names, MCM (max softmax of "
            "cos/T against the label set named by label_set) unless it names a feature-space "
            "score (kNN, Mahalanobis); the buckets resolve MCM's [0, 1].",
            [*endpoint, "label_set"], buckets=SCORE_BUCKETS, registry=registry)
        self.ood_flagged = Counter(
            "clipserve_ood_flagged_total", "Images whose live OOD score fell below the "
            "endpoint's OOD threshold (fitted to keep >= 95% of in-distribution images).",
            [*endpoint, "label_set"], registry=registry)
        self.ood_unscored = Counter(
            "clipserve_ood_unscored_total", "Images that got no live OOD score, by reason.",
            [*endpoint, "reason"], registry=registry)

        # -- live calibration ---------------------------------------------------------------
        self.confidence = Histogram(
            "clipserve_confidence", "Top-1 probability of each classified image (15 bins, as "
            "the ECE).", [*endpoint, "label_set"], buckets=CONFIDENCE_BUCKETS,
            registry=registry)
        self.outcomes = Counter(
            "clipserve_outcomes_total", "True labels received by ReportOutcome, by whether the "
            "served top-1 was right.", [*endpoint, "result"], registry=registry)
        self.calibration_ece = Gauge(
            "clipserve_calibration_ece", "Expected calibration error (15 bins, L1) over the "
            "sliding window of reported outcomes.", endpoint, registry=registry, multiprocess_mode=Mode.PER_WORKER)
        self.calibration_accuracy = Gauge(
            "clipserve_calibration_accuracy", "Top-1 accuracy over the same window.", endpoint,
            registry=registry, multiprocess_mode=Mode.PER_WORKER)
        self.calibration_confidence = Gauge(
            "clipserve_calibration_confidence", "Mean top-1 probability over the same window.",
            endpoint, registry=registry, multiprocess_mode=Mode.PER_WORKER)
        self.calibration_samples = Gauge(
            "clipserve_calibration_window_samples", "Outcomes in the sliding window.", endpoint,
            registry=registry, multiprocess_mode=Mode.ADD)
        self.predictions_stored = Gauge(
            "clipserve_predictions_stored", "Predictions held for ReportOutcome.",
            registry=registry, multiprocess_mode=Mode.ADD)
        self.predictions_stored_bytes = Gauge(
            "clipserve_predictions_stored_bytes", "Approximate memory of those predictions.",
            registry=registry, multiprocess_mode=Mode.ADD)
        self.predictions_evicted = Counter(
            "clipserve_predictions_evicted_total", "Predictions dropped before any outcome "
            "could use them all, by reason.", ["reason"], registry=registry)
        for reason in Eviction:
            self.predictions_evicted.labels(reason=reason.value)

        # -- shadow comparison --------------------------------------------------------------
        shadow = [*endpoint, "reference"]
        self.shadow_images = Counter(
            "clipserve_shadow_images_total", "Images mirrored to the reference precision and "
            "compared.", shadow, registry=registry)
        self.shadow_agreements = Counter(
            "clipserve_shadow_agreements_total", "Compared images whose top-1 label matched "
            "the reference's.", shadow, registry=registry)
        self.shadow_cosine = Histogram(
            "clipserve_shadow_cosine", "Cosine between the served and the reference image "
            "embedding.", shadow, buckets=COSINE_BUCKETS, registry=registry)
        self.shadow_kl = Histogram(
            "clipserve_shadow_kl", "KL(reference || served) between the two softmax outputs, "
            "in nats.", shadow, buckets=KL_BUCKETS, registry=registry)
        self.shadow_dropped = Counter(
            "clipserve_shadow_dropped_total", "Mirrored requests not compared, by reason.",
            [*endpoint, "reason"], registry=registry)
        self.shadow_queue_bytes = Gauge(
            "clipserve_shadow_queue_bytes", "Memory held by mirrored requests waiting to be "
            "compared (bounded by shadow_queue_mib).", registry=registry, multiprocess_mode=Mode.ADD)
        self.label_cache = Counter(
            "clipserve_label_cache_requests_total", "Lookups of cached label text embeddings.",
            ["result"], registry=registry)
        for result in ("hit", "miss"):
            self.label_cache.labels(result=result)

    def init_endpoints(self, targets: Iterable[tuple[str, Precision]]) -> None:
        """Create the per-endpoint counters of ``targets`` (scale, precision) at 0, so ratios and
        ``increase()`` have a series before the first event."""
        for scale, precision in targets:
            labels = self._endpoint(scale, precision)
            for label_set in LabelSet:
                self.ood_flagged.labels(**labels, label_set=label_set.value)
            for result in OutcomeResult:
                self.outcomes.labels(**labels, result=result.value)

    def add_scales(self, scales: Iterable[str]) -> None:
        """Scales of endpoints added while serving (their ``scale`` label values)."""
        self._scales = self._scales | frozenset(scales)
        self._children.clear()  # children keyed by a raw scale may have bound it as "none"

    def _scale(self, scale: str | None) -> str:
        return scale if scale in self._scales else NO_ROUTE

    def _endpoint(self, scale: str, precision: Precision) -> dict[str, str]:
        return {"scale": self._scale(scale), "precision": precision.value}

    def _child(self, family, *values: str):
        """``family.labels(*values)`` (values in the family's label order), bound once."""
        key = (family, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    def _bound(self, key: tuple, bind):
        """The children ``bind()`` returns, cached under ``key``: a call's raw arguments (enums,
        the scale as given), so a repeated call skips the enum ``.value`` lookups and the
        scale check as well as ``.labels()``. Cleared by :meth:`add_scales`."""
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = bind()
        return children

    def in_flight_of(self, method: Method):
        """The ``clipserve_requests_in_flight`` child of ``method`` (bound once)."""
        return self._child(self.in_flight, method.value)

    # -- traffic ---------------------------------------------------------------------------

    def observe_call(self, method: Method, scale: str | None, precision: Precision | None,
                     code: grpc.StatusCode, seconds: float,
                     protocol: Protocol = Protocol.GRPC) -> None:
        """Record one finished call that came in over ``protocol``."""
        def bind():
            scale_label = self._scale(scale)
            precision_label = precision.value if precision is not None else NO_ROUTE
            return (self.requests.labels(method.value, scale_label, precision_label, code.name,
                                         protocol.value),
                    self.request_duration.labels(method.value, scale_label, precision_label,
                                                 protocol.value))
        count, duration = self._bound(("call", method, scale, precision, code, protocol), bind)
        count.inc()
        duration.observe(seconds)

    def observe_phase(self, method: Method, scale: str, precision: Precision, phase: Phase,
                      seconds: float) -> None:
        """Record how long one part of a routed call took."""
        self._bound(("phase", method, scale, precision, phase),
                    lambda: self.request_phase.labels(method.value, self._scale(scale),
                                                      precision.value, phase.value)
                    ).observe(seconds)

    def observe_items(self, tower: Tower, scale: str, precision: Precision, count: int) -> None:
        """Record ``count`` items embedded by one endpoint."""
        self._bound(("items", tower, scale, precision),
                    lambda: self.items.labels(tower.value, self._scale(scale), precision.value)
                    ).inc(count)

    def observe_batch(self, tower: Tower, scale: str, precision: Precision, size: int) -> None:
        """Record one request of ``size`` items sent to Triton."""
        self._bound(("batch", tower, scale, precision),
                    lambda: self.batch_size.labels(tower.value, self._scale(scale),
                                                   precision.value)).observe(size)

    # -- live quality ----------------------------------------------------------------------

    def observe_ood(self, scale: str, precision: Precision, label_set: LabelSet,
                    scores: np.ndarray, threshold: float) -> int:
        """Record MCM ``scores`` of a batch of images; returns how many were flagged OOD."""
        def bind():
            values = (self._scale(scale), precision.value, label_set.value)
            return self.ood_score.labels(*values), self.ood_flagged.labels(*values)
        histogram, flagged_counter = self._bound(("ood", scale, precision, label_set), bind)
        for score in np.asarray(scores, dtype=np.float64).tolist():
            histogram.observe(score)
        # Compared in the scores' own dtype, as before; count_nonzero skips .sum()'s wrapper.
        flagged = int(np.count_nonzero(np.asarray(scores) < threshold))
        flagged_counter.inc(flagged)
        return flagged

    def observe_unscored(self, scale: str, precision: Precision, reason: Unscored,
                         count: int) -> None:
        self._child(self.ood_unscored, self._scale(scale), precision.value,
                    reason.value).inc(count)

    def observe_confidence(self, scale: str, precision: Precision, label_set: LabelSet,
                           confidences: np.ndarray) -> None:
        """Record the top-1 probability of each classified image."""
        histogram = self._bound(("confidence", scale, precision, label_set),
                                lambda: self.confidence.labels(self._scale(scale),
                                                               precision.value, label_set.value))
        for confidence in np.asarray(confidences, dtype=np.float64).tolist():
            histogram.observe(confidence)

    def observe_outcomes(self, scale: str, precision: Precision, correct: int,
                         incorrect: int) -> None:
        labels = self._endpoint(scale, precision)
        self.outcomes.labels(**labels, result=OutcomeResult.CORRECT.value).inc(correct)
        self.outcomes.labels(**labels, result=OutcomeResult.INCORRECT.value).inc(incorrect)

    def set_calibration(self, scale: str, precision: Precision, *, ece: float,
                        accuracy: float, confidence: float, samples: int) -> None:
        """Publish the sliding-window calibration of one endpoint."""
        labels = self._endpoint(scale, precision)
        self.calibration_ece.labels(**labels).set(ece)
        self.calibration_accuracy.labels(**labels).set(accuracy)
        self.calibration_confidence.labels(**labels).set(confidence)
        self.calibration_samples.labels(**labels).set(samples)

    def observe_shadow(self, scale: str, precision: Precision, reference: Precision,
                       cosines: np.ndarray, kl: np.ndarray, agreements: int) -> None:
        """Record one compared batch: per-image cosine and KL, and how many top-1s agreed."""
        labels = {**self._endpoint(scale, precision), "reference": reference.value}
        cosine_histogram = self.shadow_cosine.labels(**labels)
        kl_histogram = self.shadow_kl.labels(**labels)
        for value in np.asarray(cosines, dtype=np.float64).tolist():
            cosine_histogram.observe(value)
        for value in np.asarray(kl, dtype=np.float64).tolist():
            kl_histogram.observe(value)
        self.shadow_images.labels(**labels).inc(len(cosines))
        self.shadow_agreements.labels(**labels).inc(agreements)

    def observe_shadow_drop(self, scale: str, precision: Precision, reason: ShadowDrop) -> None:
        self.shadow_dropped.labels(**self._endpoint(scale, precision), reason=reason.value).inc()
