"""The sigmoid scoring rule (SigLIP) against offline computations: per-label probabilities,
NLL, the Platt-style fit of scale and bias, the max-probability OOD score, the sidecar's rule,
and Classify's probabilities in the servicer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from clipserve import calibration as cal
from clipserve.endpoints import Precision, Sidecar, Tower

RNG = np.random.default_rng(0)


def offline_sigmoid(cosines, scale, bias):
    return np.array([[1.0 / (1.0 + math.exp(-(scale * c + bias))) for c in row]
                     for row in cosines])


def test_sigmoid_probabilities_are_independent_per_label():
    cos = RNG.uniform(-1, 1, (7, 5))
    probs = cal.Scoring.sigmoid(12.0, -4.0).probabilities(cos)
    np.testing.assert_allclose(probs, offline_sigmoid(cos, 12.0, -4.0), rtol=1e-12)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # they need not sum to 1
    # Adding a label never changes the others' probabilities (softmax would).
    wider = np.concatenate([cos, RNG.uniform(-1, 1, (7, 1))], axis=1)
    np.testing.assert_allclose(cal.Scoring.sigmoid(12.0, -4.0).probabilities(wider)[:, :5], probs)


def test_sigmoid_is_stable_at_extreme_logits():
    p = cal.sigmoid_probs(np.array([[1.0, -1.0]]), 1000.0, 0.0)
    assert p[0, 0] == 1.0 and 0.0 <= p[0, 1] < 1e-300
    nll = cal.sigmoid_nll_per_item(np.array([[-1.0, 1.0]]), np.array([0]), 1000.0, 0.0)
    assert nll[0] == pytest.approx(2000.0)  # exact from log-sigmoid, not log(0)


def test_sigmoid_nll_matches_binary_cross_entropy():
    cos = RNG.uniform(-1, 1, (6, 4))
    labels = RNG.integers(0, 4, 6)
    got = cal.sigmoid_nll_per_item(cos, labels, 8.0, -2.0)
    p = offline_sigmoid(cos, 8.0, -2.0)
    want = [-sum(math.log(p[i, k]) if k == labels[i] else math.log(1 - p[i, k])
                 for k in range(4)) for i in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_fit_sigmoid_finds_the_joint_optimum():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    n, k = 300, 6
    labels = RNG.integers(0, k, n)
    cos = RNG.normal(0.05, 0.08, (n, k))
    cos[np.arange(n), labels] += RNG.normal(0.12, 0.06, n)  # true label closer, overlapping
    scale, bias, at_bound = cal.fit_sigmoid_checked(cos, labels)
    result = scipy_optimize.minimize(
        lambda ab: cal.sigmoid_nll_per_item(cos, labels, ab[0], ab[1]).mean(),
        x0=[10.0, -5.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12,
                                                          "maxiter": 5000})
    assert not at_bound
    assert scale == pytest.approx(result.x[0], rel=1e-3)
    assert bias == pytest.approx(result.x[1], rel=1e-3, abs=1e-3)
    # The fitted rule's NLL is no worse than the optimiser's.
    assert (cal.sigmoid_nll_per_item(cos, labels, scale, bias).mean()
            <= result.fun + 1e-9)


def test_fit_sigmoid_says_when_it_stops_at_a_bound():
    labels = np.arange(20) % 4
    cos = np.full((20, 4), -0.5)
    cos[np.arange(20), labels] = 0.5  # perfectly separable: the best scale is infinite
    scale, _, at_bound = cal.fit_sigmoid_checked(cos, labels)
    assert at_bound and scale == pytest.approx(cal.SIGMOID_SCALE_BOUNDS[1], rel=0.01)


def test_fit_scoring_dispatches_by_rule():
    labels = RNG.integers(0, 5, 200)
    cos = RNG.normal(0, 0.1, (200, 5))
    cos[np.arange(200), labels] += 0.1
    soft, _ = cal.fit_scoring_checked("softmax", cos, labels)
    assert soft.rule == "softmax" and soft.temperature == pytest.approx(
        cal.fit_temperature(cos, labels))
    sig, _ = cal.fit_scoring_checked("sigmoid", cos, labels)
    scale, bias, _ = cal.fit_sigmoid_checked(cos, labels)
    assert (sig.rule, sig.scale, sig.bias) == ("sigmoid", pytest.approx(scale), bias)
    with pytest.raises(ValueError, match="unknown scoring rule 'tanh'"):
        cal.fit_scoring_checked("tanh", cos, labels)


def test_ood_and_ece_follow_the_rule():
    cos = RNG.uniform(-0.2, 0.6, (50, 10))
    labels = RNG.integers(0, 10, 50)
    rule = cal.Scoring.sigmoid(15.0, -6.0)
    probs = offline_sigmoid(cos, 15.0, -6.0)
    np.testing.assert_allclose(cal.score_ood("mcm", cosines=cos, scoring=rule), probs.max(1))
    np.testing.assert_allclose(cal.score_ood("mcm", cosines=cos, temperature=0.1),
                               cal.score_mcm(cos, 0.1))
    # ECE on the top label's probability: 15 bins of |accuracy - confidence|.
    conf, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    want = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / 50
    assert cal.score_ece(rule.max_probability(cos), correct) == pytest.approx(want)


def test_compare_to_reference_uses_each_rule():
    emb = cal._normalise(RNG.normal(size=(4, 8)))
    labels = cal._normalise(RNG.normal(size=(3, 8)))
    rule = cal.Scoring.sigmoid(10.0, -3.0)
    cos, kl, agree = cal.compare_to_reference(emb, labels, rule, emb, labels, rule)
    np.testing.assert_allclose(cos, 1.0)
    np.testing.assert_allclose(kl, 0.0, atol=1e-12)
    assert agree == 4
    other = cal.Scoring.sigmoid(10.0, -1.0)
    _, kl, _ = cal.compare_to_reference(emb, labels, other, emb, labels, rule)
    p, q = offline_sigmoid(emb @ labels.T, 10.0, -3.0), offline_sigmoid(emb @ labels.T, 10.0, -1.0)
    want = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(1)
    np.testing.assert_allclose(kl, want, rtol=1e-9)


def test_sidecar_records_the_rule_and_older_readers_refuse_sigmoid(tmp_path):
    common = dict(scale="s", precision="fp32", tower="image", embed_dim=4, source="x::y",
                  image_size=8, ood_threshold=0.5)
    Sidecar(**common, temperature=0.05).write(tmp_path)
    data = json.loads((tmp_path / "clipserve.json").read_text())
    assert data["version"] == 2 and data["scoring"] == "softmax"  # version-2 readers still read it
    assert Sidecar.read(tmp_path).scoring_rule() == cal.Scoring("softmax", 0.05)

    Sidecar(**common, temperature=0.1, scoring="sigmoid", logit_scale=10.0,
            logit_bias=-7.5).write(tmp_path)
    assert json.loads((tmp_path / "clipserve.json").read_text())["version"] == 3
    rule = Sidecar.read(tmp_path).scoring_rule()
    assert (rule.rule, rule.scale, rule.bias) == ("sigmoid", 10.0, -7.5)

    data["scoring"] = "tanh"
    (tmp_path / "clipserve.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="scoring rule 'tanh'"):
        Sidecar.read(tmp_path)
    assert Sidecar(**common).scoring_rule() is None  # nothing fitted


# -- the servicer's Classify under the sigmoid rule -------------------------------------------

SCALE_BIAS = (9.0, -2.5)


async def test_classify_returns_sigmoid_probabilities(tmp_path):
    from tests.unit import test_server_service as svc
    from clipserve.server.v1 import clipserve_pb2 as pb

    root = svc.write_repository(tmp_path / "repo")
    scale, bias = SCALE_BIAS
    for precision in svc.PRECISIONS:
        d = root / svc.name(precision, Tower.IMAGE)
        car = Sidecar.read(d)
        car.scoring, car.logit_scale, car.logit_bias = "sigmoid", scale, bias
        car.temperature = 1.0 / scale
        car.write(d)
    h = svc.Harness(root)
    try:
        labels = ["red", "green", "blue"]
        response = await h.service.Classify(pb.ClassifyRequest(
            images=[svc.png((250, 0, 0)), svc.png((0, 0, 250))], labels=labels,
            prompt_templates=["a {} image", "{}"]), svc.FakeContext())
        tok = svc.FakeTokenizer()
        label_vecs = []
        for label in labels:
            ids, _ = tok.encode([f"a {label} image", label])
            label_vecs.append(svc.unit(np.mean([svc.text_vector(r) for r in ids], axis=0)))
        for color, result in zip([(250, 0, 0), (0, 0, 250)], response.results):
            img = svc.image_vector(np.broadcast_to(np.array(color, np.uint8),
                                                   (svc.SIZE, svc.SIZE, 3)))
            expected = offline_sigmoid((np.array(label_vecs) @ img)[None], scale, bias)[0]
            np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
            assert result.confidence == pytest.approx(expected.max(), abs=1e-6)
            assert result.ood_score == pytest.approx(expected.max(), abs=1e-6)  # max sigmoid
            assert result.out_of_distribution == (expected.max() < svc.THRESHOLD)
    finally:
        h.decoder.close()


async def test_live_ood_counters_use_the_max_sigmoid_probability(tmp_path):
    """EmbedImages' live scoring against the deployment labels follows the sigmoid rule:
    the OOD score sum and the flagged count equal the offline max sigmoid probabilities."""
    import asyncio

    from tests.unit import test_live_quality as lq
    from tests.unit import test_server_service as svc
    from clipserve.server.routing import HEADER_PRECISION
    from clipserve.server.v1 import clipserve_pb2 as pb

    root = svc.write_repository(tmp_path / "repo")
    scale, bias = 12.0, -6.0
    expected = cal.sigmoid_probs(lq.fake_image_embeddings(lq.COLORS).astype(np.float64)
                                 @ lq.fake_label_embeddings().astype(np.float64).T,
                                 scale, bias).max(axis=1)
    threshold = float(np.median(expected))  # both sides of it
    for precision in svc.PRECISIONS:
        d = root / svc.name(precision, Tower.IMAGE)
        car = Sidecar.read(d)
        car.scoring, car.logit_scale, car.logit_bias = "sigmoid", scale, bias
        car.temperature, car.ood_threshold = 1.0 / scale, threshold
        car.write(d)
    h = svc.Harness(root)
    background = asyncio.create_task(h.service.run_background())
    try:
        for _ in range(200):
            if len(h.service.live.labels) == 2:
                break
            await asyncio.sleep(0.01)
        for part in (lq.COLORS[:5], lq.COLORS[5:]):  # at most 5 images a call
            await h.service.EmbedImages(pb.EmbedImagesRequest(images=[svc.png(c) for c in part]),
                                        svc.FakeContext([(HEADER_PRECISION, "fp32")]))
        labels = {"scale": svc.SCALE, "precision": "fp32", "label_set": "deployment"}
        get = h.registry.get_sample_value
        assert get("clipserve_ood_score_sum", labels) == pytest.approx(expected.sum(), rel=1e-5)
        assert get("clipserve_ood_flagged_total", labels) == int((expected < threshold).sum())
    finally:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        h.decoder.close()
