"""clipserve ab-report's counter reading and intervals, on a real ServerMetrics registry."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from clipserve.endpoints import Precision
from clipserve.loadtest import abreport
from clipserve.server.metrics import LabelSet, Method, ServerMetrics


def page() -> str:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, ("s",))
    m.init_endpoints([("s", Precision.FP32), ("s", Precision.INT8)])
    # fp32: 10 of 200 images flagged; int8: 60 of 200 (a broken arm).
    m.observe_ood("s", Precision.FP32, LabelSet.DEPLOYMENT, np.r_[np.zeros(10), np.ones(190)],
                  0.5)
    m.observe_ood("s", Precision.INT8, LabelSet.DEPLOYMENT, np.r_[np.zeros(60), np.ones(140)],
                  0.5)
    m.observe_ood("s", Precision.INT8, LabelSet.REQUEST, np.zeros(500), 0.5)  # not counted
    m.observe_outcomes("s", Precision.FP32, correct=90, incorrect=10)
    m.observe_outcomes("s", Precision.INT8, correct=80, incorrect=20)
    m.observe_shadow("s", Precision.INT8, Precision.FP32, np.ones(50), np.zeros(50), 45)
    for _ in range(4):
        m.observe_call(Method.EMBED_IMAGES, "s", Precision.INT8, grpc.StatusCode.OK,
                       0.02)
    m.observe_call(Method.EMBED_IMAGES, None, None, grpc.StatusCode.UNAVAILABLE,
                   0.0)  # before routing: no arm
    return generate_latest(registry).decode()


def test_counts_are_read_per_arm_from_a_gateway_page():
    arms = abreport.counts_from_text(page())
    assert set(arms) == {("s", "fp32"), ("s", "int8")}
    int8 = arms["s", "int8"]
    assert (int8.ood_flagged, int8.ood_scored) == (60, 200)
    assert (int8.correct, int8.incorrect) == (80, 20)
    assert (int8.shadow_agreements, int8.shadow_images) == (45, 50)
    assert int8.calls == 4 and int8.latency_sum_s == pytest.approx(0.08)


def test_report_compares_each_arm_with_the_reference():
    (row,) = abreport.report(abreport.counts_from_text(page()), "fp32")
    assert row["precision"] == "int8"
    ood = row["ood_flag_rate"]
    assert ood["arm"] == 0.3 and ood["reference"] == 0.05
    assert ood["low"] > 0  # 30% vs 5% over 200 images each: clearly worse
    acc = row["accuracy"]
    assert acc["difference"] == pytest.approx(-0.1)
    assert acc["low"] < acc["difference"] < acc["high"] and acc["low"] < 0
    agree = row["shadow_agreement"]
    assert agree["rate"] == 0.9 and agree["low"] < 0.9 < agree["high"]
    assert row["mean_latency_ms"] == pytest.approx(20.0)
    assert "int8 vs fp32" in abreport.format_rows([row], 0.95, "test")


def test_newcombe_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p1, p2, n1, n2, trials = 0.12, 0.05, 300, 400, 2000
    k1, k2 = rng.binomial(n1, p1, trials), rng.binomial(n2, p2, trials)
    covered = 0
    for a, b in zip(k1, k2):
        d = abreport.difference(a, n1, b, n2, 0.95)
        covered += d["low"] <= p1 - p2 <= d["high"]
    # 2000 trials: a 95% interval's coverage is read to +- 0.01 (1 sd 0.005).
    assert 0.93 <= covered / trials <= 0.97


def test_no_traffic_gives_no_interval():
    assert abreport.difference(0, 0, 5, 10) is None
    assert abreport.wilson(0, 0) is None


@pytest.mark.parametrize("changes, fragment", [
    ({"metrics": "gateway:9464"}, "must be an http(s) URL"),
    ({"window": "an hour"}, "window must look like"),
    ({"reference": "fp8"}, "valid precisions"),
])
def test_config_is_validated(changes, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        abreport.AbReportConfig(**changes)
    assert abreport.AbReportConfig().is_gateway
    assert not abreport.AbReportConfig(metrics="http://prom:9090").is_gateway


def test_verdict_flags_the_broken_arm_and_says_what_would_settle_the_rest():
    (row,) = abreport.report(abreport.counts_from_text(page()), "fp32")
    v = row["verdicts"]
    # 30% vs 5% flagged over 200 images each: even the interval's best end moves >2 points.
    assert v["flag_rate"]["verdict"] == "unsafe"
    # -10 points over 100 outcomes each: the interval reaches past -1 point at its best end?
    acc = row["accuracy"]
    expected = ("unsafe" if acc["high"] < -0.01 else "inconclusive")
    assert v["accuracy"]["verdict"] == expected
    # 45/50 agreement: Wilson [0.79, 0.96] straddles the 95% line: undecided, with an estimate.
    assert v["agreement"]["verdict"] == "inconclusive"
    assert v["agreement"]["more_needed"] > 0
    assert row["verdict"] == "unsafe"
    text = abreport.format_rows([row], 0.95, "test")
    assert "int8 vs fp32: UNSAFE" in text and "more per arm would settle it" in text


def test_flag_rate_is_judged_both_ways():
    # An arm that flags far LESS than the reference is as suspect as one that flags more.
    arms = {("s", "fp32"): abreport.ArmCounts(ood_flagged=300, ood_scored=1000),
            ("s", "int8"): abreport.ArmCounts(ood_flagged=20, ood_scored=1000)}
    (row,) = abreport.report(arms, "fp32")
    assert row["verdicts"]["flag_rate"]["verdict"] == "unsafe"
    arms["s", "int8"] = abreport.ArmCounts(ood_flagged=300, ood_scored=1000)
    (row,) = abreport.report(arms, "fp32")
    # Identical counts, 1000 each: +-4 points of interval, more than the 2-point budget.
    assert row["verdicts"]["flag_rate"]["verdict"] == "inconclusive"
    assert row["verdict"] == "inconclusive"


def test_identical_arms_are_unsafe_no_more_often_than_the_intervals_allow():
    # Both arms draw from the same rates; 'unsafe' needs the whole interval past the budget
    # line, which a 95% interval does on under 2.5% of draws per metric and side.
    rng = np.random.default_rng(1)
    unsafe, trials = 0, 400
    for _ in range(trials):
        n = int(rng.integers(200, 5000))
        arms = {}
        for p in ("fp32", "int8"):
            flagged, correct = rng.binomial(n, 0.05), rng.binomial(n, 0.9)
            arms["s", p] = abreport.ArmCounts(ood_flagged=flagged, ood_scored=n,
                                              correct=correct, incorrect=n - correct,
                                              shadow_images=n,
                                              shadow_agreements=rng.binomial(n, 0.99))
        (row,) = abreport.report(arms, "fp32")
        unsafe += row["verdict"] == "unsafe"
    assert unsafe / trials <= 0.025


def test_budget_is_validated_and_used():
    with pytest.raises(ValueError, match="unknown budget key 'top1'"):
        abreport.AbReportConfig(budget="top1=1")
    arms = {("s", "fp32"): abreport.ArmCounts(correct=900, incorrect=100),
            ("s", "int8"): abreport.ArmCounts(correct=880, incorrect=120)}
    strict = abreport.report(arms, "fp32", budget={"accuracy": 0.0, "agreement": 5,
                                                   "flag_rate": 2})
    loose = abreport.report(arms, "fp32", budget={"accuracy": 10.0, "agreement": 5,
                                                  "flag_rate": 2})
    assert strict[0]["verdicts"]["accuracy"]["verdict"] == "inconclusive"
    assert loose[0]["verdicts"]["accuracy"]["verdict"] == "safe"
    assert set(loose[0]["verdicts"]) == {"accuracy"}  # no shadow, no OOD scores: not judged
