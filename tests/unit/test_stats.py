"""Paired bootstrap, McNemar, flip rate and the budget verdict: behaviour on synthetic data
with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipserve import calibration as cal
from clipserve import stats
from clipserve.stats import Delta, Verdict


def paired_correctness(rng, n, p11, p10, p01):
    """Paired correct/incorrect for FP32 (ref) and a candidate, from the joint table:
    both right p11, only ref right p10, only candidate right p01. True delta = p01 - p10."""
    u = rng.uniform(size=n)
    ref = u < p11 + p10
    cand = (u < p11) | ((u >= p11 + p10) & (u < p11 + p10 + p01))
    return ref.astype(float), cand.astype(float)


def test_interval_covers_a_known_delta_about_95_percent_of_the_time():
    # Realistic paired precisions: 91% vs 87% top-1, 8% of items discordant; true delta -0.04.
    p11, p10, p01 = 0.85, 0.06, 0.02
    true_delta, n, sims = p01 - p10, 400, 300
    rng = np.random.default_rng(123)
    covered = 0
    for s in range(sims):
        ref, cand = paired_correctness(rng, n, p11, p10, p01)
        d = stats.mean_delta(ref, cand, n_resamples=1000, seed=s)
        covered += d.lo <= true_delta <= d.hi
    coverage = covered / sims
    # 300 simulations: the coverage estimate's binomial sd at 0.95 is sqrt(.95 * .05 / 300)
    # = 1.26 points, so [0.91, 0.985] is about -3 / +2.8 sd (the percentile interval
    # under-covers by roughly sqrt((n - 1) / n), negligible at n = 400; this seeded run gives
    # 0.943, and 0.917 at n = 100). An unpaired interval is 1.6x too wide here and covered
    # 99.3% in the same simulation, so the upper bound also catches a lost pairing (the next
    # test checks that more sharply).
    assert 0.91 <= coverage <= 0.985, coverage


def test_pairing_makes_the_interval_narrow_for_correlated_sides():
    rng = np.random.default_rng(1)
    n = 1000
    ref = (rng.uniform(size=n) < 0.8).astype(float)
    cand = ref.copy()
    flips = rng.choice(n, 20, replace=False)  # 2% of items flip, half each way
    cand[flips[:10]] = 1 - cand[flips[:10]]
    cand[flips[10:]] = 1 - cand[flips[10:]]
    paired = stats.mean_delta(ref, cand, seed=0)
    # Unpaired baseline: resample the two sides independently.
    idx_r = rng.integers(0, n, (2000, n))
    idx_c = rng.integers(0, n, (2000, n))
    unpaired = cand[idx_c].mean(1) - ref[idx_r].mean(1)
    lo_u, hi_u = np.quantile(unpaired, [0.025, 0.975])
    assert (paired.hi - paired.lo) < 0.4 * (hi_u - lo_u)
    assert paired.lo <= paired.delta <= paired.hi


def test_identical_sides_give_a_zero_width_interval():
    ref = np.random.default_rng(2).uniform(size=300)
    d = stats.mean_delta(ref, ref.copy(), metric="nll", higher_is_better=False)
    assert (d.delta, d.lo, d.hi, d.n) == (0.0, 0.0, 0.0, 300)
    assert d.to_dict()["metric"] == "nll" and d.to_dict()["higher_is_better"] is False


def test_vectorized_and_loop_paths_agree_and_are_deterministic():
    rng = np.random.default_rng(3)
    ref, cand = rng.normal(size=250), rng.normal(size=250)
    loop = stats.paired_bootstrap(np.mean, (ref,), (cand,), n_resamples=500, seed=7)
    vec = stats.paired_bootstrap(lambda x: x.mean(axis=-1), (ref,), (cand,), n_resamples=500,
                                 seed=7, vectorized=True)
    assert loop.lo == pytest.approx(vec.lo, rel=1e-12)
    assert loop.hi == pytest.approx(vec.hi, rel=1e-12)
    again = stats.paired_bootstrap(np.mean, (ref,), (cand,), n_resamples=500, seed=7)
    assert again == loop
    other = stats.paired_bootstrap(np.mean, (ref,), (cand,), n_resamples=500, seed=8)
    assert other.lo != loop.lo


def test_strata_keep_the_id_and_ood_counts_in_every_resample():
    rng = np.random.default_rng(4)
    is_ood = np.r_[np.zeros(70, bool), np.ones(30, bool)]
    rng.shuffle(is_ood)
    scores = rng.normal(size=100) - is_ood
    seen = []

    def statistic(s, ood):
        seen.append(int(ood.sum()))
        return cal.auroc(s[~ood], s[ood])

    stats.paired_bootstrap(statistic, (scores, is_ood), (scores + 0.1, is_ood),
                           strata=is_ood.astype(int), n_resamples=200)
    assert set(seen) == {30}
    seen.clear()
    stats.paired_bootstrap(statistic, (scores, is_ood), (scores + 0.1, is_ood), n_resamples=200)
    assert len(set(seen)) > 5  # without strata the mix wanders


def test_ood_delta_sees_a_worse_score_and_a_better_one():
    rng = np.random.default_rng(5)
    is_ood = np.r_[np.zeros(600, bool), np.ones(400, bool)]
    base = rng.normal(size=1000) + 2.0 * ~is_ood
    worse = base + rng.normal(scale=1.5, size=1000)  # candidate's scores, noisier
    d = stats.ood_delta(base, worse, is_ood)
    assert d.metric == "ood_auroc" and d.higher_is_better
    assert d.hi < 0 and d.lo < d.delta < d.hi
    f = stats.ood_delta(base, worse, is_ood, metric="fpr95", n_resamples=300)
    assert not f.higher_is_better and f.lo > 0


def test_bootstrap_rejects_bad_input():
    a = np.ones(10)
    with pytest.raises(ValueError, match="one length"):
        stats.paired_bootstrap(np.mean, (a,), (np.ones(9),))
    with pytest.raises(ValueError, match="strata"):
        stats.paired_bootstrap(np.mean, (a,), (a,), strata=np.zeros(3))
    is_ood = np.r_[np.zeros(9, bool), True]  # one OOD item: many resamples have none
    with pytest.raises(ValueError, match="strata"):
        stats.paired_bootstrap(lambda s, o: cal.auroc(s[~o], s[o]) if o.any() else math.nan,
                               (a, is_ood), (a, is_ood), n_resamples=200)


def test_large_bootstraps_are_chunked_and_use_every_resample():
    # n=2000 x 2000 resamples is generated in index chunks (bounded memory); every resample
    # must still reach the statistic, once per side, beyond the two full-sample calls.
    rng = np.random.default_rng(6)
    batches = []

    def mean(x):
        batches.append(x.shape[0])
        return x.mean(axis=-1)

    d = stats.paired_bootstrap(mean, (rng.uniform(size=2000),), (rng.uniform(size=2000),),
                               n_resamples=2000, vectorized=True)
    assert len(batches) > 4 and sum(batches) == 2 * 2000 + 2
    assert d.n_resamples == 2000 and d.lo < d.delta < d.hi


def test_mcnemar_exact_on_a_known_table():
    # b = 10 (ref right, cand wrong), c = 2: p = 2 * P(X <= 2 | Bin(12, 1/2)) = 2 * 79 / 4096.
    ref = np.r_[np.ones(10), np.zeros(2), np.ones(50), np.zeros(5)].astype(bool)
    cand = np.r_[np.zeros(10), np.ones(2), np.ones(50), np.zeros(5)].astype(bool)
    out = stats.mcnemar_exact(ref, cand)
    assert (out["b"], out["c"]) == (10, 2)
    assert out["p_value"] == pytest.approx(158 / 4096, rel=1e-12)
    assert stats.mcnemar_exact(ref, ref)["p_value"] == 1.0
    assert stats.mcnemar_exact(cand, ref)["p_value"] == pytest.approx(158 / 4096, rel=1e-12)


def test_flip_rate():
    assert stats.flip_rate(np.array([0, 1, 2, 3]), np.array([0, 1, 3, 2])) == 0.5
    assert stats.flip_rate(np.array([1, 1]), np.array([1, 1])) == 0.0
    with pytest.raises(ValueError):
        stats.flip_rate(np.array([1]), np.array([1, 2]))


def _delta(lo, hi, delta=None, higher=True, n=300):
    delta = (lo + hi) / 2 if delta is None else delta
    return Delta(metric="m", reference=0.9, value=0.9 + delta, delta=delta, lo=lo, hi=hi, n=n,
                 higher_is_better=higher)


def test_verdict_safe_unsafe_inconclusive_in_points():
    assert stats.verdict(_delta(-0.004, 0.002), 1.0, points=True).verdict is Verdict.SAFE
    unsafe = stats.verdict(_delta(-0.05, -0.03), 1.0, points=True)
    assert unsafe.verdict is Verdict.UNSAFE and unsafe.items_needed is None
    assert (unsafe.worst, unsafe.best, unsafe.boundary) == (-0.05, -0.03, -0.01)
    # Same interval judged with an absolute budget of 1.0: everything is within it.
    assert stats.verdict(_delta(-0.05, -0.03), 1.0).verdict is Verdict.SAFE


def test_verdict_inconclusive_asks_for_more_items():
    # delta -0.005, interval +-0.02, budget line -0.01: gap 0.005 -> n * (0.02 / 0.005)^2.
    r = stats.verdict(_delta(-0.025, 0.015, -0.005, n=300), 1.0, points=True)
    assert r.verdict is Verdict.INCONCLUSIVE
    assert r.items_needed == 300 * 16
    # Delta on the unsafe side but the best end still over the line: needs more items too.
    r = stats.verdict(_delta(-0.03, 0.0, -0.015, n=300), 1.0, points=True)
    assert r.verdict is Verdict.INCONCLUSIVE and r.items_needed == math.ceil(300 * 9)
    # Exactly on the line: no sample size settles it.
    r = stats.verdict(_delta(-0.02, 0.0, -0.01), 1.0, points=True)
    assert r.verdict is Verdict.INCONCLUSIVE and r.items_needed is None


def test_verdict_for_lower_is_better_metrics():
    # ECE rises by 0.005 +- 0.005 against a 0.02 budget: safe; by 0.05 +- 0.01: unsafe.
    assert stats.verdict(_delta(0.0, 0.01, higher=False), 0.02).verdict is Verdict.SAFE
    r = stats.verdict(_delta(0.04, 0.06, higher=False), 0.02)
    assert r.verdict is Verdict.UNSAFE and (r.worst, r.best) == (0.06, 0.04)
    # An ECE that FALLS a lot is never harm.
    assert stats.verdict(_delta(-0.2, -0.1, higher=False), 0.0).verdict is Verdict.SAFE
    r = stats.verdict(_delta(0.0, 0.04, higher=False, n=100), 0.02)
    assert r.verdict is Verdict.INCONCLUSIVE and r.items_needed is None  # centred on the line
    r = stats.verdict(_delta(-0.01, 0.03, higher=False, n=100), 0.02)  # delta 0.01, gap 0.01
    assert r.verdict is Verdict.INCONCLUSIVE and r.items_needed == 400


def test_verdict_from_real_bootstraps_decides_with_more_items():
    # The same true 0.3-point loss on 300 items is inconclusive against a 1-point budget and
    # safe on 20000 items, and the estimate said more items were needed.
    p11, p10, p01 = 0.88, 0.008, 0.005
    small = stats.mean_delta(*paired_correctness(np.random.default_rng(7), 300, p11, p10, p01))
    r = stats.verdict(small, 1.0, points=True)
    assert r.verdict is Verdict.INCONCLUSIVE and r.items_needed > 300
    big = stats.mean_delta(*paired_correctness(np.random.default_rng(8), 20000, p11, p10, p01))
    assert stats.verdict(big, 1.0, points=True).verdict is Verdict.SAFE


def test_verdict_for_uses_the_budget_units_and_checks_direction():
    d = _delta(-0.004, 0.002)
    assert stats.verdict_for(d, "top1").verdict is Verdict.SAFE  # 1 point
    assert stats.verdict_for(d, "top1", {"top1": 0.1}).verdict is Verdict.INCONCLUSIVE
    with pytest.raises(ValueError, match="lower-is-better"):
        stats.verdict_for(d, "ece")
    with pytest.raises(ValueError, match="valid keys"):
        stats.verdict_for(d, "accuracy")


def test_verdict_of_many():
    s, u, i = Verdict.SAFE, Verdict.UNSAFE, Verdict.INCONCLUSIVE
    assert stats.verdict_of_many([s, s]) is s
    assert stats.verdict_of_many([s, i, u]) is u
    assert stats.verdict_of_many([s, i]) is i
    assert stats.verdict_of_many([stats.verdict(_delta(-0.004, 0.002), 1.0, points=True)]) is s
    with pytest.raises(ValueError, match="nothing"):
        stats.verdict_of_many([])
    assert Verdict("safe") is s and stats.verdict(_delta(0, 0), 1.0).to_dict()["verdict"] == "safe"


def test_parse_budget():
    b = stats.parse_budget("top1=0.5, ece=0.03")
    assert b["top1"] == 0.5 and b["ece"] == 0.03 and b["nll"] == stats.DEFAULT_BUDGET["nll"]
    assert stats.parse_budget("") == dict(stats.DEFAULT_BUDGET)
    assert stats.parse_budget("fpr95=0.1", defaults={}) == {"fpr95": 0.1}
    with pytest.raises(ValueError, match="valid keys: top1, top5, recall"):
        stats.parse_budget("accuracy=1")
    for bad in ("top1", "top1=abc", "top1=-1", "top1=nan", "top1=1,top1=2"):
        with pytest.raises(ValueError):
            stats.parse_budget(bad)
    with pytest.raises(TypeError):
        stats.DEFAULT_BUDGET["top1"] = 5.0  # read-only
