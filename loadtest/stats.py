"""The load tester's arithmetic: arrival schedules, percentiles, rates, error counts, sweeps.

Pure numpy on recorded timings; no clock, no network. Everything the runner measures goes
through here, so the numbers in a report are unit-tested on synthetic timings.

Conventions:

- Times are seconds on the run's own clock (0 = start of the run).
- A request's latency is ``done - scheduled``. In a closed loop ``scheduled`` is when the
  caller sent it. In an open loop it is when the arrival process said it was due, even if the
  generator sent it late, so a stalled server is charged for the requests it delayed
  (no coordinated omission).
- Percentiles are nearest-rank: the smallest recorded latency that at least q% of requests
  did not exceed. A reported p99 is always a latency some request really had.
- Latency statistics cover requests *scheduled* inside the measurement window; throughput
  counts successful items *finished* inside it, divided by its length.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

OK = "OK"
# A client-side outcome, not a server status: the open-loop generator already had
# ``max_in_flight`` requests outstanding when this one was due, so it was not sent.
DROPPED = "DROPPED"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
ARRIVALS = ("poisson", "fixed")


@dataclass(frozen=True)
class Sample:
    """One request's outcome.

    Attributes:
        scheduled: when it was due (open loop) or sent (closed loop), run seconds.
        sent: when the generator actually sent it.
        done: when the response (or error) arrived.
        items: images/texts in the request.
        endpoint: the endpoint that served it (``x-clip-endpoint``); "" when unknown, e.g. an
            error before the server chose one.
        code: "OK", a gRPC status name ("UNAVAILABLE"), "HTTP_503" or "DROPPED".
    """

    scheduled: float
    sent: float
    done: float
    items: int
    endpoint: str
    code: str

    @property
    def latency(self) -> float:
        return self.done - self.scheduled


@dataclass(frozen=True)
class Summary:
    """Aggregate of one group of samples (one endpoint, or all) over one window."""

    requests: int
    ok: int
    items: int  # successful items finished in the window
    duration_s: float
    errors: dict[str, int] = field(default_factory=dict)  # code -> count, OK excluded
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # p50.. max, mean

    @property
    def items_per_s(self) -> float:
        return self.items / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return (self.requests - self.ok) / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        """JSON-ready form (the schema of ``clipserve loadtest --json``)."""
        return {
            "requests": self.requests, "ok": self.ok, "errors": dict(sorted(self.errors.items())),
            "error_rate": round(self.error_rate, 6), "items": self.items,
            "duration_s": round(self.duration_s, 6),
            "items_per_s": round(self.items_per_s, 4),
            "latency_ms": {k: (None if v is None else round(v, 4))
                           for k, v in self.latency_ms.items()},
        }


def percentile_key(q: float) -> str:
    """50 -> "p50", 99.9 -> "p99.9"."""
    return f"p{q:g}"


def percentiles(values: Sequence[float],
                qs: Iterable[float] = PERCENTILES) -> dict[str, float | None]:
    """Nearest-rank percentiles of ``values``: for each q, the smallest value v such that at
    least q% of the values are <= v. Empty input gives None for each.

    Raises:
        ValueError: a q outside (0, 100].
    """
    data = np.sort(np.asarray(values, dtype=np.float64))
    out: dict[str, float | None] = {}
    for q in qs:
        if not 0 < q <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {q}")
        if len(data) == 0:
            out[percentile_key(q)] = None
            continue
        # The small epsilon keeps 99.9% of 1000 at rank 999 despite float rounding.
        rank = max(1, math.ceil(q / 100.0 * len(data) - 1e-9))
        out[percentile_key(q)] = float(data[rank - 1])
    return out


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, max and mean of latencies given in seconds, in milliseconds."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    out = percentiles(ms)
    out["max"] = float(ms.max()) if len(ms) else None
    out["mean"] = float(ms.mean()) if len(ms) else None
    return out


def summarize(samples: Sequence[Sample], start: float, end: float) -> Summary:
    """Aggregate samples over the window [start, end).

    Latencies and error counts come from requests scheduled in the window, successful requests
    only for latency; throughput from successful items finished in it.

    Raises:
        ValueError: end <= start.
    """
    if end <= start:
        raise ValueError(f"empty window [{start}, {end})")
    scheduled_in = [s for s in samples if start <= s.scheduled < end]
    ok = [s for s in scheduled_in if s.code == OK]
    errors = Counter(s.code for s in scheduled_in if s.code != OK)
    items_done = sum(s.items for s in samples if s.code == OK and start <= s.done < end)
    return Summary(requests=len(scheduled_in), ok=len(ok), items=items_done,
                   duration_s=end - start, errors=dict(errors),
                   latency_ms=latency_summary_ms([s.latency for s in ok]))


def by_endpoint(samples: Sequence[Sample], start: float, end: float) -> dict[str, Summary]:
    """One summary per endpoint that served a request, plus errors without an endpoint under
    "" (only when there are any). Sorted by endpoint name."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.endpoint, []).append(s)
    out = {name: summarize(group, start, end) for name, group in sorted(groups.items())}
    return {name: summary for name, summary in out.items() if summary.requests or summary.items}


def timeline(samples: Sequence[Sample], end: float, bin_s: float = 1.0,
             endpoint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Successful items per second in consecutive bins of ``bin_s`` from 0 to ``end``, by
    completion time; optionally for one endpoint. Returns (bin starts, items/s)."""
    if bin_s <= 0:
        raise ValueError("bin_s must be positive")
    n_bins = max(1, math.ceil(end / bin_s - 1e-9))
    counts = np.zeros(n_bins)
    for s in samples:
        if s.code == OK and (endpoint is None or s.endpoint == endpoint) and 0 <= s.done < end:
            counts[min(int(s.done // bin_s), n_bins - 1)] += s.items
    return np.arange(n_bins) * bin_s, counts / bin_s


def arrival_times(rate: float, duration_s: float, max_requests: int = 0,
                  process: str = "poisson", seed: int = 0) -> np.ndarray:
    """Open-loop send times in [0, duration_s): a Poisson process (exponential gaps, mean
    1/rate) or a fixed rate (gap exactly 1/rate, first at 0). At most ``max_requests`` when
    that is positive. Deterministic for a seed.

    Raises:
        ValueError: non-positive rate or duration, or an unknown process.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    if process not in ARRIVALS:
        raise ValueError(f"unknown arrival process {process!r}; valid: {', '.join(ARRIVALS)}")
    expected = rate * duration_s
    cap = max_requests if max_requests > 0 else None
    if process == "fixed":
        n = math.ceil(expected - 1e-9)
        times = np.arange(n if cap is None else min(n, cap)) / rate
        return times[times < duration_s]
    rng = np.random.default_rng(seed)
    chunks, t = [], 0.0
    # Draw in chunks until past the end: expected count plus a generous margin each time.
    while t < duration_s:
        gaps = rng.exponential(1.0 / rate, size=int(expected + 10 * math.sqrt(expected) + 16))
        chunk = t + np.cumsum(gaps)
        chunks.append(chunk)
        t = float(chunk[-1])
    times = np.concatenate(chunks)
    times = times[times < duration_s]
    return times if cap is None else times[:cap]


@dataclass(frozen=True)
class SweepPoint:
    """One step of a sweep: the offered load (concurrency or rate) and what it achieved."""

    load: float
    items_per_s: float
    p99_ms: float | None
    error_rate: float = 0.0


def saturation(points: Sequence[SweepPoint]) -> SweepPoint:
    """The step with the highest throughput. Raises ValueError on no points."""
    if not points:
        raise ValueError("no sweep points")
    return max(points, key=lambda p: p.items_per_s)


def knee(points: Sequence[SweepPoint], slo_ms: float,
         max_error_rate: float = 0.01) -> tuple[SweepPoint | None, SweepPoint | None]:
    """Where the p99 SLO breaks, walking up the load.

    Returns (last step meeting the SLO, first step breaking it); either may be None (every
    step breaks it / none does). A step with more than ``max_error_rate`` errors, or with no
    successful request, breaks it whatever its p99.
    """
    ordered = sorted(points, key=lambda p: p.load)
    last_ok = None
    for p in ordered:
        if p.p99_ms is None or p.p99_ms > slo_ms or p.error_rate > max_error_rate:
            return last_ok, p
        last_ok = p
    return last_ok, None


def throughput_at_p99(points: Sequence[SweepPoint], budget_ms: float) -> float:
    """The best throughput a system reaches with p99 within ``budget_ms``, reading its sweep
    as a curve: steps in load order, linearly interpolated between the last step within the
    budget and the first beyond it. 0.0 when even the lightest step is over budget.

    This puts two systems "at equal p99": give both the same budget.
    """
    ordered = [p for p in sorted(points, key=lambda p: p.load) if p.p99_ms is not None]
    best = 0.0
    for prev, cur in zip([None, *ordered], ordered):
        if cur.p99_ms <= budget_ms:
            best = max(best, cur.items_per_s)
        elif prev is not None and prev.p99_ms <= budget_ms:
            frac = (budget_ms - prev.p99_ms) / (cur.p99_ms - prev.p99_ms)
            best = max(best, prev.items_per_s + frac * (cur.items_per_s - prev.items_per_s))
    return best
