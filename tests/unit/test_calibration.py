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


# ---- Issue 9 review findings -------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 19, 20, 21, 100, 269, 1000, 1001])
def test_threshold_is_the_largest_value_keeping_at_least_the_share(n):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    threshold = cal.fit_ood_threshold(scores, 0.95)
    assert (scores >= threshold).mean() >= 0.95
    # Any larger threshold (the next score up) keeps fewer than 95%.
    above = scores[scores > threshold]
    if above.size:
        assert (scores >= above.min()).mean() < 0.95


def test_threshold_keeps_95_percent_of_269_where_interpolation_keeps_fewer():
    scores = np.random.default_rng(9).uniform(size=269)
    interpolated = np.quantile(scores, 0.05)
    assert (scores >= interpolated).sum() == 255  # 94.8%: the bug the order statistic fixes
    assert (scores >= cal.fit_ood_threshold(scores)).sum() == 256  # ceil(0.95 * 269)


def test_threshold_with_ties_keeps_the_tied_block():
    scores = np.array([0.1] * 10 + [0.5] * 90)  # 95 of 100 needed: all 0.5s plus some 0.1s
    assert cal.fit_ood_threshold(scores, 0.95) == 0.1
    assert cal.fit_ood_threshold(scores, 0.90) == 0.5


def test_fpr_uses_the_same_order_statistic():
    id_scores = np.arange(269, dtype=float)
    threshold = cal.fit_ood_threshold(id_scores)  # keeps 256: threshold 13
    assert threshold == 13.0
    ood = np.array([12.0, 13.0, 14.0, -1.0])
    assert cal.fpr_at_tpr(id_scores, ood) == 0.5


def test_threshold_rejects_empty_and_bad_tpr():
    with pytest.raises(ValueError, match="no in-distribution"):
        cal.fit_ood_threshold(np.array([]))
    with pytest.raises(ValueError, match="tpr"):
        cal.fit_ood_threshold(np.arange(5.0), 0.0)


def test_nll_is_exact_for_extreme_logits():
    # cos / T = 1000 vs 0: log softmax of the right label is -log(1 + e^-1000) ~ 0; of the
    # wrong one exactly -1000. Clipping probabilities at 1e-12 would give 27.6 instead.
    cos = np.array([[1.0, 0.0], [1.0, 0.0]])
    per_item = cal.nll_per_item(cos, np.array([0, 1]), 0.001)
    assert per_item[0] == pytest.approx(0.0, abs=1e-300)
    assert per_item[1] == pytest.approx(1000.0, rel=1e-12)
    assert cal.nll(cos, np.array([0, 1]), 0.001) == pytest.approx(500.0, rel=1e-12)


def test_nll_matches_the_probability_form_for_moderate_logits():
    rng = np.random.default_rng(3)
    cos = rng.uniform(-0.3, 0.4, size=(50, 7))
    labels = rng.integers(0, 7, 50)
    probs = cal.softmax(cos, 0.05)
    expected = -np.log(probs[np.arange(50), labels])
    np.testing.assert_allclose(cal.nll_per_item(cos, labels, 0.05), expected, rtol=1e-12)


def test_brier_bounds_and_a_hand_value():
    labels = np.array([0, 1])
    certain_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    certain_wrong = np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cal.brier_from_probs(certain_right, labels), [0.0, 0.0])
    np.testing.assert_allclose(cal.brier_from_probs(certain_wrong, labels), [2.0, 2.0])
    # (0.7 - 1)^2 + 0.2^2 + 0.1^2 = 0.14
    assert cal.brier_from_probs(np.array([[0.7, 0.2, 0.1]]), np.array([0]))[0] == \
        pytest.approx(0.14)
    cos = np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.1]])
    assert cal.brier(cos, np.array([0, 2]), 0.1) == pytest.approx(
        cal.brier_from_probs(cal.softmax(cos, 0.1), np.array([0, 2])).mean())


def test_correct_per_item_top1_and_top5():
    cos = np.array([[0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9]])
    labels = np.array([0, 2])
    assert cal.correct_per_item(cos, labels).tolist() == [True, False]
    assert cal.correct_per_item(cos, labels, k=5).tolist() == [True, True]
    assert cal.correct_per_item(cos, np.array([1, 0]), k=5).tolist() == [False, False]


def test_temperature_fit_flags_a_bound():
    rng = np.random.default_rng(4)
    cos = rng.uniform(-0.2, 0.4, size=(500, 10))
    labels = np.array([rng.choice(10, p=p) for p in cal.softmax(cos, 0.05)])
    t, at_bound = cal.fit_temperature_checked(cos, labels)
    assert not at_bound and t == pytest.approx(0.05, rel=0.25)
    # The optimum (about 0.05) lies below lo=0.5: the search ends on the bound and says so.
    t, at_bound = cal.fit_temperature_checked(cos, labels, lo=0.5, hi=10.0)
    assert at_bound and t == pytest.approx(0.5, rel=0.01)
    # Labels always the argmax: NLL falls as T -> 0, so the fit runs into lo.
    t, at_bound = cal.fit_temperature_checked(cos, cos.argmax(1))
    assert at_bound and t == pytest.approx(1e-3, rel=0.01)
    assert cal.fit_temperature(cos, labels, lo=0.5) == pytest.approx(0.5, rel=0.01)


def test_ece_vectorised_matches_the_per_bin_definition():
    rng = np.random.default_rng(5)
    conf = rng.uniform(size=997)
    correct = rng.uniform(size=997) < conf ** 2
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    expected = sum((bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
                   for b in range(15) if (bins == b).any())
    assert cal.score_ece(conf, correct) == pytest.approx(expected, abs=1e-12)


def test_auroc_perfect_reversed_all_tied_and_empty():
    assert cal.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert cal.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert cal.auroc(np.ones(5), np.ones(3)) == 0.5
    with pytest.raises(ValueError, match="both ID and OOD"):
        cal.auroc(np.ones(5), np.array([]))


def _cluster_and_far(seed=0, d=32, n_id=600, n_classes=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    labels = rng.integers(0, n_classes, n_id)
    id_fit = centres[labels] + 0.3 * rng.normal(size=(n_id, d))
    test_labels = rng.integers(0, n_classes, 200)
    id_test = centres[test_labels] + 0.3 * rng.normal(size=(200, d))
    far = rng.normal(size=(200, d))  # random directions, away from every class centre
    return id_fit, labels, id_test, far


def test_knn_separates_an_id_cluster_from_far_points(tmp_path):
    id_fit, _, id_test, far = _cluster_and_far()
    state = cal.fit_knn(id_fit, k=5)
    id_s, far_s = cal.score_knn(state, id_test), cal.score_knn(state, far)
    assert cal.auroc(id_s, far_s) > 0.99
    assert (id_s <= 0).all() and (id_s >= -2).all()
    path = tmp_path / "ood_state.npz"
    cal.save_ood_state(path, "knn", state)
    assert path.exists()  # exactly the given name, no ".npz.npz"
    kind, loaded = cal.load_ood_state(path)
    assert kind == "knn" and loaded.k == 5
    np.testing.assert_array_equal(loaded.bank, state.bank)
    np.testing.assert_array_equal(cal.score_ood("knn", loaded, embeddings=far), far_s)


def test_knn_bank_is_bounded_and_deterministic():
    x = np.random.default_rng(6).normal(size=(300, 8))
    a, b = cal.fit_knn(x, k=3, max_bank=100), cal.fit_knn(x, k=3, max_bank=100)
    assert a.bank.shape == (100, 8)
    np.testing.assert_array_equal(a.bank, b.bank)
    with pytest.raises(ValueError, match="at least k"):
        cal.fit_knn(x[:2], k=3)


def test_mahalanobis_separates_an_id_cluster_from_far_points(tmp_path):
    id_fit, labels, id_test, far = _cluster_and_far()
    state = cal.fit_mahalanobis(id_fit, labels)
    assert state.means.shape == (4, 32)
    id_s, far_s = cal.score_mahalanobis(state, id_test), cal.score_mahalanobis(state, far)
    assert cal.auroc(id_s, far_s) > 0.99
    path = tmp_path / "m.npz"
    cal.save_ood_state(path, "mahalanobis", state)
    kind, loaded = cal.load_ood_state(path)
    assert kind == "mahalanobis"
    np.testing.assert_array_equal(loaded.means, state.means)
    np.testing.assert_array_equal(loaded.precision, state.precision)
    np.testing.assert_array_equal(cal.score_ood("mahalanobis", loaded, embeddings=id_test), id_s)


def test_mahalanobis_with_fewer_items_than_dimensions_needs_shrinkage():
    rng = np.random.default_rng(7)
    x, labels = rng.normal(size=(20, 64)), rng.integers(0, 2, 20)
    state = cal.fit_mahalanobis(x, labels)  # Ledoit-Wolf makes it invertible
    assert np.isfinite(cal.score_mahalanobis(state, x)).all()
    with pytest.raises(ValueError, match="singular"):
        cal.fit_mahalanobis(x, labels, shrinkage=0.0)
    with pytest.raises(ValueError, match="shrinkage"):
        cal.fit_mahalanobis(x, labels, shrinkage=1.5)


def test_ledoit_wolf_intensity_matches_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(8)
    for n, d in [(50, 10), (30, 64), (500, 16)]:
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)
        x -= x.mean(0)
        assert cal.ledoit_wolf_shrinkage(x) == pytest.approx(
            ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-9)


def test_score_ood_dispatch_and_errors(tmp_path):
    cos = np.array([[0.3, 0.1]])
    np.testing.assert_array_equal(cal.score_ood("mcm", cosines=cos, temperature=0.1),
                                  cal.score_mcm(cos, 0.1))
    with pytest.raises(ValueError, match="known"):
        cal.score_ood("energy", cosines=cos, temperature=0.1)
    with pytest.raises(ValueError, match="needs"):
        cal.score_ood("knn", None, embeddings=np.ones((1, 2)))
    with pytest.raises(ValueError, match="no state file"):
        cal.save_ood_state(tmp_path / "x.npz", "mcm", None)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        cal.load_ood_state(bad)
    with pytest.raises(ValueError, match="cannot read"):
        cal.load_ood_state(tmp_path / "missing.npz")
    with open(tmp_path / "foreign.npz", "wb") as f:
        np.savez(f, a=np.ones(3))
    with pytest.raises(ValueError, match="not an OOD state"):
        cal.load_ood_state(tmp_path / "foreign.npz")


def test_fit_ood_state_then_score_ood_for_every_kind():
    id_fit, labels, id_test, far = _cluster_and_far(seed=1)
    classes = np.random.default_rng(1).normal(size=(4, 32))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    for kind in cal.OOD_SCORES:
        state = cal.fit_ood_state(kind, id_fit, labels)
        assert (state is None) == (kind == "mcm")
        scores = cal.score_ood(kind, state, embeddings=id_test,
                               cosines=id_test @ classes.T, temperature=0.05)
        assert scores.shape == (200,) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="labels"):
        cal.fit_ood_state("mahalanobis", id_fit)
    with pytest.raises(ValueError, match="known"):
        cal.fit_ood_state("energy", id_fit)


# ---- embedding comparison: the one cosine the gateway, the export and the benchmarks share.

def test_cosine_rows_is_scale_free_clipped_and_zero_for_a_zero_row():
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    b = np.array([[6.0, 8.0], [0.0, 2.0], [1.0, 0.0], [-2.0, -2.0]], dtype=np.float32)
    got = cal.cosine_rows(a, b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0, -1.0], atol=1e-15)
    assert (np.abs(got) <= 1.0).all()  # rounding never leaves [-1, 1]


def test_label_cosines_are_float64_image_by_label():
    images = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([[1, 0], [0, 1]], dtype=np.float32)
    got = cal.label_cosines(images, labels)
    assert got.shape == (3, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got[2], [0.6, 0.8], atol=1e-7)


def test_top1_agreements_counts_rows_with_the_same_argmax():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    q = np.array([[0.7, 0.3], [0.9, 0.1], [0.55, 0.45]])
    assert cal.top1_agreements(p, q) == 2
    assert cal.top1_agreements(p, p) == 3


def test_compare_to_reference_sees_a_flipped_top1_and_its_kl():
    labels = np.eye(2)
    served = np.array([[1.0, 0.0], [0.8, 0.6]])
    reference = np.array([[1.0, 0.0], [0.6, 0.8]])  # second image: the other label wins
    cosines, kl, agreements = cal.compare_to_reference(served, labels, 0.1, reference,
                                                       labels, 0.1)
    np.testing.assert_allclose(cosines, [1.0, 0.96], atol=1e-12)
    # Logits 8 vs 6 either way round: softmax (s, 1 - s) against (1 - s, s) with
    # s = 1 / (1 + e^-2), so KL = (2s - 1) * ln(s / (1 - s)) = 2 tanh(1).
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    assert kl[1] == pytest.approx(2 * np.tanh(1.0), rel=1e-12)
    assert agreements == 1


def test_average_prompts_renormalises_the_mean_per_label():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)  # 2 labels x 2
    out = cal.average_prompts(vectors, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[np.sqrt(0.5), np.sqrt(0.5)], [1, 0]], atol=1e-6)
