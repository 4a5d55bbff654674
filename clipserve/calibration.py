"""Calibration and OOD math on cosine similarities, numpy only.

The export stage calls the ``fit_*`` functions offline on held-out data; the gateway calls the
``score_*`` functions live. Everything takes cosine similarities between L2-normalised image
and label embeddings, shape [n_images, n_labels], and a temperature T (probabilities are
softmax(cos / T), so T = 1 / CLIP's logit_scale reproduces the model's own probabilities).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
ID_TPR = 0.95  # the OOD threshold keeps this fraction of in-distribution images


def softmax(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of cos / T, computed stably in float64."""
    z = np.asarray(cosines, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def score_mcm(cosines: np.ndarray, temperature: float) -> np.ndarray:
    """Maximum concept matching score (Ming et al. 2022): max over labels of softmax(cos / T).

    Higher means more in-distribution. Shape [n_images].
    """
    return softmax(cosines, temperature).max(axis=-1)


def score_ece(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: L1 gap between accuracy and confidence over ``n_bins``
    equal-width confidence bins, weighted by bin population. Returns 0.0 for no samples."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidences.size == 0:
        return 0.0
    # Bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidences[mask].mean())
    return float(ece)


def score_kl(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) in nats, row-wise, between probability rows [n, k] (e.g. a shadow
    FP32 endpoint's softmax and a quantized one's on the same images). 0 for identical rows;
    shape [n]. Probabilities are clipped at 1e-12 so a zero in ``other`` stays finite."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(other, dtype=np.float64)
    kl = (p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(axis=-1)
    return np.maximum(kl, 0.0)  # rounding can leave -1e-17 for identical rows


def nll(cosines: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(cos / T)."""
    probs = softmax(cosines, temperature)
    picked = probs[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(cosines: np.ndarray, labels: np.ndarray,
                    lo: float = 1e-3, hi: float = 10.0, iters: int = 80) -> float:
    """Temperature minimising NLL on a labelled held-out set (Guo et al. 2017).

    NLL is unimodal in log T for a fixed logit matrix, so a golden-section search over
    log T in [lo, hi] finds the optimum without a gradient or scipy.
    """
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
    return float(np.exp((a + b) / 2))


def fit_ood_threshold(id_scores: np.ndarray, tpr: float = ID_TPR) -> float:
    """Score threshold that keeps ``tpr`` of in-distribution images (scores >= threshold
    are in-distribution): the (1 - tpr) quantile of the ID scores."""
    return float(np.quantile(np.asarray(id_scores, dtype=np.float64), 1.0 - tpr))


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling ID (positive, higher score) from OOD.

    Computed as the Mann-Whitney U statistic with average ranks, so ties count half.
    """
    id_scores = np.asarray(id_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    scores = np.concatenate([id_scores, ood_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over tied runs
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_id, n_ood = len(id_scores), len(ood_scores)
    u = ranks[:n_id].sum() - n_id * (n_id + 1) / 2
    return float(u / (n_id * n_ood))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = ID_TPR) -> float:
    """Fraction of OOD images accepted as in-distribution at the threshold that keeps
    ``tpr`` of the ID images (FPR@95%TPR for the default)."""
    threshold = fit_ood_threshold(id_scores, tpr)
    return float((np.asarray(ood_scores) >= threshold).mean())
