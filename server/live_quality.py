"""Live quality signals per endpoint: OOD rate, confidence, ECE from delayed labels, shadow FP32.

:class:`LiveQuality` is what the servicer calls after each image call. It scores the embeddings
against the deployment label set and records OOD rates and confidences, keeps predictions for
``ReportOutcome``, and mirrors calls to the shadow. Its parts live in their own modules:

- :mod:`.bounded_store`: the byte- (and age-) bounded map behind every cache here.
- :mod:`.label_cache`: label text embeddings per label set, computed once (the servicer's
  Classify shares the cache).
- :mod:`.outcomes`: stored predictions and the calibration window ``ReportOutcome`` feeds.
- :mod:`.shadow`: the mirror to a reference precision.

Embeddings come from the servicer's :class:`~.embedder.Embedder`; the math is
:mod:`clipserve.calibration`'s. This module does bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from clipserve.calibration import label_cosines, load_ood_state, score_ood
from clipserve.endpoints import Tower

from .config import ServerConfig
from .embedder import Embedder
from .label_cache import LABEL_SLOT, LabelEmbeddingCache, LabelSetKey
from .metrics import LabelSet, ServerMetrics, Unscored
from .outcomes import LabelIndex, Outcomes, Prediction
from .repository import Catalog, EndpointSpec
from .shadow import Shadow

log = logging.getLogger(__name__)

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
        embedder: runs the shadow's reference endpoint (under request_timeout_s: no caller
            waits on it).
        rng: shadow sampling randomness.
        clock: monotonic seconds for TTLs.
    """

    warm_retry_s = 2.0  # between warm-up rounds while a label set cannot be embedded yet

    def __init__(self, *, catalog: Catalog, metrics: ServerMetrics, config: ServerConfig,
                 labels: LabelEmbeddingCache, embedder: Embedder,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self._catalog = catalog
        self._metrics = metrics
        # The deployment label set as the config gives it (empty: each sidecar's own).
        self._id_labels, self._id_prompts = tuple(config.ood_labels), tuple(config.ood_prompts)
        self.labels = labels
        self.outcomes = Outcomes(metrics=metrics, max_bytes=config.outcome_store_mib << 20,
                                 ttl_s=config.outcome_ttl_s, window=config.calibration_window,
                                 clock=clock)
        self.shadow = Shadow(fraction=config.shadow_fraction,
                             reference=config.shadow_reference, catalog=catalog,
                             embed=lambda spec, batch: embedder.embed_ready(
                                 spec, batch, config.request_timeout_s),
                             labels=self.labels, metrics=metrics,
                             max_bytes=config.shadow_queue_mib << 20, rng=rng)
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
        embeddings themselves (label-free). ``probabilities``: the sidecar's scoring rule's
        probabilities of ``cosines`` when the caller computed them already (MCM, or the max
        sigmoid probability of a sigmoid model, is their row max: not computed twice)."""
        car = spec.sidecar
        if car.ood_score in (None, "mcm"):
            if probabilities is not None:
                return probabilities.max(axis=-1)
            return car.scoring_rule().max_probability(cosines)
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
            probabilities = spec.sidecar.scoring_rule().probabilities(cosines)
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
            self.outcomes.keep(request_id, prediction)

    def report(self, request_id: str, outcomes: Iterable[tuple[int, str]]) -> Prediction:
        """Apply a ReportOutcome call's true labels (:meth:`.outcomes.Outcomes.report`)."""
        return self.outcomes.report(request_id, outcomes)

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
