"""clipserve.formats: packing, round trips, fitted int8 ranges and the recall report."""

import numpy as np
import pytest

from clipserve import formats
from clipserve.formats import OutputFormat


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_float32_is_little_endian_and_exact():
    x = unit_rows(3, 16)
    packed = formats.encode(x, OutputFormat.FLOAT32)
    assert packed[0] == b"".join(np.array([v], "<f4").tobytes() for v in x[0])
    np.testing.assert_array_equal(formats.decode(packed, "float32", 16), x)


def test_bytes_per_vector_matches_what_encode_writes():
    x = unit_rows(2, 20)
    params = formats.fit_output_formats(x)
    for fmt in OutputFormat:
        packed = formats.encode(x, fmt, params)
        assert len(packed[0]) == formats.bytes_per_vector(fmt, 20), fmt
    assert formats.bytes_per_vector("ubinary", 20) == 3  # 20 bits round up to 3 bytes


def test_float16_round_trip_error_is_half_precision_rounding():
    x = unit_rows(50, 64)
    back = formats.decode(formats.encode(x, "float16"), "float16", 64)
    # |x| < 1: float16 spacing below 1 is at most 2**-11, so rounding error is at most 2**-12.
    assert np.abs(back - x).max() <= 2.0 ** -12


def test_int8_codes_span_the_fitted_range_and_round_trip_within_half_a_step():
    x = unit_rows(200, 32)
    params = formats.fit_output_formats(x)
    codes = formats.quantize_int8(x, params["int8"])
    assert codes.min(axis=0).tolist() == [-128] * 32  # each dimension's min maps to -128 ...
    assert codes.max(axis=0).tolist() == [127] * 32  # ... and its max to 127
    back = formats.decode(formats.encode(x, "int8", params), "int8", 32, params)
    step = (np.array(params["int8"]["hi"]) - np.array(params["int8"]["lo"])) / 255
    assert (np.abs(back - x) <= step / 2 + 1e-6).all()


def test_int8_clips_values_outside_the_fitted_range():
    params = {"int8": formats.fit_int8_ranges(np.array([[0.0, -0.5], [0.5, 0.5]]))}
    codes = formats.quantize_int8(np.array([[2.0, -3.0]]), params["int8"])
    assert codes.tolist() == [[127, -128]]


def test_int8_without_ranges_or_with_the_wrong_dimension_is_refused():
    x = unit_rows(2, 8)
    with pytest.raises(ValueError, match="fitted at export"):
        formats.encode(x, "int8", {})
    params = formats.fit_output_formats(unit_rows(4, 6))
    with pytest.raises(ValueError, match="6 dimensions, the embeddings 8"):
        formats.encode(x, "int8", params)


def test_ubinary_packs_sign_bits_msb_first_and_decodes_to_unit_vectors():
    x = np.array([[0.5, -0.1, 0.2, -0.3, 0.1, 0.1, -0.2, 0.3, 0.9]], np.float32)
    packed = formats.encode(x, "ubinary")
    assert packed == [bytes([0b10101101, 0b10000000])]
    back = formats.decode(packed, "ubinary", 9)
    assert back.shape == (1, 9)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, rtol=1e-6)
    assert (np.sign(back) == np.sign(x)).all()


def test_decode_rejects_a_partial_vector():
    with pytest.raises(ValueError, match="not a whole number"):
        formats.decode(b"\x00" * 10, "float32", 4)


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError, match="float32, float16, int8, ubinary"):
        OutputFormat.parse("int4")


def test_top_k_and_recall():
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array([[1.0, 0.5, 0, 0]], np.float32)
    assert formats.top_k(queries, corpus, 2).tolist() == [[0, 1]]
    assert formats.recall_at_k(np.array([[0, 1]]), np.array([[1, 3]])) == 0.5


def test_report_orders_formats_by_what_they_keep():
    # Clustered data like real embeddings: neighbours are close, so coarse formats lose some.
    rng = np.random.default_rng(1)
    centres = unit_rows(20, 64, seed=2)
    corpus = centres[rng.integers(0, 20, 500)] + 0.3 * unit_rows(500, 64, seed=3)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:50] + 0.05 * unit_rows(50, 64, seed=4)
    report = formats.format_report(queries, corpus)
    assert report["float32"]["recall_at_k"] == 1.0
    assert report["float16"]["recall_at_k"] >= 0.98
    assert 0.8 <= report["int8"]["recall_at_k"] < 1.0
    assert report["ubinary"]["recall_at_k"] < report["int8"]["recall_at_k"]
    assert [report[f.value]["bytes_per_vector"] for f in OutputFormat] == [256, 128, 64, 8]
    assert report["n_queries"] == 50 and report["k"] == 10


def test_report_needs_k_corpus_vectors():
    with pytest.raises(ValueError, match="at least 10"):
        formats.format_report(unit_rows(2, 8), unit_rows(5, 8))
