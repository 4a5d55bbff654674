"""The load tester's statistics on synthetic timings: percentiles, windows and rates, error
counting, per-endpoint grouping, arrival schedules, sweep analysis."""

import math

import numpy as np
import pytest

from clipserve.loadtest import stats
from clipserve.loadtest.stats import DROPPED, OK, Sample, SweepPoint


def sample(scheduled, latency, endpoint="e", code=OK, items=1, sent=None):
    return Sample(scheduled, scheduled if sent is None else sent, scheduled + latency, items,
                  endpoint, code)


# -- percentiles ---------------------------------------------------------------------------

def test_nearest_rank_percentiles_of_one_to_hundred():
    values = list(range(1, 101))  # 1..100
    p = stats.percentiles(values, (50, 90, 99, 99.9, 100))
    assert p == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 100.0, "p100": 100.0}


def test_percentiles_ignore_input_order_and_are_real_values():
    rng = np.random.default_rng(0)
    values = rng.exponential(10.0, 1001)
    p = stats.percentiles(rng.permutation(values))
    for v in p.values():
        assert v in values
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"]


def test_p999_of_a_thousand_is_the_999th_value():
    values = np.arange(1, 1001, dtype=float)
    assert stats.percentiles(values, (99.9,))["p99.9"] == 999.0


def test_percentiles_of_nothing_are_none_and_bad_q_raises():
    assert stats.percentiles([], (50, 99)) == {"p50": None, "p99": None}
    with pytest.raises(ValueError):
        stats.percentiles([1.0], (0,))
    with pytest.raises(ValueError):
        stats.percentiles([1.0], (100.5,))


def test_single_value_is_every_percentile():
    assert set(stats.percentiles([7.0]).values()) == {7.0}


def test_latency_summary_is_in_milliseconds_with_max_and_mean():
    out = stats.latency_summary_ms([0.001, 0.002, 0.003, 0.010])
    assert out["p50"] == pytest.approx(2.0)
    assert out["max"] == pytest.approx(10.0)
    assert out["mean"] == pytest.approx(4.0)


# -- windows, rates, errors ------------------------------------------------------------------

def test_throughput_counts_items_finished_in_the_window():
    # 100 requests of 2 items, one every 0.1 s from 0 to 9.9 s, each taking 0.05 s.
    samples = [sample(i * 0.1, 0.05, items=2) for i in range(100)]
    s = stats.summarize(samples, 0.0, 10.0)
    assert s.requests == 100 and s.ok == 100
    assert s.items == 200
    assert s.items_per_s == pytest.approx(20.0)
    assert s.latency_ms["p50"] == pytest.approx(50.0)


def test_warmup_is_left_out_of_latency_and_rate():
    slow_start = [sample(t, 1.0) for t in np.arange(0, 2, 0.1)]  # 1 s each, scheduled < 2 s
    steady = [sample(t, 0.01) for t in np.arange(3, 10, 0.1)]
    s = stats.summarize(slow_start + steady, 3.0, 10.0)
    assert s.latency_ms["max"] == pytest.approx(10.0)
    assert s.requests == len(steady)
    assert s.items_per_s == pytest.approx(len(steady) / 7.0)


def test_request_finishing_after_the_window_counts_for_latency_not_throughput():
    samples = [sample(0.5, 0.1), sample(9.5, 2.0)]  # the second finishes at 11.5
    s = stats.summarize(samples, 0.0, 10.0)
    assert s.requests == 2
    assert s.items == 1
    assert s.latency_ms["max"] == pytest.approx(2000.0)


def test_errors_are_counted_by_code_and_kept_out_of_latency():
    samples = ([sample(i * 0.01, 0.01) for i in range(90)]
               + [sample(1 + i * 0.01, 5.0, code="UNAVAILABLE") for i in range(7)]
               + [sample(2 + i * 0.01, 0.0, code=DROPPED, endpoint="") for i in range(3)])
    s = stats.summarize(samples, 0.0, 10.0)
    assert s.requests == 100 and s.ok == 90
    assert s.errors == {"UNAVAILABLE": 7, DROPPED: 3}
    assert s.error_rate == pytest.approx(0.10)
    assert s.latency_ms["max"] == pytest.approx(10.0)  # the 5 s failures are not latencies
    d = s.to_dict()
    assert d["errors"] == {"DROPPED": 3, "UNAVAILABLE": 7}
    assert d["items"] == 90


def test_empty_window_raises():
    with pytest.raises(ValueError):
        stats.summarize([], 5.0, 5.0)


def test_summary_of_no_requests_has_no_latencies():
    s = stats.summarize([], 0.0, 1.0)
    assert s.requests == 0 and s.items_per_s == 0.0 and s.error_rate == 0.0
    assert s.latency_ms["p99"] is None


def test_by_endpoint_attributes_each_request_to_its_endpoint():
    samples = ([sample(i * 0.1, 0.02, endpoint="s_fp32_image") for i in range(30)]
               + [sample(i * 0.1, 0.01, endpoint="s_int8_image", items=4) for i in range(10)]
               + [sample(0.3, 0.0, endpoint="", code="INVALID_ARGUMENT")])
    groups = stats.by_endpoint(samples, 0.0, 5.0)
    assert list(groups) == ["", "s_fp32_image", "s_int8_image"]
    assert groups["s_fp32_image"].ok == 30
    assert groups["s_int8_image"].items == 40
    assert groups[""].errors == {"INVALID_ARGUMENT": 1}
    overall = stats.summarize(samples, 0.0, 5.0)
    assert overall.items == sum(g.items for g in groups.values())


def test_timeline_bins_items_by_completion_time():
    samples = [sample(0.1, 0.1, items=3), sample(0.5, 0.6, items=1),
               sample(1.5, 0.1, code="UNAVAILABLE"), sample(2.2, 0.1, endpoint="x")]
    t, rate = stats.timeline(samples, 3.0, 1.0)
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert rate.tolist() == [3.0, 1.0, 1.0]
    _, only_x = stats.timeline(samples, 3.0, 1.0, endpoint="x")
    assert only_x.tolist() == [0.0, 0.0, 1.0]
    _, half = stats.timeline(samples, 3.0, 0.5)
    assert half[0] == 6.0  # 3 items in 0.5 s


# -- open-loop arrival schedules ---------------------------------------------------------------

def test_fixed_arrivals_are_evenly_spaced_and_bounded():
    times = stats.arrival_times(10.0, 2.0, process="fixed")
    assert len(times) == 20
    assert np.allclose(np.diff(times), 0.1)
    assert times[0] == 0.0 and times[-1] < 2.0
    assert len(stats.arrival_times(10.0, 2.0, max_requests=5, process="fixed")) == 5


def test_poisson_arrivals_have_the_right_rate_and_exponential_gaps():
    rate, duration = 200.0, 50.0
    times = stats.arrival_times(rate, duration, seed=1)
    n = len(times)
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)  # within 4 sigma
    assert np.all(np.diff(times) >= 0) and times[-1] < duration and times[0] >= 0
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # CV of an exponential is 1


def test_poisson_arrivals_are_deterministic_per_seed_and_capped():
    a = stats.arrival_times(50.0, 4.0, seed=3)
    assert np.array_equal(a, stats.arrival_times(50.0, 4.0, seed=3))
    assert not np.array_equal(a, stats.arrival_times(50.0, 4.0, seed=4))
    assert np.array_equal(stats.arrival_times(50.0, 4.0, max_requests=7, seed=3), a[:7])


def test_poisson_schedule_covers_a_long_run_at_a_low_rate():
    times = stats.arrival_times(0.5, 200.0, seed=0)
    assert times[-1] > 150.0  # the chunked draw keeps going until past the end


@pytest.mark.parametrize("kwargs", [dict(rate=0, duration_s=1), dict(rate=1, duration_s=0),
                                    dict(rate=1, duration_s=1, process="burst")])
def test_bad_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        stats.arrival_times(**kwargs)


# -- sweeps ---------------------------------------------------------------------------------

POINTS = [SweepPoint(1, 20.0, 50.0), SweepPoint(2, 38.0, 60.0), SweepPoint(4, 60.0, 90.0),
          SweepPoint(8, 64.0, 180.0), SweepPoint(16, 63.0, 400.0)]


def test_saturation_is_the_highest_throughput_step():
    assert stats.saturation(POINTS).load == 8
    with pytest.raises(ValueError):
        stats.saturation([])


def test_knee_is_where_p99_first_breaks_the_slo():
    last_ok, first_bad = stats.knee(POINTS, 100.0)
    assert last_ok.load == 4 and first_bad.load == 8
    assert stats.knee(POINTS, 1000.0) == (POINTS[-1], None)
    assert stats.knee(POINTS, 10.0) == (None, POINTS[0])


def test_knee_counts_errors_and_missing_p99_as_breaking():
    points = [SweepPoint(1, 10, 20), SweepPoint(2, 19, 25, error_rate=0.2), SweepPoint(4, 30, 30)]
    assert stats.knee(points, 100.0)[1].load == 2
    points = [SweepPoint(1, 10, 20), SweepPoint(2, 0.0, None)]
    assert stats.knee(points, 100.0)[1].load == 2


def test_throughput_at_p99_interpolates_between_steps():
    assert stats.throughput_at_p99(POINTS, 90.0) == pytest.approx(60.0)
    # Halfway from p99 90 ms (60/s) to 180 ms (64/s).
    assert stats.throughput_at_p99(POINTS, 135.0) == pytest.approx(62.0)
    assert stats.throughput_at_p99(POINTS, 10_000.0) == pytest.approx(64.0)
    assert stats.throughput_at_p99(POINTS, 40.0) == 0.0
