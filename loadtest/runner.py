"""The load generators: a closed loop of N callers and an open loop of scheduled arrivals.

Both stop by themselves: at the duration, or after a request count, whichever comes first;
calls still out then get at most the target's timeout. They record one
:class:`~clipserve.loadtest.stats.Sample` per request and leave the arithmetic to
:mod:`clipserve.loadtest.stats`.

The open loop sends each request at its scheduled time whatever happened to earlier ones and
measures latency from that time, so a server that stalls is charged for every request it
delayed. When ``max_in_flight`` requests are already out, a due request is recorded as
``DROPPED`` instead of being sent late, which would hide the queue it met.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import stats
from .stats import DROPPED, Sample, Summary
from .targets import Target
from .workload import Workload


@dataclass
class RunResult:
    """Everything one run recorded.

    Attributes:
        mode: "closed" or "open".
        load: concurrency (closed) or rate in requests/s (open).
        samples: one per request, in completion order.
        warmup_s: requests scheduled before this are left out of the summaries.
        duration_s: the measurement window is [warmup_s, duration_s).
        wall_s: how long the run took, stragglers included.
    """

    mode: str
    load: float
    samples: list[Sample]
    warmup_s: float
    duration_s: float
    wall_s: float
    meta: dict = field(default_factory=dict)

    def overall(self) -> Summary:
        return stats.summarize(self.samples, self.warmup_s, self.duration_s)

    def endpoints(self) -> dict[str, Summary]:
        return stats.by_endpoint(self.samples, self.warmup_s, self.duration_s)


class Progress:
    """Live progress of a run: a line rewritten in place on a terminal, one line per
    ``every_s`` otherwise. ``out=None`` silences it."""

    def __init__(self, out=sys.stderr, every_s: float = 1.0, label: str = ""):
        self.out = out
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self.every_s = every_s if self.tty else max(every_s, 5.0)
        self.label = label

    def line(self, elapsed: float, samples: Sequence[Sample], sent: int, window_s: float) -> str:
        done = len(samples)
        errors = sum(1 for s in samples if s.code != stats.OK)
        recent = [s for s in samples[-5000:] if s.done >= elapsed - window_s and s.code == stats.OK]
        rate = sum(s.items for s in recent) / window_s
        p99 = stats.percentiles([s.latency * 1000 for s in recent], (99,))["p99"]
        p99_text = f"{p99:7.1f} ms" if p99 is not None else "      - ms"
        return (f"{self.label}{elapsed:6.1f}s  sent {sent:6d}  done {done:6d}  errors {errors:5d}"
                f"  in flight {sent - done:4d}  items/s {rate:8.1f}  p99 {p99_text}")

    async def run(self, clock: Callable[[], float], samples: list[Sample],
                  sent: Callable[[], int]) -> None:
        if self.out is None:
            return
        try:
            while True:
                await asyncio.sleep(self.every_s)
                text = self.line(clock(), samples, sent(), self.every_s)
                if self.tty:
                    print("\r" + text, end="", file=self.out, flush=True)
                else:
                    print(text, file=self.out, flush=True)
        except asyncio.CancelledError:
            if self.tty:
                print(file=self.out, flush=True)
            raise


def _clock() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


async def closed_loop(target: Target, workload: Workload, concurrency: int, duration_s: float,
                      max_requests: int = 0, warmup_s: float = 0.0,
                      progress: Progress | None = None) -> RunResult:
    """``concurrency`` callers, each sending its next call as soon as the last one returns,
    until ``duration_s`` has passed or ``max_requests`` calls were sent (when > 0).

    Raises:
        ValueError: concurrency < 1, duration <= 0, or warmup not below the duration.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    _check_window(duration_s, warmup_s)
    clock = _clock()
    samples: list[Sample] = []
    counter = itertools.count()
    sent = 0

    async def caller() -> None:
        nonlocal sent
        while True:
            now = clock()
            if now >= duration_s:
                return
            index = next(counter)
            if max_requests and index >= max_requests:
                return
            call = workload.call(index)
            sent += 1
            endpoint, code = await target.send(call)
            samples.append(Sample(now, now, clock(), call.items, endpoint, code))

    reporter = asyncio.create_task((progress or Progress(None)).run(clock, samples, lambda: sent))
    try:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    return RunResult("closed", concurrency, samples, warmup_s, duration_s, clock())


async def open_loop(target: Target, workload: Workload, schedule: Sequence[float],
                    duration_s: float, warmup_s: float = 0.0, max_in_flight: int = 1024,
                    progress: Progress | None = None, rate: float = 0.0) -> RunResult:
    """Send call i at ``schedule[i]`` seconds (see :func:`stats.arrival_times`), without
    waiting for earlier calls; latency counts from the scheduled time.

    Raises:
        ValueError: max_in_flight < 1, a bad window, or a schedule that is not sorted.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    _check_window(duration_s, warmup_s)
    schedule = np.asarray(schedule, dtype=np.float64)
    if len(schedule) > 1 and np.any(np.diff(schedule) < 0):
        raise ValueError("the schedule must be in ascending order")
    clock = _clock()
    samples: list[Sample] = []
    in_flight: set[asyncio.Task] = set()
    sent = 0

    async def one(index: int, due: float) -> None:
        call = workload.call(index)
        started = clock()
        endpoint, code = await target.send(call)
        samples.append(Sample(due, started, clock(), call.items, endpoint, code))

    reporter = asyncio.create_task((progress or Progress(None)).run(clock, samples, lambda: sent))
    try:
        for index, due in enumerate(schedule.tolist()):
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += 1
            if len(in_flight) >= max_in_flight:
                samples.append(Sample(due, due, due, workload.call(index).items, "", DROPPED))
                continue
            task = asyncio.create_task(one(index, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*list(in_flight))
    finally:
        for task in in_flight:
            task.cancel()
        reporter.cancel()
        await asyncio.gather(reporter, *in_flight, return_exceptions=True)
    return RunResult("open", rate, samples, warmup_s, duration_s, clock())


def _check_window(duration_s: float, warmup_s: float) -> None:
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"warmup must be in [0, duration), got {warmup_s} with duration "
                         f"{duration_s}")


@dataclass
class SweepResult:
    """A sweep: one run per step of concurrency or rate, and where it saturates."""

    kind: str  # "concurrency" or "rate"
    slo_ms: float
    runs: list[RunResult]

    def points(self) -> list[stats.SweepPoint]:
        out = []
        for run in self.runs:
            summary = run.overall()
            out.append(stats.SweepPoint(run.load, summary.items_per_s,
                                        summary.latency_ms.get("p99"), summary.error_rate))
        return out

    def analysis(self) -> dict:
        """Saturation throughput and the SLO knee, JSON-ready."""
        points = self.points()
        best = stats.saturation(points)
        last_ok, first_bad = stats.knee(points, self.slo_ms)
        return {
            "kind": self.kind, "slo_p99_ms": self.slo_ms,
            "saturation": {"load": best.load, "items_per_s": round(best.items_per_s, 4),
                           "p99_ms": best.p99_ms},
            "knee": {
                "last_within_slo": None if last_ok is None else {
                    "load": last_ok.load, "items_per_s": round(last_ok.items_per_s, 4),
                    "p99_ms": last_ok.p99_ms},
                "first_over_slo": None if first_bad is None else {
                    "load": first_bad.load, "items_per_s": round(first_bad.items_per_s, 4),
                    "p99_ms": first_bad.p99_ms},
            },
            "throughput_within_slo": round(stats.throughput_at_p99(points, self.slo_ms), 4),
        }


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"concurrency:1,2,4"`` or ``"rate:10,20"`` -> (kind, ascending steps).

    Raises:
        ValueError: unknown kind, no steps, or a step that is not positive (or, for
            concurrency, not a whole number).
    """
    kind, _, steps_text = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ("concurrency", "rate"):
        raise ValueError(f"sweep must be concurrency:N,N,... or rate:R,R,...; got {text!r}")
    try:
        steps = [float(s) for s in steps_text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"bad sweep steps in {text!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise ValueError(f"sweep steps must be positive numbers, got {text!r}")
    if kind == "concurrency" and any(s != int(s) for s in steps):
        raise ValueError(f"concurrency steps must be whole numbers, got {text!r}")
    return kind, sorted(steps)
