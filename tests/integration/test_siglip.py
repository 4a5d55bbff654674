"""The built-in sigmoid model end to end: ``digits-siglip-s`` (trained here with open_clip's
SigLipLoss and a WordPiece tokenizer clipserve builds) through export at every precision, the
quality report, a real tritonserver and the real gateway. Classify's probabilities must equal
sigmoid(logit_scale * cos + logit_bias) computed offline on the same model files (run as
Triton runs them: tests/integration/reference.py), and the gateway's text ids those of the
export's tokenizer."""

from __future__ import annotations


import numpy as np
import pytest

from clipserve import calibration as cal
from clipserve.endpoints import Tower
from clipserve.export.report import read_rows
from clipserve.server.images import preprocess
from clipserve.server.repository import Catalog
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.tokenizer import HfTokenizer, load_tokenizer
from tests.integration.conftest import PRECISIONS, cached_export
from tests.integration.reference import served_runner
from tests.integration.test_gateway import (CALL_TIMEOUT_S, GatewayThread, config_for, png,
                                            vectors)

pytestmark = pytest.mark.integration
SCALE = "digits-siglip-s"


@pytest.fixture(scope="module")
def siglip_repository(cache_dir):
    return cached_export(cache_dir, "test-siglip", models=SCALE, precisions=PRECISIONS)


@pytest.fixture(scope="module")
def catalog(siglip_repository):
    return Catalog.from_repository(siglip_repository)


@pytest.fixture(scope="module")
def gw(siglip_repository, tmp_path_factory):
    from clipserve.server.triton_process import TritonProcess

    process = TritonProcess(siglip_repository,
                            log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    process.start(timeout_s=300)
    gateway = GatewayThread(config_for(siglip_repository, process.grpc_url))
    yield gateway
    gateway.close()
    process.stop()


def test_report_scores_it_with_the_sigmoid_rule(siglip_repository):
    rows = read_rows(siglip_repository / "report.json")
    assert sorted((r["precision"], r["tower"]) for r in rows) == sorted(
        (p, t.value) for p in PRECISIONS for t in Tower)
    fp32 = next(r for r in rows if (r["precision"], r["tower"]) == ("fp32", "image"))
    assert all(r["scoring"] == "sigmoid" for r in rows)
    assert fp32["zero_shot_top1"] >= 0.8  # chance is 0.10
    for r in rows:
        if r["precision"] != "fp32":
            for metric in ("ece", "ood_auroc", "fpr95"):
                d = r["deltas"][metric]
                assert d["lo"] <= d["delta"] <= d["hi"]


def test_sidecars_carry_the_rule_and_the_tokenizer(catalog):
    for precision in catalog.precisions():
        image = catalog.get(SCALE, precision, Tower.IMAGE).sidecar
        assert image.scoring == "sigmoid" and image.version == 3
        assert image.logit_scale == pytest.approx(1.0 / image.temperature)
        assert image.logit_bias < 0  # far more negative pairs than positive ones
        assert image.evaluation["native_logit_bias"] < 0
        text = catalog.get(SCALE, precision, Tower.TEXT)
        assert text.sidecar.tokenizer["kind"] == "hf"
        assert text.sidecar.tokenizer["clean"] == "canonicalize"


def _offline_label_vectors(text_spec, labels, templates):
    tokenizer = load_tokenizer(text_spec.tokenizer_path, text_spec.sidecar.context_length,
                               text_spec.sidecar.tokenizer)
    assert isinstance(tokenizer, HfTokenizer)
    ids, _ = tokenizer.encode([t.format(label) for label in labels for t in templates])
    _, run = served_runner(text_spec)
    return cal.average_prompts(run("input_ids", ids), len(labels))


def test_classify_probabilities_equal_an_offline_sigmoid_at_every_precision(gw, catalog):
    labels = ["zero", "one", "two", "three", "seven"]
    templates = ["a photo of the digit {}.", "the number {}."]
    images = [png(i, size=(32, 32)) for i in range(3)]
    for precision in catalog.precisions():
        image_spec = catalog.get(SCALE, precision, Tower.IMAGE)
        text_spec = catalog.get(SCALE, precision, Tower.TEXT)
        car = image_spec.sidecar
        pixels = np.stack([preprocess(d, car.image_size, max_bytes=1 << 24, max_pixels=1 << 26)
                           for d in images])
        _, run_image = served_runner(image_spec)
        cosines = cal.label_cosines(run_image("pixels", pixels),
                                    _offline_label_vectors(text_spec, labels, templates))
        expected = 1.0 / (1.0 + np.exp(-(car.logit_scale * cosines + car.logit_bias)))
        response = gw.classify.Classify(
            pb.ClassifyRequest(images=images, labels=labels, prompt_templates=templates),
            metadata=(("x-clip-scale", SCALE), ("x-clip-precision", precision.value)),
            timeout=CALL_TIMEOUT_S)
        assert response.endpoint.name == image_spec.name
        got = np.array([list(r.probabilities) for r in response.results])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=image_spec.name)
        for result, row in zip(response.results, expected):
            if car.ood_score == "mcm":  # the label-space score is the max sigmoid probability
                assert result.ood_score == pytest.approx(row.max(), abs=1e-5)
            assert result.out_of_distribution == (result.ood_score < car.ood_threshold)
        # Noise images match no digit: every label's own probability is low (they are not
        # shares of 1; a softmax would still have to hand out 1 between them).
        assert got.max() < 0.5 and got.sum(axis=1).min() < 1.0


def test_embed_texts_equal_the_offline_tower_on_the_exports_ids(gw, catalog):
    texts = ["A photo of the digit SEVEN.", "zero", "a blurry picture of a nine " * 6]
    for precision in catalog.precisions():
        spec = catalog.get(SCALE, precision, Tower.TEXT)
        tokenizer = load_tokenizer(spec.tokenizer_path, spec.sidecar.context_length,
                                   spec.sidecar.tokenizer)
        ids, truncated = tokenizer.encode(texts)
        _, run = served_runner(spec)
        response = gw.embed.EmbedTexts(
            pb.EmbedTextsRequest(texts=texts),
            metadata=(("x-clip-scale", SCALE), ("x-clip-precision", precision.value)),
            timeout=CALL_TIMEOUT_S)
        assert [e.truncated for e in response.embeddings] == truncated == [False, False, True]
        np.testing.assert_allclose(vectors(response), run("input_ids", ids), atol=1e-5)
