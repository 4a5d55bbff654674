"""Embedding output formats for vector databases: the math, numpy only.

The gateway computes float32, L2-normalised embeddings; a caller may ask for them packed:

- ``float32``: 4 bytes per dimension, little-endian. The reference.
- ``float16``: 2 bytes per dimension (IEEE half, little-endian); rounding only.
- ``int8``: 1 byte per dimension. Scalar quantization with a per-dimension range fitted at
  export on calibration embeddings (:func:`fit_int8_ranges`): ``q = round((x - lo) / step) -
  128`` with ``step = (hi - lo) / 255``, clipped to -128..127, so ``x ~= lo + (q + 128) * step``.
  Values outside the fitted range clip, which is why the range is fitted on embeddings of the
  model's own data and stored with the endpoint (sidecar ``output_formats["int8"]``).
- ``ubinary``: 1 bit per dimension, packed 8 per byte, most significant bit first
  (``numpy.packbits``): bit = 1 where the value is > 0. Ranking by Hamming distance equals
  ranking the decoded +-1 vectors by dot product.

The export calls :func:`fit_output_formats` (what goes into the sidecar) and
:func:`format_report` (what each format costs: recall@10 against float32 neighbours and bytes
per vector); the server calls :func:`encode`; clients call :func:`decode`.
"""

from __future__ import annotations

import enum

import numpy as np

INT8_LEVELS = 255  # -128..127


class OutputFormat(str, enum.Enum):
    """How embeddings are packed in a response. The value is the spelling used everywhere
    (proto enum suffix, HTTP ``output_format``, CLI)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    UBINARY = "ubinary"

    @classmethod
    def parse(cls, text: str) -> "OutputFormat":
        """Parse a format name; raises ValueError listing the valid ones."""
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            valid = ", ".join(f.value for f in cls)
            raise ValueError(f"unknown output format {text!r}; valid formats: {valid}") from None


def bytes_per_vector(fmt: OutputFormat | str, dim: int) -> int:
    """Bytes one packed ``dim``-dimensional vector takes in ``fmt``."""
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.FLOAT32:
        return 4 * dim
    if fmt is OutputFormat.FLOAT16:
        return 2 * dim
    if fmt is OutputFormat.INT8:
        return dim
    return (dim + 7) // 8


def fit_int8_ranges(embeddings: np.ndarray) -> dict:
    """Per-dimension (lo, hi) of calibration ``embeddings`` [n, dim] for int8 quantization.

    Min and max, not percentiles: CLIP embeddings are bounded (unit norm) and the calibration
    set is the model's own data, so outliers are real values a percentile would clip. A
    dimension with no spread gets a tiny range so its step is never zero.

    Returns:
        ``{"lo": [dim floats], "hi": [dim floats], "n_calibration": n}``.

    Raises:
        ValueError: not a non-empty 2-D array of finite values.
    """
    x = _matrix(embeddings, "calibration embeddings")
    lo, hi = x.min(axis=0), x.max(axis=0)
    hi = np.maximum(hi, lo + 1e-6)
    return {"lo": lo.astype(np.float32).tolist(), "hi": hi.astype(np.float32).tolist(),
            "n_calibration": int(len(x))}


def _matrix(embeddings, what: str) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not x.size:
        raise ValueError(f"{what} must be a non-empty [n, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def _ranges(params: dict | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not params or "lo" not in params or "hi" not in params:
        raise ValueError("int8 needs the per-dimension ranges fitted at export "
                         "(output_formats['int8'] with 'lo' and 'hi')")
    lo = np.asarray(params["lo"], dtype=np.float32)
    hi = np.asarray(params["hi"], dtype=np.float32)
    if lo.shape != (dim,) or hi.shape != (dim,):
        raise ValueError(f"int8 ranges have {lo.shape[0] if lo.ndim else 0} dimensions, the "
                         f"embeddings {dim}")
    return lo, hi


def quantize_int8(vectors: np.ndarray, params: dict) -> np.ndarray:
    """float [n, dim] -> int8 [n, dim] with the fitted ranges ``params``; raises ValueError."""
    x = np.asarray(vectors, dtype=np.float32)
    lo, hi = _ranges(params, x.shape[-1])
    step = (hi - lo) / INT8_LEVELS
    q = np.rint((x - lo) / step) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray, params: dict) -> np.ndarray:
    """int8 [n, dim] -> float32 [n, dim] (the centre of each code's bin); raises ValueError."""
    q = np.asarray(codes, dtype=np.int8)
    lo, hi = _ranges(params, q.shape[-1])
    step = (hi - lo) / INT8_LEVELS
    return (lo + (q.astype(np.float32) + 128.0) * step).astype(np.float32)


def encode(vectors: np.ndarray, fmt: OutputFormat | str, params: dict | None = None) -> list[bytes]:
    """Pack float ``vectors`` [n, dim] in ``fmt``: one bytes object per vector.

    Args:
        vectors: float32 embeddings.
        fmt: the output format.
        params: the endpoint's ``output_formats`` (only int8 needs it: ``params["int8"]``).

    Raises:
        ValueError: int8 without fitted ranges of the right dimension.
    """
    fmt = OutputFormat(fmt)
    x = np.asarray(vectors, dtype=np.float32)
    if fmt is OutputFormat.FLOAT32:
        packed = x.astype("<f4")
    elif fmt is OutputFormat.FLOAT16:
        packed = x.astype("<f2")
    elif fmt is OutputFormat.INT8:
        packed = quantize_int8(x, (params or {}).get("int8"))
    else:
        packed = np.packbits(x > 0, axis=-1)
    return [row.tobytes() for row in packed]


def decode(data: bytes | list[bytes], fmt: OutputFormat | str, dim: int,
           params: dict | None = None) -> np.ndarray:
    """Unpack what :func:`encode` made (one bytes per vector, or all rows concatenated) into
    float32 [n, dim]. ubinary decodes to +-1/sqrt(dim) (unit vectors whose dot products rank
    like Hamming distance); int8 needs ``params`` (``{"int8": {"lo", "hi"}}`` or the inner dict).

    Raises:
        ValueError: a length that is not a whole number of vectors, or int8 without ranges.
    """
    fmt = OutputFormat(fmt)
    blob = b"".join(data) if isinstance(data, (list, tuple)) else bytes(data)
    size = bytes_per_vector(fmt, dim)
    if len(blob) % size:
        raise ValueError(f"{len(blob)} bytes is not a whole number of {fmt.value} vectors of "
                         f"dimension {dim} ({size} bytes each)")
    n = len(blob) // size
    if fmt is OutputFormat.FLOAT32:
        return np.frombuffer(blob, dtype="<f4").reshape(n, dim).astype(np.float32)
    if fmt is OutputFormat.FLOAT16:
        return np.frombuffer(blob, dtype="<f2").reshape(n, dim).astype(np.float32)
    if fmt is OutputFormat.INT8:
        params = params or {}
        ranges = params.get("int8", params)
        return dequantize_int8(np.frombuffer(blob, dtype=np.int8).reshape(n, dim), ranges)
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8).reshape(n, size), axis=-1)[:, :dim]
    return ((bits.astype(np.float32) * 2.0 - 1.0) / np.sqrt(dim)).astype(np.float32)


def fit_output_formats(embeddings: np.ndarray) -> dict:
    """What an endpoint's sidecar stores in ``output_formats``: the int8 ranges fitted on its
    calibration ``embeddings`` [n, dim]. float16 and ubinary need no parameters.

    Raises:
        ValueError: as :func:`fit_int8_ranges`.
    """
    return {"int8": {"method": "per-dimension min/max", **fit_int8_ranges(embeddings)}}


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Indices [n_queries, k] of each query's k highest dot products in ``corpus``, best first
    (ties broken by index, so the order is deterministic)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(corpus, np.float64).T
    k = min(k, scores.shape[1])
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores),
                       axis=-1)
    return order[:, :k]


def recall_at_k(reference: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each row of ``reference`` neighbour indices that ``found`` also holds."""
    hits = [len(set(r.tolist()) & set(f.tolist())) / len(r) for r, f in zip(reference, found)]
    return float(np.mean(hits))


def format_recall(queries: np.ndarray, corpus: np.ndarray, fmt: OutputFormat | str,
                  params: dict | None = None, k: int = 10) -> float:
    """recall@k of ``fmt`` against float32: both the queries and the corpus are encoded and
    decoded in ``fmt`` and searched by dot product; the truth is the float32 top-k."""
    q, c = _matrix(queries, "queries"), _matrix(corpus, "corpus")
    dim = c.shape[1]
    truth = top_k(q, c, k)
    rq = decode(encode(q, fmt, params), fmt, dim, params)
    rc = decode(encode(c, fmt, params), fmt, dim, params)
    return recall_at_k(truth, top_k(rq, rc, k))


def format_report(queries: np.ndarray, corpus: np.ndarray, params: dict | None = None,
                  k: int = 10) -> dict:
    """What each output format costs on an evaluation set.

    Args:
        queries: float32 embeddings [n_q, dim] searched for (e.g. the evaluation images).
        corpus: float32 embeddings [n_c, dim] searched in (at least ``k`` rows).
        params: ``output_formats`` to use (the int8 ranges); default: fitted on ``corpus``.
        k: neighbours compared.

    Returns:
        ``{format: {"recall_at_k": float, "bytes_per_vector": int}, "k": k, "n_queries": ...,
        "n_corpus": ...}``: recall@k is the mean share of each query's float32 top-k that the
        format's own top-k (queries and corpus both in that format) finds.

    Raises:
        ValueError: empty or non-finite inputs, or a corpus smaller than ``k``.
    """
    q, c = _matrix(queries, "queries"), _matrix(corpus, "corpus")
    if len(c) < k:
        raise ValueError(f"corpus has {len(c)} vectors; recall@{k} needs at least {k}")
    params = params or fit_output_formats(c)
    report: dict = {"k": k, "n_queries": int(len(q)), "n_corpus": int(len(c))}
    for fmt in OutputFormat:
        report[fmt.value] = {"recall_at_k": format_recall(q, c, fmt, params, k),
                             "bytes_per_vector": bytes_per_vector(fmt, c.shape[1])}
    return report
