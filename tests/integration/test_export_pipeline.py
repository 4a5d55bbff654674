"""The export stage end to end on the built-in digits-s: report, sidecars, repository layout."""

import numpy as np
import pytest

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name, parse_endpoint_name
from clipserve.tokenizer import ClipTokenizer
from clipserve.export import digits
from clipserve.export.report import read_rows
from tests.integration.conftest import PRECISIONS

REQUIRED = ["model", "precision", "tower", "size_bytes", "cosine_mean", "cosine_min",
            "zero_shot_top1", "ece", "ece_calibrated", "ood_auroc", "fpr95", "temperature",
            "ood_threshold", "items_per_s", "n_test", "params_image", "params_text", "nll",
            "brier", "ood_auroc_near", "ood_auroc_far", "shift_top1", "verdict"]


@pytest.fixture(scope="module")
def rows(repository):
    return read_rows(repository / "report.json")


def row(rows, precision, tower):
    return next(r for r in rows if r["precision"] == precision and r["tower"] == tower)


def test_report_has_one_row_per_precision_and_tower(rows, repository):
    assert sorted((r["precision"], r["tower"]) for r in rows) == sorted(
        (p, t.value) for p in PRECISIONS for t in Tower)
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert r["finite"] is True
    md = (repository / "report.md").read_text()
    quality = md[md.index("## Quality"):md.index("\n## ", md.index("## Quality") + 1)]
    assert quality.count("| digits-s |") == len(rows)
    verdicts = md[md.index("## Verdict per endpoint"):md.index("## Quality")]
    assert all(f"| {r['endpoint']} |" in verdicts for r in rows if r["precision"] != "fp32")
    assert (repository / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_default_is_accurate_and_quantization_stays_close(rows):
    fp32 = row(rows, "fp32", "image")
    assert fp32["zero_shot_top1"] >= 0.85  # digits-s measured 0.948; chance is 0.10
    assert fp32["cosine_min"] == pytest.approx(1.0)
    for precision, min_cos in (("fp16", 0.999), ("int8", 0.998), ("int4", 0.99)):
        for tower in ("image", "text"):
            r = row(rows, precision, tower)
            assert r["cosine_mean"] >= min_cos, (precision, tower, r["cosine_mean"])
            assert abs(r["zero_shot_top1"] - fp32["zero_shot_top1"]) <= 0.05


def test_smaller_precisions_are_smaller_files(rows):
    for tower in ("image", "text"):
        sizes = {p: row(rows, p, tower)["size_bytes"] for p in PRECISIONS}
        assert sizes["fp16"] < sizes["fp32"]
        assert sizes["int8"] < 0.6 * sizes["fp32"]  # float patch conv, LayerNorm, positions stay
        assert sizes["int4"] < sizes["int8"]


def test_temperature_fit_and_ood_figures_are_consistent(rows):
    for precision in PRECISIONS:
        r = row(rows, precision, "image")
        assert r["ece_calibrated"] <= r["ece"] + 0.02  # fitting T must not make ECE worse
        assert 0 < r["temperature"] < 1
        # The threshold keeps 95% of calibration digits; on the test digits the flagged share
        # should be near 5%, and far higher on noise/textures.
        assert 0.0 <= r["flagged_rate_id"] <= 0.15
        assert r["flagged_rate_by_set"]["noise"]["mcm"] > 3 * r["flagged_rate_id"]
        assert r["ood_auroc"] > 0.6
        assert row(rows, precision, "text")["temperature"] is None


def test_sidecars_and_layout(repository, rows):
    for r in rows:
        name = endpoint_name("digits-s", r["precision"], r["tower"])
        assert r["endpoint"] == name and parse_endpoint_name(name)[0] == "digits-s"
        endpoint = repository / name
        assert (endpoint / "1" / "model.onnx").is_file() and (endpoint / "1" / "model.py").is_file()
        config = (endpoint / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and "dynamic_batching" in config
        sidecar = Sidecar.read(endpoint)
        assert (sidecar.precision, sidecar.tower, sidecar.embed_dim) == (r["precision"], r["tower"], 64)
        # int8 output ranges fitted at export, and what each output format costs
        assert len(sidecar.output_formats["int8"]["lo"]) == 64
        assert r["output_formats"]["float32"]["recall_at_k"] == 1.0
        assert r["output_formats"]["int8"]["bytes_per_vector"] == 64
        if r["tower"] == "image":
            assert sidecar.image_size == 32 and sidecar.temperature == r["temperature"]
            score = r["live_ood_score"]
            assert sidecar.ood_score == score and sidecar.labels == list(digits.CLASS_NAMES)
            assert sidecar.ood_threshold == r["ood_thresholds"][score]
            assert sidecar.evaluation["domain_measured"] is True
        else:
            assert sidecar.context_length == 16 and (endpoint / "tokenizer.json").is_file()
    int4 = Sidecar.read(repository / "digits-s_int4_image").quantization
    # --int4-method auto: the kept candidate and every candidate's figures are recorded
    assert int4["choice"]["chosen"] == int4["candidate"] in int4["choice"]["candidates"]
    assert int4["block_size"] in (16, 32, 64, 128)
    assert Sidecar.read(repository / "digits-s_int8_image").quantization["method"] in (
        "int8-dynamic", "int8-static-qdq")


def test_text_endpoint_tokenizer_gives_open_clip_ids(repository):
    import open_clip

    from clipserve.export import train

    train.register_builtin_configs()
    texts = ["a photo of the digit seven.", "The NUMBER 3, handwritten!"]
    ids, truncated = ClipTokenizer.from_file(
        repository / "digits-s_fp32_text" / "tokenizer.json", 16).encode(texts)
    assert np.array_equal(ids, open_clip.get_tokenizer("digits-s")(texts).numpy())
    assert truncated == [False, False]
