"""The load generators against fake targets (no network): bounds, open-loop scheduling without
coordinated omission, in-flight limit, the workload and config, the report."""

import asyncio
import json
import time

import numpy as np
import pytest

from clipserve.loadtest import report, runner, stats
from clipserve.loadtest.config import LoadtestConfig
from clipserve.loadtest.stats import DROPPED, OK
from clipserve.loadtest.workload import Workload, parse_mix, routing_metadata

WORKLOAD = Workload({"image": 1.0}, images=[b"a", b"b", b"c"])


class SleepTarget:
    """Answers every call after ``service_s``; ``serial`` makes it one-at-a-time, like a
    server with a single worker."""

    def __init__(self, service_s=0.01, serial=False, endpoint="m_fp32_image", code=OK):
        self.service_s, self.endpoint, self.code = service_s, endpoint, code
        self.lock = asyncio.Lock() if serial else None
        self.calls = []

    async def send(self, call):
        self.calls.append(call)
        if self.lock:
            async with self.lock:
                await asyncio.sleep(self.service_s)
        else:
            await asyncio.sleep(self.service_s)
        return self.endpoint, self.code

    async def close(self):
        pass


class StallTarget(SleepTarget):
    """Blocks the whole event loop (the generator too) for ``stall_s`` on call ``at``."""

    def __init__(self, at, stall_s):
        super().__init__(0.001)
        self.at, self.stall_s = at, stall_s

    async def send(self, call):
        if call.index == self.at:
            time.sleep(self.stall_s)
        return await super().send(call)


# -- closed loop ------------------------------------------------------------------------------

def test_closed_loop_stops_at_the_request_count():
    target = SleepTarget(0.001)
    run = asyncio.run(runner.closed_loop(target, WORKLOAD, 4, duration_s=30, max_requests=10))
    assert len(run.samples) == 10 and len(target.calls) == 10
    assert sorted(c.index for c in target.calls) == list(range(10))
    assert run.wall_s < 5


def test_closed_loop_stops_at_the_duration_with_n_outstanding():
    target = SleepTarget(0.02)
    run = asyncio.run(runner.closed_loop(target, WORKLOAD, 3, duration_s=0.3))
    assert 0.3 <= run.wall_s < 1.0
    assert all(s.code == OK and s.endpoint == "m_fp32_image" for s in run.samples)
    # 3 callers x 0.3 s / 0.02 s: at most 45 calls; a loaded machine gets fewer.
    assert 3 <= len(run.samples) <= 48
    assert all(s.scheduled == s.sent for s in run.samples)  # closed loop: due when sent


@pytest.mark.parametrize("kwargs", [dict(concurrency=0, duration_s=1),
                                    dict(concurrency=1, duration_s=0),
                                    dict(concurrency=1, duration_s=1, warmup_s=1)])
def test_closed_loop_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        asyncio.run(runner.closed_loop(SleepTarget(), WORKLOAD, **kwargs))


# -- open loop --------------------------------------------------------------------------------

def test_open_loop_sends_every_scheduled_request_once():
    schedule = stats.arrival_times(100.0, 0.3, process="fixed")
    run = asyncio.run(runner.open_loop(SleepTarget(0.005), WORKLOAD, schedule, 0.3, rate=100))
    assert len(run.samples) == len(schedule) == 30
    assert sorted(s.scheduled for s in run.samples) == pytest.approx(schedule.tolist())
    assert all(s.sent >= s.scheduled - 1e-6 for s in run.samples)
    assert run.mode == "open" and run.load == 100


def test_open_loop_charges_queueing_to_latency_where_closed_loop_hides_it():
    # A one-at-a-time server taking 50 ms (20/s) offered 40/s for 1 s: the queue grows, so the
    # last arrivals wait about half a second. A closed loop with one caller never sees it.
    server = SleepTarget(0.05, serial=True)
    schedule = stats.arrival_times(40.0, 1.0, process="fixed")
    run = asyncio.run(runner.open_loop(server, WORKLOAD, schedule, 1.0))
    latencies = sorted(s.latency for s in run.samples)
    assert latencies[-1] > 0.5  # 40 requests x 50 ms = 2 s of work offered in 1 s
    closed = asyncio.run(runner.closed_loop(SleepTarget(0.05, serial=True), WORKLOAD, 1, 0.5))
    assert max(s.latency for s in closed.samples) < 0.5


def test_open_loop_measures_from_the_scheduled_time_when_the_sender_stalls():
    # Call 2 freezes the event loop for 0.3 s: requests due meanwhile are sent late, and their
    # latency includes the wait (no coordinated omission).
    schedule = stats.arrival_times(100.0, 0.5, process="fixed")
    run = asyncio.run(runner.open_loop(StallTarget(at=2, stall_s=0.3), WORKLOAD, schedule, 0.5))
    assert len(run.samples) == 50
    delayed = [s for s in run.samples if 0.05 <= s.scheduled <= 0.25]
    assert delayed
    for s in delayed:
        assert s.sent - s.scheduled > 0.3 - s.scheduled - 0.03
        assert s.latency >= s.sent - s.scheduled


def test_open_loop_drops_instead_of_exceeding_max_in_flight():
    schedule = stats.arrival_times(100.0, 0.2, process="fixed")  # 20 due, 0.5 s each
    run = asyncio.run(runner.open_loop(SleepTarget(0.5), WORKLOAD, schedule, 0.2,
                                       max_in_flight=3))
    codes = [s.code for s in run.samples]
    assert codes.count(OK) == 3 and codes.count(DROPPED) == 17
    summary = run.overall()
    assert summary.errors == {DROPPED: 17}


def test_open_loop_rejects_unsorted_schedules():
    with pytest.raises(ValueError):
        asyncio.run(runner.open_loop(SleepTarget(), WORKLOAD, [0.2, 0.1], 1.0))


def test_progress_line_reports_counts_and_recent_rate():
    samples = [stats.Sample(t, t, t + 0.01, 2, "e", OK) for t in np.arange(0, 1, 0.1)]
    samples.append(stats.Sample(0.5, 0.5, 0.6, 1, "", "UNAVAILABLE"))
    line = runner.Progress(None).line(1.0, samples, sent=13, window_s=1.0)
    assert "sent     13" in line and "done     11" in line and "errors     1" in line
    assert "in flight    2" in line and "items/s     20.0" in line


# -- sweeps -----------------------------------------------------------------------------------

def test_parse_sweep():
    assert runner.parse_sweep("concurrency:4,1,2") == ("concurrency", [1.0, 2.0, 4.0])
    assert runner.parse_sweep("rate:2.5,10") == ("rate", [2.5, 10.0])
    for bad in ("load:1,2", "concurrency:", "rate:0,1", "concurrency:1.5", "rate:x"):
        with pytest.raises(ValueError):
            runner.parse_sweep(bad)


def test_sweep_analysis_from_runs():
    def fake_run(load, latency, n):
        # Sent in the first half second, so every call finishes inside the 1 s window.
        samples = [stats.Sample(t, t, t + latency, 1, "e", OK) for t in np.arange(n) / (2 * n)]
        return runner.RunResult("closed", load, samples, 0.0, 1.0, 1.0)

    sweep = runner.SweepResult("concurrency", 100.0,
                               [fake_run(1, 0.02, 40), fake_run(2, 0.05, 70),
                                fake_run(4, 0.3, 80)])
    a = sweep.analysis()
    assert a["saturation"]["load"] == 4
    assert a["knee"]["last_within_slo"]["load"] == 2
    assert a["knee"]["first_over_slo"]["load"] == 4
    assert 70 <= a["throughput_within_slo"] < 80
    assert "saturation" in report.format_sweep(sweep)


# -- workload ---------------------------------------------------------------------------------

def test_parse_mix_normalises_weights():
    assert parse_mix("image:3,text:1") == {"image": 0.75, "text": 0.25}
    assert parse_mix("classify") == {"classify": 1.0}
    for bad in ("", "video:1", "image:-1", "image:x"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_workload_mix_batching_and_routing_keys():
    w = Workload(parse_mix("image:3,text:1"), images=[b"i0", b"i1", b"i2"],
                 texts=["t0", "t1"], batch=2, metadata=routing_metadata("s", "int8"),
                 routing_keys=3, seed=1)
    calls = [w.call(i) for i in range(4000)]
    share = sum(c.kind == "image" for c in calls) / len(calls)
    assert share == pytest.approx(0.75, abs=0.03)
    assert all(c.items == 2 for c in calls)
    first_image = next(c for c in calls if c.kind == "image")
    assert first_image.images == tuple([b"i0", b"i1", b"i2"][(first_image.index * 2 + j) % 3]
                                       for j in range(2))
    assert calls[4].metadata == (("x-clip-scale", "s"), ("x-clip-precision", "int8"),
                                 ("x-clip-routing-key", "lt-1"))
    assert {dict(c.metadata)["x-clip-routing-key"] for c in calls} == {"lt-0", "lt-1", "lt-2"}
    assert [w.call(i) for i in range(50)] == calls[:50]  # deterministic


def test_workload_needs_the_inputs_its_mix_uses():
    with pytest.raises(ValueError):
        Workload({"text": 1.0}, images=[b"x"])
    with pytest.raises(ValueError):
        Workload({"classify": 1.0}, texts=["x"])
    with pytest.raises(ValueError):
        Workload({"image": 1.0}, images=[b"x"], batch=0)


def test_routing_metadata_leaves_out_empty_headers():
    assert routing_metadata() == ()
    assert routing_metadata(precision="fp16") == (("x-clip-precision", "fp16"),)


# -- config -----------------------------------------------------------------------------------

def test_config_defaults_are_a_bounded_closed_loop_on_loopback():
    c = LoadtestConfig()
    assert c.target.startswith("127.0.0.1:") and not c.open_loop and c.duration > 0


@pytest.mark.parametrize("kwargs", [
    dict(target="http://127.0.0.1:1"), dict(target="127.0.0.1"), dict(concurrency=0),
    dict(rate=-1), dict(duration=0), dict(duration=1e6), dict(warmup=10, duration=10),
    dict(mix="video"), dict(precision="int3"), dict(sweep="rate:"), dict(arrival="burst"),
    dict(batch=0), dict(timeout=0)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        LoadtestConfig(**kwargs)


def test_config_from_flags_and_env():
    import argparse

    from clipserve.config import add_flags, from_args

    parser = argparse.ArgumentParser()
    add_flags(parser, LoadtestConfig)
    args = parser.parse_args(["--rate", "25", "--target", "127.0.0.1:6000"])
    c = from_args(LoadtestConfig, args, environ={"CLIPSERVE_DURATION": "3"})
    assert c.open_loop and c.rate == 25.0 and c.duration == 3.0 and c.target == "127.0.0.1:6000"


# -- report -----------------------------------------------------------------------------------

def _run_with_two_endpoints():
    samples = []
    for i in range(100):
        t = i * 0.02
        samples.append(stats.Sample(t, t, t + 0.010 + (i % 10) * 0.001, 1, "s_fp32_image", OK))
        samples.append(stats.Sample(t, t, t + 0.004, 2, "s_int8_image", OK))
    samples.append(stats.Sample(1.0, 1.0, 1.1, 1, "", "RESOURCE_EXHAUSTED"))
    return runner.RunResult("closed", 4, samples, 0.0, 2.0, 2.05)


def test_table_has_a_row_per_endpoint_and_the_errors():
    run = _run_with_two_endpoints()
    text = report.format_table(run.overall(), run.endpoints())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["endpoint", "requests", "items/s"]
    assert any(line.startswith("s_fp32_image") for line in lines)
    assert any(line.startswith("s_int8_image") for line in lines)
    assert "(no endpoint)" in text and "RESOURCE_EXHAUSTED 1" in text
    assert lines[-1].startswith("all")


def test_json_has_throughput_and_percentiles_per_endpoint_and_overall(tmp_path):
    run = _run_with_two_endpoints()
    path = report.write_json(report.run_to_dict(run, {"target": "x"}), tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["mode"] == "closed" and data["load"] == 4
    for name in ("s_fp32_image", "s_int8_image"):
        entry = data["endpoints"][name]
        assert set(entry["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
    assert data["endpoints"]["s_int8_image"]["items_per_s"] == pytest.approx(100.0)
    assert data["overall"]["items"] == 300 and data["overall"]["errors"] == {
        "RESOURCE_EXHAUSTED": 1}
    assert data["endpoints"]["s_int8_image"]["latency_ms"]["p50"] == pytest.approx(4.0)
    assert len(data["timeline"]["t"]) == 2
    assert data["timeline"]["items_per_s"]["s_int8_image"] == [100.0, 100.0]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run_with_two_endpoints()
    assert report.plot_run(run, tmp_path / "run.png").stat().st_size > 1000
    sweep = runner.SweepResult("concurrency", 20.0, [run, run])
    assert report.plot_sweep({"a": sweep}, tmp_path / "sweep.png").stat().st_size > 1000
