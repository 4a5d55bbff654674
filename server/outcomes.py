"""Predictions kept for ``ReportOutcome`` and what the reported outcomes feed: per endpoint, a
sliding window of (confidence, correct) whose ECE (:func:`clipserve.calibration.score_ece`),
accuracy and mean confidence are exported."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import grpc
import numpy as np

from clipserve.calibration import score_ece
from clipserve.endpoints import Precision

from .bounded_store import ENTRY_OVERHEAD, BoundedStore
from .errors import ServingError
from .metrics import ServerMetrics


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
                + self.reported.nbytes + ENTRY_OVERHEAD)


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


class Outcomes:
    """Predictions by request id until their outcomes arrive (or they age out), and the
    calibration window per endpoint that the outcomes feed.

    Args:
        metrics: gets the store's size, evictions, outcome counts and calibration gauges.
        max_bytes: memory budget of the stored predictions (oldest evicted first).
        ttl_s: a prediction older than this can no longer be reported.
        window: (confidence, correct) pairs kept per endpoint for ECE and accuracy.
        clock: monotonic seconds for the TTL.
    """

    def __init__(self, *, metrics: ServerMetrics, max_bytes: int, ttl_s: float, window: int,
                 clock: Callable[[], float] = time.monotonic):
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._window_size = window
        self.store = BoundedStore(
            max_bytes, ttl_s=ttl_s, lru=False, clock=clock,
            on_evict=lambda reason: metrics.predictions_evicted.labels(reason=reason.value).inc())
        self._windows: dict[tuple[str, Precision], CalibrationWindow] = {}

    def __len__(self) -> int:
        return len(self.store)

    def keep(self, request_id: str, prediction: Prediction) -> None:
        """Store ``prediction`` under ``request_id`` (replacing one stored there)."""
        self.store.put(request_id, prediction, prediction.nbytes)
        self._publish()

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
        prediction = self.store.get(request_id)
        if not isinstance(prediction, Prediction):
            raise ServingError.not_found(
                f"no stored prediction for request id {shown!r}: unknown, older than "
                f"outcome_ttl_s ({self._ttl_s:g} s), or evicted")
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
            CalibrationWindow(self._window_size))
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
            self.store.pop(request_id)
        self._publish()
        return prediction

    def _publish(self) -> None:
        self._metrics.predictions_stored.set(len(self.store))
        self._metrics.predictions_stored_bytes.set(self.store.nbytes)
