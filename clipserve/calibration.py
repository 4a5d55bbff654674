"""Calibration and OOD math, numpy only (the gateway imports this module; it has no scipy).

The export stage calls the ``fit_*`` functions offline on held-out data; the gateway calls the
``score_*`` functions live. The label-space functions take cosine similarities between
L2-normalised image and label embeddings, shape [n_images, n_labels], and a temperature T
(probabilities are softmax(cos / T), so T = 1 / CLIP's logit_scale reproduces the model's own
probabilities). The feature-space OOD scores (kNN, Mahalanobis) take image embeddings
[n_images, D] and a state fitted on in-distribution embeddings, saved beside the sidecar as an
``.npz`` file (:func:`save_ood_state`).

How cosines become probabilities is the model's scoring rule (:class:`Scoring`): softmax over
labels for CLIP, an independent sigmoid(scale * cos + bias) per label for SigLIP; the fit, NLL,
ECE (on the top label's probability) and the max-probability OOD score follow it.

Every OOD score here is oriented the same way: HIGHER means more in-distribution, and an
image is flagged OOD when its score is below the threshold fitted by :func:`fit_ood_threshold`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
ID_TPR = 0.95  # the OOD threshold keeps this fraction of in-distribution images
KNN_K = 10  # neighbours for the kNN score (see fit_knn)
KNN_MAX_BANK = 5000  # most ID embeddings a kNN state keeps (bounds memory and serving cost)
OOD_STATE_FORMAT = 1  # bumped when the .npz layout changes
OOD_SCORES = ("mcm", "knn", "mahalanobis")  # names a sidecar's ``ood_score`` may take


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices [n, D] (need not be normalised),
    computed in float64 and clipped to [-1, 1]; shape [n]. A zero row gives 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.clip((a * b).sum(axis=1) / norms.clip(1e-12), -1.0, 1.0)


def label_cosines(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosines between L2-normalised image embeddings [n, D] and label embeddings [k, D], in
    float64: the [n, k] input of the label-space functions below."""
    return np.asarray(images, dtype=np.float64) @ np.asarray(labels, dtype=np.float64).T


def average_prompts(vectors: np.ndarray, n_labels: int) -> np.ndarray:
    """CLIP's zero-shot recipe (prompt ensembling): the renormalised mean of each label's
    prompt embeddings. ``vectors`` is label-major [n_labels * n_templates, D]; returns float32
    [n_labels, D]."""
    mean = np.asarray(vectors, dtype=np.float64).reshape(n_labels, -1, vectors.shape[-1])
    mean = mean.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def softmax(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of cos / T, computed stably in float64."""
    z = np.asarray(cosines, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise log softmax(cos / T) in float64, from the max-shifted log-sum-exp: exact for
    extreme logits (cos / T = 1000 gives 0 and -(gap), never log(0))."""
    z = np.asarray(cosines, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def score_mcm(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """Maximum concept matching score (Ming et al. 2022): max over labels of softmax(cos / T).

    Higher means more in-distribution. Shape [n_images].
    """
    return softmax(cosines, temperature).max(axis=-1)


def score_ece(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: L1 gap between accuracy and confidence over ``n_bins``
    equal-width confidence bins, weighted by bin population. Returns 0.0 for no samples.

    Vectorised with bincount (the bootstrap calls it thousands of times): a bin's weighted
    gap (count/n) * |mean(correct) - mean(conf)| equals |sum(correct) - sum(conf)| / n."""
    confidences = np.asarray(confidences, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidences.size == 0:
        return 0.0
    # Bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)
    gap = (np.bincount(bins, weights=correct, minlength=n_bins)
           - np.bincount(bins, weights=confidences, minlength=n_bins))
    return float(np.abs(gap).sum() / confidences.size)


def score_kl(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) in nats, row-wise, between probability rows [n, k] (e.g. a shadow
    FP32 endpoint's softmax and a quantized one's on the same images). 0 for identical rows;
    shape [n]. Probabilities are clipped at 1e-12 so a zero in ``other`` stays finite."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(other, dtype=np.float64)
    kl = (p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(axis=-1)
    return np.maximum(kl, 0.0)  # rounding can leave -1e-17 for identical rows


def top1_agreements(p: np.ndarray, q: np.ndarray) -> int:
    """How many rows of two score matrices [n, k] (probabilities or cosines) have the same
    argmax."""
    return int((np.asarray(p).argmax(axis=-1) == np.asarray(q).argmax(axis=-1)).sum())


def score_kl_bernoulli(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) in nats of independent per-label probabilities [n, k] (sigmoid
    rows, which need not sum to 1): the sum over labels of each label's Bernoulli KL; shape
    [n], 0 for identical rows. Probabilities are clipped to [1e-12, 1 - 1e-12]."""
    p = np.clip(np.asarray(reference, dtype=np.float64), 1e-12, 1 - 1e-12)
    q = np.clip(np.asarray(other, dtype=np.float64), 1e-12, 1 - 1e-12)
    kl = p * (np.log(p) - np.log(q)) + (1 - p) * (np.log1p(-p) - np.log1p(-q))
    return np.maximum(kl.sum(axis=-1), 0.0)


def _as_scoring(rule) -> "Scoring":
    return rule if isinstance(rule, Scoring) else Scoring("softmax", float(rule))


def compare_to_reference(served: np.ndarray, served_labels: np.ndarray, served_t,
                         reference: np.ndarray, reference_labels: np.ndarray,
                         reference_t) -> tuple[np.ndarray, np.ndarray, int]:
    """How a served precision's image embeddings differ from a reference precision's on the
    same images: per image cosine(served, reference) and KL(reference || served) between the
    probabilities each gives over its own label embeddings under its own scoring (a
    :class:`Scoring`, or a softmax temperature T), plus the number of images whose top-1
    label agrees. Sigmoid rows are compared with :func:`score_kl_bernoulli`. Returns
    (cosines [n], kl [n], agreements)."""
    served = np.asarray(served, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    served_rule, reference_rule = _as_scoring(served_t), _as_scoring(reference_t)
    p_served = served_rule.probabilities(label_cosines(served, served_labels))
    p_reference = reference_rule.probabilities(label_cosines(reference, reference_labels))
    sigmoid_rows = "sigmoid" in (served_rule.rule, reference_rule.rule)
    kl = (score_kl_bernoulli if sigmoid_rows else score_kl)(p_reference, p_served)
    return cosine_rows(served, reference), kl, top1_agreements(p_served, p_reference)


def _labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {labels.shape}; expected ({n},), one per row")
    return labels.astype(np.intp)


def nll_per_item(cosines: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Negative log-likelihood of each row's true label under softmax(cos / T), shape [n],
    from :func:`log_softmax` (no probability clipping, so it is exact for extreme logits)."""
    logp = log_softmax(cosines, temperature)
    labels = _labels(labels, logp.shape[0])
    return -logp[np.arange(len(labels)), labels]


def nll(cosines: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(cos / T)."""
    return float(nll_per_item(cosines, labels, temperature).mean())


def brier_from_probs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Multi-class Brier score of each row: sum over classes of (p_k - [k == label])^2, in
    [0, 2]; shape [n]. ``probs`` are probability rows [n, k]."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = _labels(labels, probs.shape[0])
    rows = np.arange(len(labels))
    # sum_k p_k^2 - 2 p_label + 1, without building the one-hot matrix.
    return (probs ** 2).sum(axis=-1) - 2.0 * probs[rows, labels] + 1.0


def brier_per_item(cosines: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Multi-class Brier score of each row under softmax(cos / T), shape [n] (see
    :func:`brier_from_probs`)."""
    return brier_from_probs(softmax(cosines, temperature), labels)


def brier(cosines: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean multi-class Brier score under softmax(cos / T) (Brier 1950; lower is better,
    0 for certain and right, 2 for certain and wrong)."""
    return float(brier_per_item(cosines, labels, temperature).mean())


def correct_per_item(cosines: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """Whether each row's true label is among its ``k`` highest cosines (top-1 for k=1,
    top-5 for k=5), shape [n] bool. Ties at the k-th place count as a hit only if the label
    is among the first k indices numpy's partition picks."""
    cos = np.asarray(cosines, dtype=np.float64)
    labels = _labels(labels, cos.shape[0])
    if k == 1:
        return cos.argmax(axis=-1) == labels
    k = min(int(k), cos.shape[-1])
    top = np.argpartition(-cos, k - 1, axis=-1)[:, :k]
    return (top == labels[:, None]).any(axis=-1)


def fit_temperature_checked(cosines: np.ndarray, labels: np.ndarray, lo: float = 1e-3,
                            hi: float = 10.0, iters: int = 80,
                            rtol: float = 0.01) -> tuple[float, bool]:
    """Temperature minimising NLL on a labelled held-out set (Guo et al. 2017), and whether
    the fit stopped at a search bound.

    NLL is unimodal in log T for a fixed logit matrix, so a golden-section search over
    log T in [lo, hi] finds the optimum without a gradient or scipy. When the optimum lies
    outside [lo, hi] the search converges onto the bound; ``at_bound`` is True when T is
    within a relative ``rtol`` of ``lo`` or ``hi`` (the fitted T is then a clamp, not an
    optimum: widen the bounds or distrust the data, e.g. all labels right at any T).

    Raises ValueError for bounds that are not 0 < lo < hi.
    """
    if not 0 < lo < hi:
        raise ValueError(f"temperature bounds must satisfy 0 < lo < hi; got lo={lo}, hi={hi}")
    cosines = np.asarray(cosines, dtype=np.float64)
    labels = _labels(labels, cosines.shape[0])
    a, b = np.log(lo), np.log(hi)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(cosines, labels, np.exp(c)), nll(cosines, labels, np.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(cosines, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(cosines, labels, np.exp(d))
    t = float(np.exp((a + b) / 2))
    at_bound = bool(t <= lo * (1 + rtol) or t >= hi * (1 - rtol))
    return t, at_bound


def fit_temperature(cosines: np.ndarray, labels: np.ndarray,
                    lo: float = 1e-3, hi: float = 10.0, iters: int = 80) -> float:
    """Temperature minimising NLL on a labelled held-out set (Guo et al. 2017); see
    :func:`fit_temperature_checked`, which also says whether the fit hit a bound."""
    return fit_temperature_checked(cosines, labels, lo, hi, iters)[0]


# ---- Scoring rules: how a model turns cosines into label probabilities --------------------
#
# CLIP is trained with a softmax over the labels of a batch, SigLIP (Zhai et al. 2023) with an
# independent sigmoid per (image, text) pair. Serving and evaluating a model with the rule it
# was trained with keeps its probabilities meaningful: a SigLIP probability is "this label
# matches this image", on its own; the probabilities of one image's labels do not sum to 1.

SCORING_RULES = ("softmax", "sigmoid")
SIGMOID_SCALE_BOUNDS = (0.1, 1000.0)  # the sigmoid fit's search range for logit_scale


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float64, stable for large |logits|."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def sigmoid_probs(cosines: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """SigLIP's per-label probabilities sigmoid(scale * cos + bias), [n, k] float64; each
    label on its own (rows do not sum to 1)."""
    return sigmoid(float(scale) * np.asarray(cosines, dtype=np.float64) + float(bias))


def sigmoid_nll_per_item(cosines: np.ndarray, labels: np.ndarray, scale: float,
                         bias: float) -> np.ndarray:
    """Each row's binary cross-entropy summed over its labels under sigmoid(scale * cos +
    bias), true label positive and every other label negative (the SigLIP loss of one
    image), shape [n]; from log-sigmoid, so exact for extreme logits."""
    logits = float(scale) * np.asarray(cosines, dtype=np.float64) + float(bias)
    labels = _labels(labels, logits.shape[0])
    signs = -np.ones_like(logits)
    signs[np.arange(len(labels)), labels] = 1.0
    return np.logaddexp(0.0, -signs * logits).sum(axis=-1)


def _sigmoid_bias_for(cosines: np.ndarray, positives: np.ndarray, scale: float) -> float:
    # For a fixed scale the cross-entropy is convex in the bias and its gradient,
    # sum_neg sigmoid(z + b) - sum_pos sigmoid(-(z + b)), increases strictly in b: bisect its
    # root. Written as two sums of small terms (not sum(sigmoid) - n_positive), so it keeps
    # its precision when every pair is confidently right and both sums are tiny.
    z = scale * cosines
    pos = positives.astype(bool)
    z_pos, z_neg = z[pos], z[~pos]
    lo, hi = -float(np.abs(z).max()) - 50.0, float(np.abs(z).max()) + 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if sigmoid(z_neg + mid).sum() < sigmoid(-(z_pos + mid)).sum():
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fit_sigmoid_checked(cosines: np.ndarray, labels: np.ndarray,
                        bounds: tuple[float, float] = SIGMOID_SCALE_BOUNDS, iters: int = 60,
                        rtol: float = 0.01) -> tuple[float, float, bool]:
    """Scale and bias minimising the sigmoid rule's NLL (:func:`sigmoid_nll_per_item`) on a
    labelled held-out set: Platt scaling (Platt 1999) of every (image, label) pair, the
    sigmoid counterpart of the softmax temperature fit. Returns (scale, bias, at_bound).

    The NLL is jointly convex in (scale, bias), so its minimum over the bias, a function of
    the scale alone, is convex too: a golden-section search over log scale in ``bounds``, with
    the best bias for each scale found by bisection. ``at_bound`` is True when the scale is
    within a relative ``rtol`` of a bound (e.g. separable data wants an infinite scale).

    Raises ValueError for bounds that are not 0 < lo < hi.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"scale bounds must satisfy 0 < lo < hi; got {bounds}")
    cosines = np.asarray(cosines, dtype=np.float64)
    labels = _labels(labels, cosines.shape[0])
    positives = np.zeros_like(cosines)
    positives[np.arange(len(labels)), labels] = 1.0

    def loss(log_scale):
        scale = float(np.exp(log_scale))
        bias = _sigmoid_bias_for(cosines, positives, scale)
        return float(sigmoid_nll_per_item(cosines, labels, scale, bias).mean()), bias

    a, b = np.log(lo), np.log(hi)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c)[0], loss(d)[0]
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)[0]
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)[0]
    scale = float(np.exp((a + b) / 2))
    bias = loss((a + b) / 2)[1]
    at_bound = bool(scale <= lo * (1 + rtol) or scale >= hi * (1 - rtol))
    return scale, float(bias), at_bound


@dataclass(frozen=True)
class Scoring:
    """How label probabilities come from cosines: the rule a model was trained with and its
    fitted parameters.

    - ``softmax`` (CLIP): softmax(cos / temperature) over the labels; rows sum to 1.
    - ``sigmoid`` (SigLIP): sigmoid(scale * cos + bias) per label, independently; rows need not
      sum to 1. ``temperature`` is 1 / scale, so "T" means the same under both rules.

    The max-probability OOD score (:meth:`max_probability`) is MCM under softmax and the
    maximum sigmoid probability under sigmoid; ECE is measured on the top label's
    probability under either rule.
    """

    rule: str = "softmax"
    temperature: float = 1.0
    bias: float = 0.0  # sigmoid only

    def __post_init__(self):
        if self.rule not in SCORING_RULES:
            raise ValueError(f"unknown scoring rule {self.rule!r}; known: {list(SCORING_RULES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.rule == "softmax" and self.bias:
            raise ValueError("the softmax rule has no bias")

    @classmethod
    def sigmoid(cls, scale: float, bias: float) -> "Scoring":
        """The sigmoid rule sigmoid(scale * cos + bias)."""
        return cls("sigmoid", 1.0 / float(scale), float(bias))

    @property
    def scale(self) -> float:
        """The logit scale, 1 / temperature."""
        return 1.0 / self.temperature

    def probabilities(self, cosines: np.ndarray) -> np.ndarray:
        """Label probabilities [n, k] of cosines [n, k] under this rule."""
        if self.rule == "sigmoid":
            return sigmoid_probs(cosines, self.scale, self.bias)
        return softmax(cosines, self.temperature)

    def nll_per_item(self, cosines: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-row negative log-likelihood of the labels under this rule: of the true label
        under softmax, of the true label positive and the others negative under sigmoid."""
        if self.rule == "sigmoid":
            return sigmoid_nll_per_item(cosines, labels, self.scale, self.bias)
        return nll_per_item(cosines, labels, self.temperature)

    def max_probability(self, cosines: np.ndarray) -> np.ndarray:
        """The max-probability OOD score [n] (higher = more in-distribution): MCM under
        softmax, the largest per-label sigmoid probability under sigmoid."""
        return self.probabilities(cosines).max(axis=-1)


def fit_scoring_checked(rule: str, cosines: np.ndarray,
                        labels: np.ndarray) -> tuple[Scoring, bool]:
    """Fit rule ``rule``'s parameters on a labelled held-out set: the softmax temperature
    (:func:`fit_temperature_checked`) or the sigmoid scale and bias
    (:func:`fit_sigmoid_checked`). Returns (scoring, whether the fit stopped at a bound)."""
    if rule == "softmax":
        t, at_bound = fit_temperature_checked(cosines, labels)
        return Scoring("softmax", t), at_bound
    if rule == "sigmoid":
        scale, bias, at_bound = fit_sigmoid_checked(cosines, labels)
        return Scoring.sigmoid(scale, bias), at_bound
    raise ValueError(f"unknown scoring rule {rule!r}; known: {list(SCORING_RULES)}")


def _kept_count(n: int, tpr: float) -> int:
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr}")
    # round() first: 0.95 * 100 is 95.00000000000001 in binary, and ceil would make it 96.
    return max(1, int(np.ceil(round(tpr * n, 9))))


def fit_ood_threshold(id_scores: np.ndarray, tpr: float = ID_TPR) -> float:
    """Score threshold that keeps at least ``tpr`` of in-distribution images (scores >=
    threshold are in-distribution).

    It is an order statistic, not an interpolated quantile: with k = ceil(tpr * n), the k-th
    largest ID score. At least k of the n scores are >= it (ties can keep more), and it is the
    largest threshold that does so, so as few extra images as possible are kept.
    (``np.quantile(scores, 0.05)`` interpolates and keeps 255 of 269 items, 94.8%.)

    Raises ValueError for no scores, NaN scores or a ``tpr`` outside (0, 1].
    """
    scores = np.asarray(id_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("cannot fit an OOD threshold on no in-distribution scores")
    if np.isnan(scores).any():
        raise ValueError("in-distribution scores contain NaN")
    k = _kept_count(scores.size, tpr)
    return float(np.partition(scores, scores.size - k)[scores.size - k])


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling ID (positive, higher score) from OOD.

    Computed as the Mann-Whitney U statistic with average ranks, so ties count half;
    vectorised (one sort), since the bootstrap calls it thousands of times.

    Raises ValueError when either side is empty or a score is NaN.
    """
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    n_id, n_ood = id_scores.size, ood_scores.size
    if n_id == 0 or n_ood == 0:
        raise ValueError(f"AUROC needs both ID and OOD scores; got {n_id} ID, {n_ood} OOD")
    scores = np.concatenate([id_scores, ood_scores])
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = scores.argsort(kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tied run
    ends = np.r_[starts[1:], s.size]
    run = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + ends - 1) / 2 + 1)[run]  # average 1-based rank of each run
    u = ranks[:n_id].sum() - n_id * (n_id + 1) / 2
    return float(u / (n_id * n_ood))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = ID_TPR) -> float:
    """Fraction of OOD images accepted as in-distribution at the threshold that keeps at
    least ``tpr`` of the ID images (FPR@95%TPR for the default), the same order-statistic
    rule as :func:`fit_ood_threshold`."""
    threshold = fit_ood_threshold(id_scores, tpr)
    ood = np.asarray(ood_scores, dtype=np.float64)
    if ood.size == 0:
        raise ValueError("FPR needs at least one OOD score")
    return float((ood >= threshold).mean())


# ---- Feature-space OOD scores: fitted on ID image embeddings, numpy only at fit and serve.

def _normalise(embeddings, name: str = "embeddings") -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, D] matrix; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinity")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class KnnState:
    """A kNN OOD score's state: ``bank`` [m, D] float32 L2-normalised ID embeddings and the
    neighbour rank ``k``."""

    bank: np.ndarray
    k: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (what :func:`save_ood_state` writes)."""
        return {"bank": self.bank, "k": np.array(self.k, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays) -> "KnnState":
        """Rebuild from :meth:`to_arrays`' output; raises ValueError for inconsistent arrays."""
        bank, k = np.asarray(arrays["bank"]), int(arrays["k"])
        if bank.ndim != 2 or not 1 <= k <= bank.shape[0]:
            raise ValueError(f"kNN state needs a [m, D] bank and 1 <= k <= m; got bank "
                             f"{bank.shape}, k={k}")
        return cls(bank=bank, k=k)


@dataclass(frozen=True)
class MahalanobisState:
    """A Mahalanobis OOD score's state: ``means`` [C, D] class means of L2-normalised ID
    embeddings and the shared ``precision`` [D, D] (inverse shrunk covariance), float64."""

    means: np.ndarray
    precision: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (what :func:`save_ood_state` writes)."""
        return {"means": self.means, "precision": self.precision}

    @classmethod
    def from_arrays(cls, arrays) -> "MahalanobisState":
        """Rebuild from :meth:`to_arrays`' output; raises ValueError for inconsistent arrays."""
        means, precision = np.asarray(arrays["means"]), np.asarray(arrays["precision"])
        d = means.shape[-1] if means.ndim == 2 else -1
        if means.ndim != 2 or precision.shape != (d, d):
            raise ValueError(f"Mahalanobis state needs means [C, D] and precision [D, D]; got "
                             f"{means.shape} and {precision.shape}")
        return cls(means=means, precision=precision)


def fit_knn(id_embeddings: np.ndarray, k: int = KNN_K, max_bank: int = KNN_MAX_BANK,
            seed: int = 0) -> KnnState:
    """Fit the deep-nearest-neighbour OOD score (Sun et al. 2022, "Out-of-distribution
    detection with deep nearest neighbors"): keep the L2-normalised ID embeddings as a bank.

    The bank is bounded to ``max_bank`` items (default 5000: 10 MB at D=512 in float32, and a
    [batch, 5000] matmul per request) by a seeded, deterministic subsample without
    replacement. Sun et al. scale k with the bank (k=50 for CIFAR-10's 50k images, 1000 for
    ImageNet's 1.28M with the full set); the default 10 suits banks of a few hundred to 5000.

    Raises ValueError for a bank smaller than ``k``, ``k < 1`` or bad embeddings.
    """
    x = _normalise(id_embeddings, "ID embeddings")
    if k < 1 or max_bank < 1:
        raise ValueError(f"k and max_bank must be >= 1; got k={k}, max_bank={max_bank}")
    if x.shape[0] > max_bank:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_bank, replace=False))
        x = x[keep]
    if x.shape[0] < k:
        raise ValueError(f"kNN needs at least k={k} ID embeddings; got {x.shape[0]}")
    return KnnState(bank=x.astype(np.float32), k=int(k))


def score_knn(state: KnnState, embeddings: np.ndarray) -> np.ndarray:
    """kNN OOD score, shape [n]: minus the Euclidean distance from each L2-normalised
    embedding to its k-th nearest ID neighbour in the bank (in [-2, 0]; higher = more ID).
    On unit vectors the distance is sqrt(2 - 2 cos), so one matmul and a partition do it."""
    x = _normalise(embeddings).astype(np.float32)
    if x.shape[1] != state.bank.shape[1]:
        raise ValueError(f"embeddings have dimension {x.shape[1]}; the kNN bank has "
                         f"{state.bank.shape[1]}")
    sims = x @ state.bank.T
    kth = -np.partition(-sims, state.k - 1, axis=1)[:, state.k - 1]  # k-th largest cosine
    return -np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def ledoit_wolf_shrinkage(residuals: np.ndarray) -> float:
    """The Ledoit-Wolf (2004) analytic shrinkage intensity in [0, 1] toward (trace/D) * I for
    the covariance of zero-mean rows ``residuals`` [n, D] (the formula scikit-learn's
    ``ledoit_wolf_shrinkage`` uses, in numpy so the gateway need not import sklearn)."""
    x = np.asarray(residuals, dtype=np.float64)
    n, d = x.shape
    x2 = x ** 2
    var = x2.sum(axis=0) / n
    mu = var.sum() / d
    beta_ = (x2.sum(axis=1) ** 2).sum()  # sum over rows of ||x_i||^4 = sum(x2.T @ x2)
    delta_ = ((x.T @ x) ** 2).sum() / n ** 2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * var.sum() + d * mu ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def fit_mahalanobis(id_embeddings: np.ndarray, labels: np.ndarray,
                    shrinkage: float | str = "ledoit-wolf") -> MahalanobisState:
    """Fit the Mahalanobis OOD score (Lee et al. 2018): class means of the L2-normalised ID
    embeddings and one covariance shared by all classes (pooled within-class residuals).

    The covariance is shrunk toward the scaled identity, (1 - a) S + a (tr(S) / D) I, so it
    is invertible even with fewer items than dimensions; ``shrinkage`` is a in [0, 1] or
    ``"ledoit-wolf"`` for the analytic Ledoit-Wolf intensity (:func:`ledoit_wolf_shrinkage`).

    Raises ValueError for mismatched labels, a shrinkage outside [0, 1], or a singular
    covariance (shrinkage 0 with too few items).
    """
    x = _normalise(id_embeddings, "ID embeddings")
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels have shape {labels.shape}; expected ({x.shape[0]},)")
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes)).astype(np.float64)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    residuals = x - means[inverse]
    cov = residuals.T @ residuals / x.shape[0]
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit-wolf":
            raise ValueError(f"shrinkage must be a number in [0, 1] or 'ledoit-wolf'; "
                             f"got {shrinkage!r}")
        a = ledoit_wolf_shrinkage(residuals)
    else:
        a = float(shrinkage)
        if not 0 <= a <= 1:
            raise ValueError(f"shrinkage must be in [0, 1]; got {a}")
    d = cov.shape[0]
    shrunk = (1 - a) * cov + a * (np.trace(cov) / d) * np.eye(d)
    # eigh rather than inv: a rank-deficient covariance (shrinkage 0, n < D) is rejected by
    # its eigenvalues instead of "inverted" into 1e16-sized noise.
    w, v = np.linalg.eigh(shrunk)
    if w.max() <= 0 or w.min() <= 1e-10 * w.max():
        raise ValueError(f"the shrunk covariance is singular (shrinkage {a}, {x.shape[0]} "
                         f"items, dimension {d}); use a larger shrinkage or more items")
    precision = (v / w) @ v.T
    return MahalanobisState(means=means, precision=precision)


def score_mahalanobis(state: MahalanobisState, embeddings: np.ndarray) -> np.ndarray:
    """Mahalanobis OOD score, shape [n]: minus the smallest squared Mahalanobis distance from
    each L2-normalised embedding to a class mean (higher = more ID). Squared, as Lee et al.
    use it; a threshold fitted on these scores is in the same squared units."""
    x = _normalise(embeddings)
    if x.shape[1] != state.means.shape[1]:
        raise ValueError(f"embeddings have dimension {x.shape[1]}; the Mahalanobis state has "
                         f"{state.means.shape[1]}")
    xp = x @ state.precision
    mp = state.means @ state.precision
    d2 = ((xp * x).sum(axis=1)[:, None] - 2.0 * xp @ state.means.T
          + (mp * state.means).sum(axis=1)[None, :])
    return -np.maximum(d2.min(axis=1), 0.0)


_STATES = {"knn": KnnState, "mahalanobis": MahalanobisState}


def save_ood_state(path: str | os.PathLike, kind: str, state) -> None:
    """Write a feature-space OOD score's state to ``path`` (an ``.npz`` file beside the
    sidecar, written with np.savez at exactly that path). Raises ValueError for a kind
    without state ("mcm" needs none) or a state of the wrong type."""
    if kind not in _STATES:
        raise ValueError(f"OOD score {kind!r} has no state file; kinds with one: "
                         f"{sorted(_STATES)}")
    if not isinstance(state, _STATES[kind]):
        raise ValueError(f"a {kind!r} state must be a {_STATES[kind].__name__}; "
                         f"got {type(state).__name__}")
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, kind=np.array(kind), format=np.array(OOD_STATE_FORMAT), **state.to_arrays())


def load_ood_state(path: str | os.PathLike):
    """Read a state written by :func:`save_ood_state`; returns (kind, state). Raises
    ValueError for a missing, unreadable, foreign or newer-format file (no pickles are
    loaded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read OOD state {path}: {exc}") from exc
    kind = str(arrays.get("kind", ""))
    if kind not in _STATES:
        raise ValueError(f"{path} is not an OOD state file (kind {kind!r}); kinds: "
                         f"{sorted(_STATES)}")
    if int(arrays.get("format", -1)) != OOD_STATE_FORMAT:
        raise ValueError(f"{path} has OOD state format {arrays.get('format')}; this clipserve "
                         f"reads format {OOD_STATE_FORMAT}. Refit it.")
    try:
        return kind, _STATES[kind].from_arrays(arrays)
    except KeyError as exc:
        raise ValueError(f"{path}: {kind} state lacks array {exc}") from exc


def fit_ood_state(kind: str, id_embeddings: np.ndarray, labels: np.ndarray | None = None,
                  **options):
    """Fit the state of OOD score ``kind`` on in-distribution image embeddings: None for
    "mcm" (it needs only the temperature), :func:`fit_knn` for "knn", :func:`fit_mahalanobis`
    (which needs ``labels``) for "mahalanobis"; ``options`` go to that function.

    Raises ValueError for an unknown kind (listing the known ones) or missing labels.
    """
    if kind == "mcm":
        return None
    if kind == "knn":
        return fit_knn(id_embeddings, **options)
    if kind == "mahalanobis":
        if labels is None:
            raise ValueError("the mahalanobis OOD score needs the ID embeddings' labels")
        return fit_mahalanobis(id_embeddings, labels, **options)
    raise ValueError(f"unknown OOD score {kind!r}; known: {list(OOD_SCORES)}")


def score_ood(kind: str, state=None, embeddings: np.ndarray | None = None,
              cosines: np.ndarray | None = None,
              temperature: float | None = None, scoring: "Scoring | None" = None) -> np.ndarray:
    """One entry point for the gateway: the OOD score named by a sidecar's ``ood_score``
    (higher = more ID), shape [n]. "mcm" needs ``cosines`` and a ``temperature`` (softmax) or
    a ``scoring`` (its max probability: MCM under softmax, the largest sigmoid probability
    under sigmoid); "knn" and "mahalanobis" need their ``state`` (from
    :func:`load_ood_state`) and ``embeddings``, whatever the scoring rule.

    Raises ValueError for an unknown kind (listing the known ones) or missing inputs.
    """
    if kind == "mcm":
        if cosines is None or (temperature is None and scoring is None):
            raise ValueError("the mcm OOD score needs cosines and a temperature or scoring")
        if scoring is not None:
            return scoring.max_probability(cosines)
        return score_mcm(cosines, temperature)
    if kind not in _STATES:
        raise ValueError(f"unknown OOD score {kind!r}; known: {list(OOD_SCORES)}")
    if not isinstance(state, _STATES[kind]) or embeddings is None:
        raise ValueError(f"the {kind} OOD score needs its {_STATES[kind].__name__} state and "
                         f"the image embeddings")
    return score_knn(state, embeddings) if kind == "knn" else score_mahalanobis(state, embeddings)
