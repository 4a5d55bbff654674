"""What a run shows: a table per endpoint, JSON for machines, and PNG plots.

JSON schema (``version`` 1) of a run::

    {"version": 1, "mode": "closed"|"open", "load": N, "warmup_s", "duration_s", "wall_s",
     "config": {...}, "overall": SUMMARY, "endpoints": {"<endpoint>": SUMMARY, ...},
     "timeline": {"bin_s": 1.0, "t": [...], "items_per_s": {"<endpoint>": [...]}}}

    SUMMARY = {"requests", "ok", "errors": {"CODE": n}, "error_rate", "items", "duration_s",
               "items_per_s", "latency_ms": {"p50", "p90", "p99", "p99.9", "max", "mean"}}

A sweep is ``{"version": 1, "sweep": ANALYSIS, "steps": [RUN, ...]}`` with the saturation
throughput and SLO knee from :meth:`SweepResult.analysis`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import stats
from .runner import RunResult, SweepResult
from .stats import Summary

JSON_VERSION = 1
_LATENCY_COLUMNS = ("p50", "p90", "p99", "p99.9", "max")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _errors(summary: Summary) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(summary.errors.items())) or "-"


def format_table(overall: Summary, endpoints: dict[str, Summary]) -> str:
    """A plain-text table: one row per endpoint served and one for all of them."""
    header = ["endpoint", "requests", "items/s", *(f"{c} ms" for c in _LATENCY_COLUMNS), "errors"]
    rows = []
    for name, summary in [*endpoints.items(), ("all", overall)]:
        rows.append([name or "(no endpoint)", str(summary.requests), f"{summary.items_per_s:.1f}",
                     *(_ms(summary.latency_ms.get(c)) for c in _LATENCY_COLUMNS),
                     _errors(summary)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(cell.ljust(w) if i in (0, len(row) - 1) else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows[:-1]]
    if len(rows) > 2:
        lines.append(fmt(["-" * w for w in widths]))
    lines.append(fmt(rows[-1]))
    return "\n".join(lines)


def run_to_dict(run: RunResult, config: dict | None = None, bin_s: float = 1.0) -> dict:
    """The JSON form of one run (see the module docstring)."""
    endpoints = run.endpoints()
    t, _ = stats.timeline(run.samples, run.duration_s, bin_s)
    series = {name: stats.timeline(run.samples, run.duration_s, bin_s, name)[1].round(3).tolist()
              for name in endpoints if name}
    return {
        "version": JSON_VERSION, "mode": run.mode, "load": run.load,
        "warmup_s": run.warmup_s, "duration_s": run.duration_s, "wall_s": round(run.wall_s, 3),
        "config": config or {}, **({"meta": run.meta} if run.meta else {}),
        "overall": run.overall().to_dict(),
        "endpoints": {name: s.to_dict() for name, s in endpoints.items()},
        "timeline": {"bin_s": bin_s, "t": t.tolist(), "items_per_s": series},
    }


def sweep_to_dict(sweep: SweepResult, config: dict | None = None) -> dict:
    """The JSON form of a sweep."""
    return {"version": JSON_VERSION, "config": config or {}, "sweep": sweep.analysis(),
            "steps": [run_to_dict(run) for run in sweep.runs]}


def format_sweep(sweep: SweepResult) -> str:
    """One line per step, then the saturation point and the knee."""
    unit = "callers" if sweep.kind == "concurrency" else "req/s"
    lines = [f"{sweep.kind:>11}  items/s    p50 ms    p99 ms  errors"]
    for run in sweep.runs:
        s = run.overall()
        lines.append(f"{run.load:>11g}  {s.items_per_s:7.1f}  {_ms(s.latency_ms['p50']):>8}  "
                     f"{_ms(s.latency_ms['p99']):>8}  {_errors(s)}")
    a = sweep.analysis()
    sat = a["saturation"]
    lines.append(f"saturation: {sat['items_per_s']:.1f} items/s at {sat['load']:g} {unit} "
                 f"(p99 {_ms(sat['p99_ms'])} ms)")
    last_ok, first_bad = a["knee"]["last_within_slo"], a["knee"]["first_over_slo"]
    if first_bad is None:
        lines.append(f"knee: every step kept p99 <= {sweep.slo_ms:g} ms")
    elif last_ok is None:
        lines.append(f"knee: p99 > {sweep.slo_ms:g} ms (or errors) from the first step")
    else:
        lines.append(f"knee: p99 <= {sweep.slo_ms:g} ms up to {last_ok['load']:g} {unit} "
                     f"({last_ok['items_per_s']:.1f} items/s); broken at {first_bad['load']:g}")
    return "\n".join(lines)


def replace_section(path: Path, section: str, start: str, end: str,
                    after: str | None = None) -> None:
    """Replace the part of the Markdown file ``path`` between the ``start`` and ``end``
    markers with ``section`` (which carries the markers). A new section goes right after the
    marker ``after`` when the file has it, else at the end; a missing file starts as
    "# clipserve benchmarks"."""
    text = path.read_text() if path.is_file() else "# clipserve benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    elif after is not None and after in text:
        head, rest = text.split(after, 1)
        text = head + after + "\n\n" + section.rstrip("\n") + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_json(data: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: RunResult, path: Path, title: str = "") -> Path:
    """Latency CDF per endpoint (left) and throughput over time per endpoint (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    window = [s for s in run.samples if run.warmup_s <= s.scheduled < run.duration_s]
    names = sorted({s.endpoint for s in run.samples if s.code == stats.OK})
    for name in names:
        ms = np.sort([s.latency * 1000 for s in window
                      if s.endpoint == name and s.code == stats.OK])
        if len(ms):
            left.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=name, drawstyle="steps-post")
        t, rate = stats.timeline(run.samples, run.duration_s, 1.0, name)
        right.plot(t + 0.5, rate, label=name, marker=".")
    left.set_xscale("log")
    left.set_xlabel("latency (ms, log)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency CDF per endpoint")
    left.grid(True, which="both", alpha=0.3)
    if run.warmup_s:
        right.axvspan(0, run.warmup_s, color="grey", alpha=0.15, label="warm-up")
    right.set_xlabel("time (s)")
    right.set_ylabel("items/s")
    right.set_title("throughput over time")
    right.grid(True, alpha=0.3)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    load = f"{run.load:g} callers" if run.mode == "closed" else f"{run.load:g} req/s offered"
    fig.suptitle(title or f"clipserve loadtest: {run.mode} loop, {load}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweeps: dict[str, SweepResult], path: Path, title: str = "") -> Path:
    """Throughput and p99 against offered load, one line per labelled sweep, with the SLO."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    slo = None
    kind = "load"
    for label, sweep in sweeps.items():
        points = sweep.points()
        loads = [p.load for p in points]
        left.plot(loads, [p.items_per_s for p in points], marker="o", label=label)
        right.plot(loads, [p.p99_ms if p.p99_ms is not None else np.nan for p in points],
                   marker="o", label=label)
        last_ok, _ = stats.knee(points, sweep.slo_ms)
        if last_ok is not None:
            right.plot([last_ok.load], [last_ok.p99_ms], marker="*", markersize=14, color="k")
        slo, kind = sweep.slo_ms, sweep.kind
    if slo is not None:
        right.axhline(slo, color="red", linestyle="--", label=f"SLO p99 {slo:g} ms")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (callers)" if kind == "concurrency" else "offered rate (req/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("items/s")
    left.set_title("throughput")
    right.set_ylabel("p99 latency (ms)")
    right.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(NullFormatter())
    right.set_title("p99 (star: last step within SLO)")
    fig.suptitle(title or "clipserve loadtest sweep")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
