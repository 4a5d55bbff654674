import numpy as np
import pytest

from clipserve import calibration as cal


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 predictions at 0.7 confidence, 7 of them right: perfectly calibrated.
    conf = np.full(10, 0.7)
    correct = np.array([1] * 7 + [0] * 3)
    assert cal.score_ece(conf, correct) == pytest.approx(0.0)


def test_ece_weighs_bins_by_population():
    # Bin (0.9, 0.96]: 4 items at 0.95, all wrong -> gap 0.95; bin (0.4, 0.47]: 1 item at 0.45
    # right -> gap 0.55. ECE = 0.8 * 0.95 + 0.2 * 0.55.
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.45])
    correct = np.array([0, 0, 0, 0, 1])
    assert cal.score_ece(conf, correct) == pytest.approx(0.8 * 0.95 + 0.2 * 0.55)


def test_ece_bins_are_fifteen_equal_widths():
    # 0.1 and 0.12 share bin (1/15, 2/15]; 0.14 is in the next one, so the gaps do not cancel.
    same = cal.score_ece(np.array([0.1, 0.12]), np.array([1, 0]))
    split = cal.score_ece(np.array([0.1, 0.14]), np.array([1, 0]))
    assert same == pytest.approx(abs(0.5 - 0.11))
    assert split == pytest.approx(0.5 * 0.9 + 0.5 * 0.14)


def test_fit_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    true_t = 0.05
    cos = rng.uniform(-0.2, 0.4, size=(4000, 10))
    probs = cal.softmax(cos, true_t)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    assert cal.fit_temperature(cos, labels) == pytest.approx(true_t, rel=0.1)


def test_fitted_temperature_lowers_nll_against_a_wrong_one():
    rng = np.random.default_rng(1)
    cos = rng.uniform(-0.2, 0.4, size=(2000, 10))
    labels = np.array([rng.choice(10, p=p) for p in cal.softmax(cos, 0.1)])
    fitted = cal.fit_temperature(cos, labels)
    assert cal.nll(cos, labels, fitted) < cal.nll(cos, labels, 0.01)
    assert cal.nll(cos, labels, fitted) < cal.nll(cos, labels, 1.0)


def test_mcm_is_max_softmax():
    cos = np.array([[0.3, 0.1, 0.0]])
    expected = np.exp(0.3 / 0.1) / np.exp(np.array([0.3, 0.1, 0.0]) / 0.1).sum()
    assert cal.score_mcm(cos, 0.1)[0] == pytest.approx(expected)


def test_threshold_keeps_the_requested_share_of_id():
    scores = np.linspace(0, 1, 1001)
    threshold = cal.fit_ood_threshold(scores, 0.95)
    assert (scores >= threshold).mean() == pytest.approx(0.95, abs=0.002)


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    id_scores = np.round(rng.normal(1, 1, 300), 1)  # rounding makes ties
    ood_scores = np.round(rng.normal(0, 1, 200), 1)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[id_scores, ood_scores])
    assert cal.auroc(id_scores, ood_scores) == pytest.approx(expected)


def test_fpr_at_tpr():
    id_scores = np.arange(100) / 100 + 0.5  # threshold at the 5th percentile ~ 0.5495
    ood_scores = np.array([0.1, 0.2, 0.6, 0.9])
    assert cal.fpr_at_tpr(id_scores, ood_scores) == pytest.approx(0.5)
