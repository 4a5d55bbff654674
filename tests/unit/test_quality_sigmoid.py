"""The zero-shot evaluation under the sigmoid rule (a SigLIP model) on the synthetic suite of
test_quality.py: everything fitted and reported follows the rule, the sidecar fields record
it, and the report compares softmax- and sigmoid-scored models under quantization."""

import numpy as np
import pytest

from clipserve import calibration as cal
from clipserve import stats
from clipserve.endpoints import Precision, Tower
from clipserve.export import quality, report
from tests.unit.test_quality import FakeSession, SIZE, make_suite, prompt_ids

NATIVE = cal.Scoring.sigmoid(10.0, -5.0)


def evaluate(suite, native):
    sessions = {(p, t): FakeSession(t, noise=0.0 if p is Precision.FP32 else 0.05)
                for p in (Precision.FP32, Precision.INT8) for t in Tower}
    probe = prompt_ids(suite)
    return quality.evaluate_model(
        scale="tiny", sessions=sessions, suite=suite, prompt_ids=probe, caption_ids=None,
        probe_ids=probe, image_size=SIZE, native_temperature=native,
        budget=stats.parse_budget(""), n_resamples=1000, say=lambda m: None)


@pytest.fixture(scope="module")
def suite():
    return make_suite()


@pytest.fixture(scope="module")
def sigmoid_result(suite):
    return evaluate(suite, NATIVE)


def test_fit_and_scores_follow_the_sigmoid_rule(suite, sigmoid_result):
    fitted = sigmoid_result.fitted[Precision.FP32]
    assert fitted.scoring.rule == "sigmoid" and fitted.temperature == fitted.scoring.temperature
    row = next(r for r in sigmoid_result.rows if (r["precision"], r["tower"]) == ("fp32", "image"))
    assert row["scoring"] == "sigmoid" and row["logit_bias"] == fitted.scoring.bias
    assert np.all(fitted.confidence <= 1.0) and np.all(fitted.confidence > 0.0)
    # MCM under sigmoid is the max sigmoid probability: its ranking is the max cosine's, so
    # the shared-T variant (FP32's fit) ranks the same and has the same AUROC.
    assert row["ood_auroc"] == pytest.approx(row["ood_auroc_mcm_shared_t"])


def test_sidecar_fields_record_rule_scale_and_bias(suite, sigmoid_result):
    fields = quality.image_sidecar_fields(suite, sigmoid_result.fitted, Precision.INT8, "mcm",
                                          NATIVE, "test")
    fitted = sigmoid_result.fitted[Precision.INT8].scoring
    assert fields["scoring"] == "sigmoid"
    assert fields["logit_scale"] == pytest.approx(fitted.scale)
    assert fields["logit_bias"] == fitted.bias
    assert fields["temperature"] == pytest.approx(1.0 / fields["logit_scale"])
    assert fields["evaluation"]["native_logit_scale"] == pytest.approx(10.0)
    assert fields["evaluation"]["native_logit_bias"] == -5.0
    assert quality.native_scoring(fields["evaluation"], "sigmoid") == NATIVE


def test_report_compares_softmax_and_sigmoid_under_quantization(suite, sigmoid_result):
    sizes = {"params_image": 1000, "params_text": 1000}
    def named(rows, model):
        return [dict(r, model=model, endpoint=f"{model}_{r['precision']}_{r['tower']}", **sizes)
                for r in rows]

    softmax_rows = named(evaluate(suite, 0.05).rows, "clip-like")
    sigmoid_rows = named(sigmoid_result.rows, "siglip-like")
    assert report.scoring_table(softmax_rows) == []  # one rule: no comparison
    table = report.scoring_table(softmax_rows + sigmoid_rows)
    body = [line for line in table if line.startswith("| clip") or line.startswith("| siglip")]
    assert [line.split(" | ")[1:3] for line in body] == [["softmax", "int8"], ["sigmoid", "int8"]]
    int8 = next(r for r in sigmoid_rows if (r["precision"], r["tower"]) == ("int8", "image"))
    assert report.fmt_delta("ece", int8["deltas"]["ece"]) in body[1]
    assert "Softmax vs sigmoid" in report.markdown(softmax_rows + sigmoid_rows, [])
