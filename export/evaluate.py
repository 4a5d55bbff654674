"""onnxruntime plumbing for measurements: sessions, batched embedding, fidelity against a
reference, batch invariance and offline throughput. The quality math is in
:mod:`clipserve.export.quality`."""

from __future__ import annotations

import os
import time

import numpy as np

from clipserve.calibration import cosine_rows


CLIP_VOCAB_SIZE = 49408


def random_token_ids(context_length: int, batch: int, seed: int = 0,
                     vocab_size: int = CLIP_VOCAB_SIZE) -> np.ndarray:
    """Random valid token ids: for CLIP's vocabulary sot, random BPE ids, eot, then zero
    padding; for any other (SigLIP's 32k, a built-in's WordPiece) random ids below
    ``vocab_size``, then zero padding (CLIP ids would index past its token embedding)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, context_length), dtype=np.int32)
    for row in ids:
        n = int(rng.integers(1, context_length - 1))
        if vocab_size == CLIP_VOCAB_SIZE:
            row[0], row[n + 1] = 49406, 49407
            row[1:n + 1] = rng.integers(256, 49406, n)
        else:
            row[:n + 1] = rng.integers(1, vocab_size, n + 1)
    return ids


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
    return bool(cosine_rows(batched, alone).min() >= min_cosine)


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
