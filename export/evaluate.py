"""Measure what a precision costs: embedding fidelity against FP32, zero-shot accuracy,
calibration (ECE before and after a fitted temperature) and OOD detection (MCM score), plus
offline throughput. Inputs are embeddings (numpy); sessions are only used for throughput."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from clipserve import calibration as cal


def cosine_to_reference(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity between two embedding matrices."""
    num = (embeddings.astype(np.float64) * reference).sum(1)
    den = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
    return num / np.maximum(den, 1e-12)


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """Average each class's prompt embeddings ([n_classes * n_prompts, D], class-major) and
    re-normalise: CLIP's prompt ensembling."""
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1]).mean(1)
    return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)


@dataclass(frozen=True)
class EvalImages:
    """Image embeddings of the evaluation splits, all from one image tower."""

    calibration: np.ndarray
    test: np.ndarray
    ood_near: np.ndarray
    ood_far: np.ndarray


def classification_metrics(images: EvalImages, classes: np.ndarray, calibration_labels,
                           test_labels, native_temperature: float) -> dict:
    """Zero-shot, ECE, temperature and OOD figures for one (image tower, text tower) pair.

    The temperature and OOD threshold are fitted on the calibration split; everything
    reported is measured on the test split and the OOD sets."""
    cos_cal, cos_test = images.calibration @ classes.T, images.test @ classes.T
    correct = cos_test.argmax(1) == test_labels
    native = cal.softmax(cos_test, native_temperature).max(1)
    temperature = cal.fit_temperature(cos_cal, calibration_labels)
    fitted = cal.softmax(cos_test, temperature).max(1)
    threshold = cal.fit_ood_threshold(cal.score_mcm(cos_cal, temperature))
    mcm_test = cal.score_mcm(cos_test, temperature)
    mcm_near = cal.score_mcm(images.ood_near @ classes.T, temperature)
    mcm_far = cal.score_mcm(images.ood_far @ classes.T, temperature)
    mcm_ood = np.concatenate([mcm_near, mcm_far])
    return {
        "zero_shot_top1": float(correct.mean()),
        "ece": cal.score_ece(native, correct),
        "ece_calibrated": cal.score_ece(fitted, correct),
        "temperature": temperature,
        "native_temperature": native_temperature,
        "ood_threshold": threshold,
        "ood_auroc": cal.auroc(mcm_test, mcm_ood),
        "fpr95": cal.fpr_at_tpr(mcm_test, mcm_ood),
        "ood_auroc_near": cal.auroc(mcm_test, mcm_near),
        "ood_auroc_far": cal.auroc(mcm_test, mcm_far),
        # What the live OOD counter would show with the fitted threshold: ~5% on ID data.
        "flagged_rate_id": float((mcm_test < threshold).mean()),
        "flagged_rate_near": float((mcm_near < threshold).mean()),
        "flagged_rate_far": float((mcm_far < threshold).mean()),
    }


def make_session(path, threads: int | None = None):
    """A CPU onnxruntime session using ``threads`` intra-op threads (default: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(session, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run a tower over ``inputs`` in batches. Small batches: onnxruntime's arena keeps the
    peak activation memory of each live session (GBs per session for ViT-B at batch 256)."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def batch_invariant(session, inputs: np.ndarray, min_cosine: float = 0.999999) -> bool:
    """Whether each item's embedding is the same alone as inside a batch of ``inputs``
    (min cosine >= ``min_cosine``). False for dynamic activation quantization, whose scale
    is computed over the whole batch."""
    name = session.get_inputs()[0].name
    batched = session.run(None, {name: inputs})[0]
    alone = np.concatenate([session.run(None, {name: inputs[i:i + 1]})[0]
                            for i in range(len(inputs))])
    return bool(cosine_to_reference(batched, alone).min() >= min_cosine)


def throughput(session, batch: np.ndarray, seconds: float = 1.0) -> float:
    """Items per second running ``batch`` repeatedly for about ``seconds`` (after a warm-up).
    Wall-clock and machine-dependent: compare ratios measured in the same run."""
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})
    runs, start = 0, time.perf_counter()
    while True:
        session.run(None, {name: batch})
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return runs * len(batch) / elapsed
