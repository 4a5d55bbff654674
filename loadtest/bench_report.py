"""The benchmark's arithmetic and report: ratios, targets, the explanation of misses, plots and
BENCHMARKS.md, all computed from the :class:`~.bench_results.BenchResults` that :mod:`.bench`
measures and writes to bench.json. A missed target's explanation is built from that run's
measurements only: CPU per process, Triton's statistics and the gateway's py-spy profile (its
largest self-time areas, with their shares); without a profile it says none was taken.

Pure functions of the results (plus matplotlib for the PNGs), so the report can be regenerated
from a saved bench.json::

    python -m clipserve.loadtest.bench_report benchmarks/bench.json BENCHMARKS.md
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .bench_workloads import GpuRate, gpu_rate, parse_gpu_rates
from .report import replace_section
from .bench_results import (GATEWAY, TRITON, BenchResults, CpuPerItem, ModelResult,
                            PrecisionResult, Profile, RunSummary, TritonStats, WorkloadResult)
from .stats import SweepPoint, saturation, throughput_at_p99

# The targets for this 2-core CPU (issue 10's fast path; issue 5's batching and peer ones).
# They depend on how much work Triton does per image: under SMALL_MODEL_GFLOP (digits-s is
# 0.004 GFLOP) the gateway's own per-call cost decides the ratio, so the target is lower and
# the gateway's CPU per single-image call is bounded instead; a ViT-B-32 (4.4 GFLOP) should
# hide the gateway almost entirely.
SMALL_MODEL_GFLOP = 0.1


@dataclass(frozen=True)
class Thresholds:
    gateway_throughput_min: float  # gateway / Triton-direct items/s at N callers
    added_p50_max_ms: float  # gateway p50 - Triton-direct p50, one caller
    gateway_cpu_max_ms: float | None  # gateway CPU ms per single-image call at N callers
    batch_ratio_min: float = 0.80  # Triton's average batch behind the gateway / direct
    batching_efficiency_min: float = 0.80  # Triton at N callers / raw ORT at its best batch


SMALL_MODEL = Thresholds(gateway_throughput_min=0.60, added_p50_max_ms=1.5,
                         gateway_cpu_max_ms=0.8)
LARGE_MODEL = Thresholds(gateway_throughput_min=0.95, added_p50_max_ms=1.0,
                         gateway_cpu_max_ms=None)
PEER_RATIO_MIN = 1.0  # clipserve / peer items/s at the peer's p99
# The gateway's path includes Triton's, so a gateway p50 this much below Triton direct's means
# the direct run was disturbed, not that the gateway is faster.
DISTURBED_P50_MS = 1.0


def thresholds_for(image_flops: float) -> Thresholds:
    """The targets of a model whose image tower costs ``image_flops`` (0: unknown, large)."""
    return SMALL_MODEL if 0 < image_flops < SMALL_MODEL_GFLOP * 1e9 else LARGE_MODEL


# -- profiles -----------------------------------------------------------------------------

_BUCKETS = (  # (what, substrings of a frame's file) for the profile's self-time breakdown
    ("image decode/resize (PIL)", ("PIL/", "/images.py")),
    ("tritonclient + protobuf", ("tritonclient", "protobuf", "_pb2")),
    ("grpc", ("grpc",)),
    ("asyncio event loop", ("asyncio/",)),
    ("clipserve service", ("clipserve/", "server/")),
)


# Leaf frames of a thread that waits rather than works (py-spy's idle detection misses
# threads blocked in C through these).
_IDLE_LEAVES = (("select", "selectors.py"), ("_worker", "concurrent/futures/thread.py"),
                ("run", "threading.py"), ("wait", "threading.py"), ("get", "queue.py"),
                ("_bootstrap_inner", "threading.py"))


def summarize_collapsed(text: str, top: int = 8) -> dict:
    """Summarise py-spy's raw (collapsed) output: busy samples, the top leaf functions and
    self time by area, as percentages of the busy samples. Samples whose leaf is a known
    waiting frame are counted apart as idle."""
    leaves: Counter = Counter()
    buckets: Counter = Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.split(";")[-1]
        name, _, where = leaf.partition(" (")
        filename = where.split(":")[0]
        function = name.rsplit(".", 1)[-1]
        if any(function == f and filename.endswith(suffix) for f, suffix in _IDLE_LEAVES):
            idle += count
            continue
        total += count
        leaves[f"{name} ({filename.rsplit('/', 1)[-1]})"] += count
        bucket = next((label for label, keys in _BUCKETS if any(k in filename for k in keys)),
                      "other")
        buckets[bucket] += count
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total, "idle_samples": idle,
            "top_self": [[name, pct(n)] for name, n in leaves.most_common(top)],
            "by_area": {label: pct(n) for label, n in buckets.most_common()}}


# -- analysis -----------------------------------------------------------------------------

def typed(results: BenchResults | dict) -> BenchResults:
    """``results`` as :class:`BenchResults` (a dict is read as bench.json)."""
    return results if isinstance(results, BenchResults) else BenchResults.from_dict(results)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _diff(a, b) -> float | None:
    return None if a is None or b is None else a - b


def _points(runs: dict[int, RunSummary]) -> list[SweepPoint]:
    return [SweepPoint(c, r.items_per_s, r.p99, r.error_rate) for c, r in sorted(runs.items())]


@dataclass(frozen=True)
class Row:
    """One precision's side-by-side numbers: N callers for throughput, 1 for latency."""

    precision: str
    result: PrecisionResult
    triton_n: RunSummary | None
    gateway_n: RunSummary | None
    triton_1: RunSummary | None
    gateway_1: RunSummary | None
    fp32: PrecisionResult | None = None  # the same model's fp32, for the speed-ups
    fp32_triton_n: RunSummary | None = None
    fp32_gateway_n: RunSummary | None = None
    image_flops: int = 0
    attainable_gflops: float | None = None

    @property
    def model_mb(self) -> float:
        return self.result.model_bytes / 1e6

    @property
    def ort_best(self) -> float:
        return self.result.ort.best_items_per_s

    @property
    def ort_batch(self) -> int:
        return self.result.ort.best_batch

    @property
    def triton(self) -> float | None:
        return self.triton_n and self.triton_n.items_per_s

    @property
    def gateway(self) -> float | None:
        return self.gateway_n and self.gateway_n.items_per_s

    @property
    def gateway_ratio(self) -> float | None:
        return _ratio(self.gateway, self.triton)

    @property
    def added_p50(self) -> float | None:
        return _diff(self.gateway_1 and self.gateway_1.p50, self.triton_1 and self.triton_1.p50)

    @property
    def added_p99(self) -> float | None:
        return _diff(self.gateway_1 and self.gateway_1.p99, self.triton_1 and self.triton_1.p99)

    @property
    def batching_efficiency(self) -> float | None:
        return _ratio(self.triton, self.ort_best)

    @property
    def errors(self) -> int:
        return sum(r.error_count for s in (TRITON, GATEWAY) if s in self.result.stacks
                   for r in self.result.stacks[s].runs.values())

    @property
    def speedup(self) -> dict[str, float | None] | None:
        """Throughput against fp32, by "ort", "triton", "gateway" (None without fp32)."""
        if self.fp32 is None:
            return None
        return {"ort": _ratio(self.ort_best, self.fp32.ort.best_items_per_s),
                "triton": _ratio(self.triton, self.fp32_triton_n and
                                 self.fp32_triton_n.items_per_s),
                "gateway": _ratio(self.gateway, self.fp32_gateway_n and
                                  self.fp32_gateway_n.items_per_s)}

    @property
    def size_ratio(self) -> float | None:
        return None if self.fp32 is None else _ratio(self.result.model_bytes,
                                                     self.fp32.model_bytes)

    @property
    def ort_gflops(self) -> float | None:
        return self.ort_best * self.image_flops / 1e9 if self.attainable_gflops else None

    @property
    def ort_roofline(self) -> float | None:
        return _ratio(self.ort_gflops, self.attainable_gflops)

    @property
    def gateway_roofline(self) -> float | None:
        if not self.attainable_gflops:
            return None
        return (self.gateway or 0) * self.image_flops / 1e9 / self.attainable_gflops


@dataclass(frozen=True)
class PeerRow:
    """The peer at one dtype against the gateway at the matching precision, at equal p99."""

    dtype: str
    precision: str
    status: str
    error: str = ""
    budget_ms: float | None = None  # the peer's p99 at its best throughput
    peer: float | None = None  # the peer's best items/s
    clipserve: float | None = None  # the gateway's items/s at that p99
    ort_best: float | None = None
    peer_points: tuple[SweepPoint, ...] = ()
    clipserve_points: tuple[SweepPoint, ...] = ()
    peer_cpu: CpuPerItem = field(default_factory=CpuPerItem)
    clipserve_cpu: CpuPerItem = field(default_factory=CpuPerItem)

    @property
    def ratio(self) -> float | None:
        return _ratio(self.clipserve, self.peer)


@dataclass(frozen=True)
class Target:
    """One target of the issue at one model and precision; ``why`` explains a miss from what
    was measured (empty when met)."""

    model: str
    scale: str
    precision: str
    target: str
    value: float
    threshold: float
    op: str  # ">=" or "<="
    why: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    @property
    def unit(self) -> str:
        return "ms" if self.target.endswith("(ms)") else "ratio"

    @property
    def shortfall(self) -> float:
        """How far from the threshold on the wrong side (ms, or ratio points), 0 when met."""
        if self.met:
            return 0.0
        return self.value - self.threshold if self.op == "<=" else self.threshold - self.value

    def verdict(self) -> str:
        if (self.met and self.target.startswith("gateway added p50")
                and self.value < -DISTURBED_P50_MS):
            # The gateway's path includes Triton, so it cannot really be faster: the direct
            # run was disturbed (other load, or the first run after start-up).
            return "met; negative: the direct run was disturbed, rerun to confirm"
        if self.met:
            return "met"
        if self.unit == "ms":
            return f"missed by {self.shortfall:.2f} ms"
        return f"missed by {self.shortfall * 100:.1f} points"


@dataclass(frozen=True)
class WorkloadRow:
    """One workload's side-by-side numbers at N callers, the gateway's CPU per item and the
    gateway cores one GPU would need at ``rate`` items/s.

    The cores assume the gateway's CPU per item stays what it was at N callers here and that
    cores add up linearly (``--workers`` processes): cores = CPU ms per item x rate / 1000.
    ``rate`` is ``gpu_rate``'s when the run was given one (``--gpu-items-per-s``, an
    assumption, not a measurement: items/s, or a factor of Triton direct's measured
    throughput), else Triton direct's measured throughput in this run."""

    result: WorkloadResult
    triton_n: RunSummary | None
    gateway_n: RunSummary | None
    triton_1: RunSummary | None = None
    gateway_1: RunSummary | None = None
    gpu_rate: GpuRate | None = None

    @property
    def gateway_ratio(self) -> float | None:
        return _ratio(self.gateway_n and self.gateway_n.items_per_s,
                      self.triton_n and self.triton_n.items_per_s)

    @property
    def gateway_cpu_ms(self) -> float | None:
        return self.gateway_n.cpu.ms.get(GATEWAY) if self.gateway_n else None

    @property
    def gateway_cpu_excl_prep_ms(self) -> float | None:
        if self.gateway_cpu_ms is None or self.result.prep_ms_per_item is None:
            return None
        return max(self.gateway_cpu_ms - self.result.prep_ms_per_item, 0.0)

    @property
    def rate(self) -> float | None:
        measured = (self.triton_n and self.triton_n.items_per_s) or None
        return self.gpu_rate.items_per_s(measured) if self.gpu_rate else measured

    @property
    def rate_given(self) -> bool:
        return self.gpu_rate is not None

    def cores(self, cpu_ms: float | None) -> float | None:
        return None if cpu_ms is None or self.rate is None else cpu_ms * self.rate / 1000

    @property
    def errors(self) -> int:
        return sum(r.error_count for s in self.result.stacks.values() for r in s.runs.values())


def _gpu_rates(results: BenchResults) -> dict[str, GpuRate]:
    try:
        return parse_gpu_rates(results.config.get("gpu_items_per_s") or ())
    except ValueError:  # a hand-edited bench.json: size for the measured Triton instead
        return {}


def workload_rows(results: BenchResults, model: ModelResult) -> list[WorkloadRow]:
    """The model's workloads (``bench --workloads``) in the order they ran."""
    n, rates = results.concurrency, _gpu_rates(results)
    return [WorkloadRow(result=w, triton_n=w.run(TRITON, n), gateway_n=w.run(GATEWAY, n),
                        triton_1=w.run(TRITON, 1), gateway_1=w.run(GATEWAY, 1),
                        gpu_rate=gpu_rate(rates, model.scale, w.name))
            for w in model.workloads.values()]


@dataclass(frozen=True)
class ModelAnalysis:
    rows: dict[str, Row]
    peer: list[PeerRow]
    workloads: list[WorkloadRow] = field(default_factory=list)


@dataclass(frozen=True)
class Analysis:
    models: dict[str, ModelAnalysis]
    targets: list[Target]


def analyze(results: BenchResults | dict) -> Analysis:
    """Per model and precision: the side-by-side numbers, ratios and targets."""
    results = typed(results)
    n = results.concurrency
    out = Analysis(models={}, targets=[])
    for spec, model in results.models.items():
        rows = {}
        fp32 = model.precisions.get("fp32")
        for precision, entry in model.precisions.items():
            row = Row(precision=precision, result=entry,
                      triton_n=entry.run(TRITON, n), gateway_n=entry.run(GATEWAY, n),
                      triton_1=entry.run(TRITON, 1), gateway_1=entry.run(GATEWAY, 1),
                      fp32=fp32, fp32_triton_n=fp32 and fp32.run(TRITON, n),
                      fp32_gateway_n=fp32 and fp32.run(GATEWAY, n),
                      image_flops=model.image_flops,
                      attainable_gflops=results.attainable_gflops)
            rows[precision] = row
            out.targets.extend(_targets(model, row, profile_text(
                model.profile, profiling=results.config.get("profile", True))))
        peer_rows = _peer_rows(model, n)
        for pr in peer_rows:
            if pr.ratio is not None:
                out.targets.append(Target(
                    spec, model.scale, pr.precision, "clipserve / peer items/s at the peer's p99",
                    pr.ratio, PEER_RATIO_MIN, ">=",
                    "" if pr.ratio >= PEER_RATIO_MIN else _why_peer(pr)))
        out.models[spec] = ModelAnalysis(rows=rows, peer=peer_rows,
                                         workloads=workload_rows(results, model))
    return out


def _targets(model: ModelResult, row: Row, where_time_goes: str) -> list[Target]:
    def target(what, value, threshold, op, why) -> Target:
        t = Target(model.spec, model.scale, row.precision, what, value, threshold, op)
        return t if t.met else dataclasses.replace(t, why=why(row, where_time_goes))
    limits = thresholds_for(model.image_flops)
    out = []
    if row.gateway_ratio is not None:
        out.append(target("gateway / Triton-direct items/s", row.gateway_ratio,
                          limits.gateway_throughput_min, ">=", _why_gateway_throughput))
    if row.added_p50 is not None:
        out.append(target("gateway added p50, one caller (ms)", row.added_p50,
                          limits.added_p50_max_ms, "<=", _why_added_latency))
    gateway_cpu = row.gateway_n.cpu.ms.get(GATEWAY) if row.gateway_n else None
    png = model.workloads.get("png")
    if limits.gateway_cpu_max_ms is not None and gateway_cpu:
        def why_cpu(r, where):
            text = _why_gateway_throughput(r, where)
            if png is not None and png.prep_ms_per_item is not None:
                text += (f"; of the gateway's {gateway_cpu:.2f} ms, decoding the PNG takes "
                         f"{png.prep_ms_per_item:.3f} ms on one thread (measured apart), so "
                         f"{max(gateway_cpu - png.prep_ms_per_item, 0):.2f} ms is serving")
            return text
        out.append(target("gateway CPU per single-image call at N callers (ms)", gateway_cpu,
                          limits.gateway_cpu_max_ms, "<=", why_cpu))
    batch_ratio = _ratio(_avg_batch(row.gateway_n), _avg_batch(row.triton_n))
    if batch_ratio is not None:
        out.append(target("Triton's average batch behind the gateway / direct", batch_ratio,
                          limits.batch_ratio_min, ">=", _why_batching))
    if row.batching_efficiency is not None:
        out.append(target("batching efficiency (Triton at N / raw ORT best)",
                          row.batching_efficiency, limits.batching_efficiency_min, ">=",
                          _why_batching))
    return out


def _avg_batch(run: RunSummary | None) -> float | None:
    return run.triton_stats.avg_batch if run is not None and run.triton_stats else None


_CPU_NAMES = {GATEWAY: "gateway", TRITON: "Triton+ORT", "client": "load generator",
              "peer": "infinity-emb"}


def _cpu_text(cpu: CpuPerItem) -> str:
    return ", ".join(f"{_CPU_NAMES.get(k, k)} {v:.2f}" for k, v in cpu.ms.items() if v > 0.005)


def profile_text(profile: Profile | None, top: int = 3, profiling: bool = True) -> str:
    """Where the gateway's time went, from its py-spy profile: the ``top`` largest self-time
    areas with their shares, largest first, and the rest together; the top function. Says
    that nothing was measured when there is no profile (``profiling``: whether the run asked
    for one), rather than guessing."""
    if profile is None:
        return ("no py-spy profile of the gateway was taken in this run"
                + (" (--no-profile)" if not profiling else "")
                + ", so where its time goes was not measured")
    if not profile.ok:
        return (f"the gateway's py-spy profile is not available ({profile.status}), so where "
                "its time goes was not measured")
    named = [(area, pct) for area, pct in profile.by_area if area != "other" and pct > 0]
    shown = named[:top]
    rest = round(100.0 - sum(pct for _, pct in shown), 1)
    parts = [f"{area} {pct:.1f}%" for area, pct in shown]
    if rest > 0.05:
        parts.append(f"the rest {rest:.1f}%")
    text = (f"the gateway's py-spy profile ({profile.precision}, {profile.concurrency} callers, "
            f"{profile.samples} busy samples) puts its self time in "
            + (", ".join(parts) if shown else "no known area (all of it unclassified)"))
    if profile.top_self:
        name, pct = profile.top_self[0]
        text += f"; top function {name} {pct:.1f}%"
    return text


def _why_gateway_throughput(row: Row, where_time_goes: str) -> str:
    tri, gw = row.triton_n, row.gateway_n
    parts = []
    if tri.cpu and gw.cpu:
        direct = tri.cpu.of(TRITON, "client")
        through = gw.cpu.of(TRITON, GATEWAY, "client")
        if through:
            parts.append(f"CPU ms per image: direct run {_cpu_text(tri.cpu)}; gateway run "
                         f"{_cpu_text(gw.cpu)}. All processes share the same cores, so with "
                         f"the CPU saturated the expected ratio is about {direct / through:.0%} "
                         f"({direct:.2f} / {through:.2f} ms)")
    tri_batch = tri.triton_stats and tri.triton_stats.avg_batch
    gw_batch = gw.triton_stats and gw.triton_stats.avg_batch
    if tri_batch and gw_batch:
        parts.append(f"Triton formed batches of {tri_batch:.1f} direct vs {gw_batch:.1f} behind "
                     "the gateway")
    parts.append(where_time_goes)
    return "; ".join(parts)


def _why_added_latency(row: Row, where_time_goes: str) -> str:
    text = (f"one caller: Triton-direct p50 {row.triton_1.p50:.2f} ms, gateway p50 "
            f"{row.gateway_1.p50:.2f} ms")
    gateway_cpu = row.gateway_1.cpu.of(GATEWAY)
    if gateway_cpu:
        text += (f"; the gateway spends {gateway_cpu:.2f} ms of CPU per call, serial work on "
                 "the request's path")
    return f"{text}; {where_time_goes}"


def _why_batching(row: Row, where_time_goes: str) -> str:
    # where_time_goes is the gateway's profile: it says nothing about Triton's own batching.
    tri = row.triton_n
    st = tri.triton_stats or TritonStats()
    parts = []
    if st.avg_batch:
        at_batch = row.result.ort.by_batch
        nearest = min(at_batch, key=lambda b: abs(b - st.avg_batch))
        parts.append(f"Triton formed batches of {st.avg_batch:.1f} on average (raw ORT "
                     f"{at_batch[nearest]:.1f} items/s at batch {nearest}, "
                     f"{row.ort_best:.1f} at its best batch {row.ort_batch})")
        if st.compute_ms_per_item is not None:
            parts.append(f"model time per item inside Triton {st.compute_ms_per_item:.2f} ms vs "
                         f"{1000 / row.ort_best:.2f} ms raw; {st.queue_ms_per_request:.1f} ms "
                         f"queued and {st.input_output_ms_per_request:.2f} ms of input/output "
                         "copies per request")
    if tri.cpu:
        parts.append(f"CPU ms per image: {_cpu_text(tri.cpu)} (every process shares the same "
                     "cores; Triton's own process is not profiled, so its CPU is not broken "
                     "down further)")
    return "; ".join(parts)


def _why_peer(pr: PeerRow) -> str:
    text = (f"at p99 <= {pr.budget_ms:.0f} ms clipserve reaches {pr.clipserve:.1f} "
            f"items/s, the peer {pr.peer:.1f}")
    if pr.ort_best and pr.peer > pr.ort_best:
        text += (f"; the peer is above clipserve's own ceiling (raw onnxruntime in-process, "
                 f"{pr.ort_best:.1f} items/s at its best batch), so no serving change closes "
                 "the gap: it is the model runtime on this CPU")
    if pr.peer_cpu and pr.clipserve_cpu:
        text += (f"; CPU ms per image at the top step: peer {_cpu_text(pr.peer_cpu)}; "
                 f"clipserve {_cpu_text(pr.clipserve_cpu)}")
    return text


def _peer_rows(model: ModelResult, n: int) -> list[PeerRow]:
    if model.peer is None:
        return []
    rows = []
    for dtype, entry in model.peer.dtypes.items():
        row = PeerRow(dtype=dtype, precision=entry.precision, status=entry.status,
                      error=entry.error)
        gw_entry = model.precisions.get(entry.precision)
        gw_stack = gw_entry and gw_entry.stacks.get(GATEWAY)
        if entry.status == "ok" and entry.runs and gw_stack:
            peer_points = _points(entry.runs)
            gw_points = _points(gw_stack.runs)
            best = saturation(peer_points)
            peer_n, gw_n = entry.runs.get(n), gw_stack.at(n)
            row = dataclasses.replace(
                row, budget_ms=best.p99_ms, peer=best.items_per_s,
                ort_best=gw_entry.ort.best_items_per_s,
                clipserve=throughput_at_p99(gw_points, best.p99_ms),
                peer_points=tuple(peer_points), clipserve_points=tuple(gw_points),
                peer_cpu=peer_n.cpu if peer_n else CpuPerItem(),
                clipserve_cpu=gw_n.cpu if gw_n else CpuPerItem())
        rows.append(row)
    return rows


# -- plots --------------------------------------------------------------------------------

def plot_all(results: BenchResults | dict, out: Path) -> list[Path]:
    """One throughput-bars PNG and one p99-vs-throughput PNG per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = typed(results)
    analysis = analyze(results)
    n = results.concurrency
    paths = []
    for spec, model in results.models.items():
        rows = analysis.models[spec].rows
        scale = model.scale
        precisions = list(rows)
        stacks = [("raw ORT (best batch)", "ort_best"), (f"Triton direct, {n} callers", "triton"),
                  (f"gateway, {n} callers", "gateway")]
        peer_by_precision = {r.precision: r for r in analysis.models[spec].peer
                             if r.peer is not None}
        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / (len(stacks) + (1 if peer_by_precision else 0))
        x = np.arange(len(precisions))
        for i, (label, key) in enumerate(stacks):
            ax.bar(x + i * width, [getattr(rows[p], key) or 0 for p in precisions], width,
                   label=label)
        if peer_by_precision:
            ax.bar(x + len(stacks) * width,
                   [peer_by_precision[p].peer if p in peer_by_precision else 0
                    for p in precisions], width, label="infinity-emb (best)")
        ax.set_xticks(x + width * (len(stacks) - (0 if peer_by_precision else 1)) / 2,
                      precisions)
        ax.set_ylabel("images/s")
        ax.set_title(f"{scale}: image embedding throughput by precision")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{scale}-throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

        fig, ax = plt.subplots(figsize=(9, 4.2))
        for precision, entry in model.precisions.items():
            stack = entry.stacks.get(GATEWAY)
            pts = _points(stack.runs) if stack else []
            if pts:
                ax.plot([p.items_per_s for p in pts], [p.p99_ms for p in pts], marker="o",
                        label=f"clipserve gateway {precision}")
                for p in pts:
                    ax.annotate(f"{p.load:g}", (p.items_per_s, p.p99_ms), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        for dtype, entry in (model.peer.dtypes if model.peer else {}).items():
            pts = _points(entry.runs)
            if pts and entry.status == "ok":
                ax.plot([p.items_per_s for p in pts], [p.p99_ms for p in pts], marker="s",
                        linestyle="--", label=f"infinity-emb {dtype}")
                for p in pts:
                    ax.annotate(f"{p.load:g}", (p.items_per_s, p.p99_ms), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("images/s")
        ax.set_ylabel("p99 latency (ms, log)")
        ax.set_yscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{scale}: p99 against throughput (labels: concurrent callers)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label without the png sweep
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{scale}-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- markdown -----------------------------------------------------------------------------

def _f(value, fmt="{:.1f}", none="-") -> str:
    return none if value is None else fmt.format(value)


def _pct(value) -> str:
    return _f(value, "{:.0%}")


def _x(value) -> str:
    return _f(value, "{:.2f}x")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _target_value(t: Target) -> str:
    return f"{t.value:.2f} ms" if t.unit == "ms" else f"{t.value:.1%}"


def _target_threshold(t: Target) -> str:
    return f"{t.op} {t.threshold:g} ms" if t.unit == "ms" else f"{t.op} {t.threshold:.0%}"


def before_after_lines(before: BenchResults | dict, after: BenchResults | dict,
                       before_name: str = "before") -> list[str]:
    """The targets of an earlier run (``before``, e.g. a bench.json from git history) beside
    this run's, matched by model, precision and target. Every target is a ratio or a time
    measured side by side inside its own run, so two runs compare by them, not by absolute
    items/s (each run's machine and load are printed with it)."""
    before, after = typed(before), typed(after)
    old = {(t.scale, t.precision, t.target): t for t in analyze(before).targets}
    rows = []
    for t in analyze(after).targets:
        b = old.get((t.scale, t.precision, t.target))
        change = "-"
        if b is not None:
            change = (f"{t.value - b.value:+.2f} ms" if t.unit == "ms"
                      else f"{(t.value - b.value) * 100:+.1f} pts")
        rows.append([t.scale, t.precision, t.target, _target_value(b) if b else "-",
                     _target_value(t), change, _target_threshold(t), t.verdict()])

    def where(r: BenchResults) -> str:
        m = r.machine
        return (f"{r.started_at or '?'} on {m.get('cpu') or '?'} ({m.get('cores')} cores), "
                f"load average {m.get('loadavg_start', [0])[0]:.2f} at its start")
    return [f"{before_name}: {where(before)}. After: this run, {where(after)}.", "",
            *_table(["model", "precision", "target", "before", "after", "change", "wanted",
                     "now"], rows), ""]


def markdown(results: BenchResults | dict, plots: list[Path], base: Path,
             before: tuple[str, BenchResults | dict] | None = None) -> str:
    """BENCHMARKS.md from the results; ``plots`` are linked relative to ``base``; ``before``:
    (its description, an earlier run's results) for a before/after table of the targets."""
    results = typed(results)
    analysis = analyze(results)
    cfg, machine = results.config, results.machine
    n = results.concurrency
    gflops = results.attainable_gflops
    load_start, load_end = machine.get("loadavg_start", [0])[0], machine.get("loadavg_end", [0])[0]
    lines = [
        "# clipserve benchmarks",
        "",
        "Generated by one command, rerunnable on any machine:",
        "",
        "```bash",
        results.command,
        "```",
        "",
        f"Run {results.started_at or '?'}, {results.wall_s / 60:.1f} min, on "
        f"{machine.get('cpu') or 'an unknown CPU'} ({machine.get('cores')} cores), Python "
        f"{machine.get('python')}, " + ", ".join(f"{k} {v}" for k, v in
                                                 machine.get("versions", {}).items()) + ".",
        f"CPU: {machine.get('cpu_info', {}).get('describe', 'flags not recorded')}.",
        f"Load average {load_start:.2f} at the start and {load_end:.2f} at the end (the end "
        "includes the benchmark's own processes)"
        + (": the machine was **not idle** when it started, other work shared the cores, so "
           "absolute numbers are low and noisy; ratios within the run are the meaningful part."
           if load_start > 1.0 else "; it was idle when it started."),
        "",
        "What is measured (all on 127.0.0.1, single-image requests of the same built-in digit "
        "images, encoded as PNG at the model's input size; "
        + ("Triton direct's client gets the same encoded images and decodes and resizes every "
           "call's itself, with the gateway's decoder in the load generator's process, so both "
           "sides pay for decoding):" if cfg.get("direct_decode") else
           "Triton direct gets the same images decoded to uint8 pixels once, up front, as a "
           "client that already holds pixels would send them):"),
        "",
        f"- **raw ORT**: onnxruntime in-process on the exported `model.onnx`, batch sizes "
        f"{', '.join(cfg['ort_batches'])}, best kept: the ceiling.",
        f"- **Triton direct**: `tritonclient` gRPC to the same Triton (Python backend running "
        f"the runtime the export chose per endpoint, onnxruntime or OpenVINO; dynamic batching "
        f"on), {n} concurrent callers for throughput, 1 for latency.",
        "- **gateway**: the clipserve gateway (`clipserve serve --triton-url`) in front of that "
        "Triton, same load, routed by `x-clip-precision`.",
        *(["- **peer**: infinity-emb serving the same architecture with random weights from a "
           "local Hugging Face directory, in its own virtualenv, same images and callers."]
          if cfg.get("peer", True) else ["- **peer**: not measured in this run (`--no-peer`)."]),
        f"- Closed loops: {cfg['duration']:g} s measured per throughput step, "
        f"{cfg['latency_duration']:g} s per one-caller step, each after {cfg['warmup']:g} s of "
        "warm-up; p50/p99 are nearest-rank over every request in the window.",
        "",
    ]
    lines += ["## Targets", ""]
    target_rows = []
    for t in analysis.targets:
        target_rows.append([t.scale, t.precision, t.target, _target_value(t),
                            _target_threshold(t), t.verdict()])
    lines += _table(["model", "precision", "target", "measured", "wanted", "verdict"],
                    target_rows)
    lines.append("")
    if before is not None:
        lines += ["## Before and after", "", *before_after_lines(before[1], results, before[0])]

    for spec, model in results.models.items():
        rows = analysis.models[spec].rows
        scale = model.scale
        lines += [f"## {scale} ({spec}), {model.image_size}x{model.image_size} images", ""]
        if model.export_current is False:
            lines += [f"The repository ({model.repository}) was exported before the latest "
                      "change to the export stage and reused; rerun with `--reexport` to "
                      "measure a fresh export.", ""]
        lines += _table(
            ["precision", "model MB", "raw ORT img/s (batch)", f"Triton img/s @{n}",
             f"gateway img/s @{n}", "gateway/Triton", "p50 Triton/gateway @1 (ms)",
             "added p50 / p99 @1 (ms)", f"p99 Triton/gateway @{n} (ms)", "batching eff.",
             "errors"],
            [[p, _f(r.model_mb), f"{r.ort_best:.1f} ({r.ort_batch})", _f(r.triton),
              _f(r.gateway), _pct(r.gateway_ratio),
              f"{_f(r.triton_1 and r.triton_1.p50, '{:.2f}')} / "
              f"{_f(r.gateway_1 and r.gateway_1.p50, '{:.2f}')}",
              f"{_f(r.added_p50, '{:+.2f}')} / {_f(r.added_p99, '{:+.2f}')}",
              f"{_f(r.triton_n and r.triton_n.p99, '{:.0f}')} / "
              f"{_f(r.gateway_n and r.gateway_n.p99, '{:.0f}')}",
              _pct(r.batching_efficiency), str(r.errors)] for p, r in rows.items()])
        lines.append("")
        if "fp32" in rows:
            lines += ["Precision against FP32 (throughput ratios; size of the image tower's "
                      "ONNX file):", ""]
            lines += _table(["precision", "raw ORT", "Triton direct", "gateway", "size"],
                            [[p, _x(r.speedup["ort"]), _x(r.speedup["triton"]),
                              _x(r.speedup["gateway"]), _x(r.size_ratio)]
                             for p, r in rows.items() if p != "fp32"])
            lines.append("")
        if gflops:
            lines += [f"Roofline: the image tower costs {model.image_flops / 1e9:.3f} GFLOP per "
                      f"image (MatMul/Gemm/Conv of the FP32 ONNX graph at batch 1, 2 FLOPs per "
                      f"multiply-add); a {results.matmul_n}-square float32 matmul "
                      f"reaches {gflops:.1f} GFLOP/s here. Quantized rows count the same "
                      "(FP32-equivalent) FLOPs, so above 100% means the precision does less work "
                      "than FP32 arithmetic would.", ""]
            lines += _table(["precision", "raw ORT GFLOP/s", "of attainable",
                             f"gateway @{n} of attainable"],
                            [[p, _f(r.ort_gflops), _pct(r.ort_roofline),
                              _pct(r.gateway_roofline)] for p, r in rows.items()])
            lines.append("")
        if model.runtime_axis:
            from .runtime_bench import table_lines

            lines += [f"Runtime axis (in process, batch {cfg.get('runtime_batch')}, "
                      f"{cfg.get('runtime_threads') or 'all'} threads; each precision at its own "
                      "peak: " + "; ".join(f"{p} {v['factor']:g}x fp32 ({v['assumes']})"
                                          for p, v in (model.peaks or {}).items()) + "):", ""]
            lines += table_lines(model.runtime_axis)
            lines.append("")
        lines += workload_lines(analysis.models[spec].workloads, n)
        peer = model.peer
        if peer:
            lines += ["### Against the peer (infinity-emb)", ""]
            if peer.status != "ok":
                lines += [f"Peer not measured: {peer.reason or peer.error}", ""]
            else:
                lines += [f"infinity-emb {' / torch '.join(peer.versions)}, "
                          "`--engine torch --device cpu`, its own dynamic batching (batch 32). "
                          "Both swept over concurrent callers; *at equal p99* reads clipserve's "
                          "sweep at the p99 the peer had at its best throughput (interpolated "
                          "between steps).", ""]
                table_rows = []
                for pr in analysis.models[spec].peer:
                    if pr.status != "ok" or pr.peer is None:
                        what = ("failed: " + (pr.error.splitlines() or [""])[0][:120]
                                if pr.status != "ok" else
                                f"not compared: no gateway runs at {pr.precision}")
                        table_rows.append([pr.dtype, pr.precision or "-", what, "-", "-", "-"])
                        continue
                    steps = ", ".join(f"{p.load:g}: {p.items_per_s:.1f}/s p99 "
                                      f"{_f(p.p99_ms, '{:.0f}')} ms" for p in pr.peer_points)
                    cs = ", ".join(f"{p.load:g}: {p.items_per_s:.1f}/s p99 "
                                   f"{_f(p.p99_ms, '{:.0f}')} ms" for p in pr.clipserve_points)
                    table_rows.append([pr.dtype, pr.precision, steps, cs,
                                       f"{pr.budget_ms:.0f} ms: {pr.clipserve:.1f} vs "
                                       f"{pr.peer:.1f}", _x(pr.ratio)])
                lines += _table(["peer dtype", "clipserve precision", "peer (callers: img/s, p99)",
                                 "clipserve gateway (callers: img/s, p99)",
                                 "img/s at equal p99 (clipserve vs peer)", "ratio"], table_rows)
                lines.append("")
        for path in plots:
            if path.name.startswith(f"{scale}-"):
                lines.append(f"![{path.stem}]({_relative(path, base)})")
        lines.append("")

    lines += ["## Why targets were missed", ""]
    missed = [t for t in analysis.targets if not t.met]
    if not missed:
        lines += ["Every target was met.", ""]
    for t in missed:
        lines.append(f"- **{t.scale} {t.precision}, {t.target}** ({t.verdict()}): {t.why}.")
    lines.append("")
    lines += ["## Evidence", ""]
    for spec, model in results.models.items():
        rows = analysis.models[spec].rows
        lines += [f"### {model.scale}: Triton's own statistics at {n} callers", ""]
        ev_rows = []
        for p, r in rows.items():
            for stack, run in (("direct", r.triton_n), ("gateway", r.gateway_n)):
                st = (run and run.triton_stats) or TritonStats()
                ev_rows.append([p, stack, _f(st.avg_batch, "{:.2f}"),
                                _f(st.queue_ms_per_request), _f(st.compute_ms_per_execution),
                                _f(st.compute_ms_per_item, "{:.2f}"),
                                (run and _cpu_text(run.cpu)) or "-"])
        lines += _table(["precision", "load", "avg batch", "queue ms/request",
                         "compute ms/batch", "compute ms/item", "CPU ms per image by process"],
                        ev_rows)
        lines.append("")
        prof = model.profile
        lines += [f"### {model.scale}: gateway profile"
                  + (f" (py-spy, {prof.precision}, {prof.concurrency} callers)" if prof else ""),
                  ""]
        if prof is None:
            lines += ["No profile was taken in this run.", ""]
        elif not prof.ok:
            lines += [f"Not available: {prof.status}", ""]
        else:
            areas = ", ".join(f"{k} {v:.0f}%" for k, v in prof.by_area)
            lines += [f"{prof.samples} busy samples of the gateway's threads at 100 Hz "
                      f"({prof.idle_samples} waiting ones left out); self time by "
                      f"area: {areas}. Top functions by self time:", ""]
            lines += [f"- {name}: {pct:.1f}%" for name, pct in prof.top_self]
            lines.append("")
    lines += ["Raw numbers: `bench.json` next to the plots (every run's summary, Triton "
              "statistics and CPU per process).", ""]
    return "\n".join(lines)


def workload_lines(rows: list[WorkloadRow], n: int) -> list[str]:
    """The workloads table (gateway CPU per item, cores per GPU) with its assumptions."""
    if not rows:
        return []
    precision = rows[0].result.precision
    lines = [f"### Workloads at {precision}, {n} callers: gateway CPU per item and cores per GPU",
             "", "Single-item calls. *prep* is the gateway's input preparation (decode, "
             "reduced-scale JPEG, resize and crop for images; tokenization for texts) timed on "
             "one thread of the benchmark's process with the gateway's code; *excl. prep* is "
             "the gateway's measured CPU per item less that. Triton direct's client prepares "
             "its inputs the same way in the load generator's process, so its *client* CPU "
             "includes prep. Every process shares the same cores and the direct client is "
             "one process preparing inputs for every caller, so where preparation is heavy "
             "(jpeg) that client can be the slower side (gateway/Triton above 100%): compare "
             "the CPU columns.", ""]
    ran = [r for r in rows if r.result.status == "ok"]
    given = [r for r in ran if r.rate_given]
    measured = [r for r in ran if not r.rate_given and r.rate]
    if given:
        lines += ["Cores per GPU, **assumed** rate: " + ", ".join(
            f"{r.result.name} {r.gpu_rate.describe()}" for r in given)
            + " (given with `--gpu-items-per-s`, not measured in this run)."]
    if measured:
        lines += ["Cores for " + ", ".join(r.result.name for r in measured) + ": at the "
                  "Triton-direct throughput measured in this run on this CPU (no GPU figure "
                  "given; pass `--gpu-items-per-s SCALE[:WORKLOAD]=N` to size for a GPU's "
                  "Triton)."]
    lines += ["Cores = gateway CPU ms per item x items/s / 1000: assumes the CPU per item "
              f"measured at {n} callers holds at that rate and that cores add up linearly "
              "(`clipserve serve --workers N`).", ""]
    table = []
    for r in rows:
        w = r.result
        if w.status != "ok":
            table.append([w.name, w.description, f"skipped: {w.reason}"] + ["-"] * 9)
            continue
        tri_cpu = r.triton_n.cpu if r.triton_n else CpuPerItem()
        gw_cpu = r.gateway_n.cpu if r.gateway_n else CpuPerItem()
        size = f", {w.input_bytes_mean / 1000:.1f} KB" if w.input_bytes_mean else ""
        table.append([
            w.name, w.description + size,
            _f(r.triton_n and r.triton_n.items_per_s), _f(r.gateway_n and r.gateway_n.items_per_s),
            _pct(r.gateway_ratio),
            f"{_f(r.triton_1 and r.triton_1.p50, '{:.2f}')} / "
            f"{_f(r.gateway_1 and r.gateway_1.p50, '{:.2f}')}",
            _f(w.prep_ms_per_item, "{:.3f}"),
            f"{_f(tri_cpu.ms.get('client'), '{:.2f}')} / {_f(tri_cpu.ms.get(TRITON), '{:.2f}')}",
            f"{_f(gw_cpu.ms.get(GATEWAY), '{:.2f}')} / {_f(gw_cpu.ms.get(TRITON), '{:.2f}')} / "
            f"{_f(gw_cpu.ms.get('client'), '{:.2f}')}",
            _f(r.gateway_cpu_excl_prep_ms, "{:.2f}"),
            _f(r.rate, "{:.0f}") + (" (given)" if r.rate_given else " (measured)"),
            f"{_f(r.cores(r.gateway_cpu_ms), '{:.2f}')} "
            f"({_f(r.cores(r.gateway_cpu_excl_prep_ms), '{:.2f}')})"
            + (f"; {r.errors} errors" if r.errors else "")])
    lines += _table(["workload", "calls", f"Triton direct items/s @{n}",
                     f"gateway items/s @{n}", "gateway/Triton", "p50 Triton/gateway @1 (ms)",
                     "prep CPU ms/item (1 thread)", "direct run CPU ms/item: client / Triton",
                     "gateway run CPU ms/item: gateway / Triton / client",
                     "gateway CPU ms/item excl. prep", "items/s sized for",
                     "gateway cores at that rate (excl. prep)"], table)
    lines.append("")
    return lines


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


SECTION_START = "<!-- bench:start (written by python -m clipserve.loadtest.bench) -->"
SECTION_END = "<!-- bench:end -->"


def write_section(path: Path, markdown: str) -> None:
    """Put the benchmark's Markdown at the head of ``path`` between its markers, in place of
    the previous run's, leaving every other section of the file as it is."""
    section = f"{SECTION_START}\n{markdown.rstrip()}\n{SECTION_END}\n"
    if path.is_file() and SECTION_START in path.read_text():
        replace_section(path, section, SECTION_START, SECTION_END)
    else:  # a new file, or one from before the markers: the section goes first
        rest = path.read_text() if path.is_file() else ""
        path.write_text(section + ("\n" + rest if rest else ""))


def main(argv: list[str] | None = None) -> int:
    """Regenerate the plots and the markdown from a saved bench.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.bench_report",
                                     description=main.__doc__)
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("markdown", type=Path)
    parser.add_argument("--before", type=Path, help="an earlier run's bench.json (e.g. "
                        "`git show REV:benchmarks/bench.json`): its targets beside this run's")
    parser.add_argument("--before-name", default="", help="how the report names that run "
                        "(default: 'Before')")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    bench_json, md = args.bench_json, args.markdown
    results = BenchResults.from_dict(json.loads(bench_json.read_text()))
    before = None
    if args.before:
        before = (args.before_name or "Before",
                  BenchResults.from_dict(json.loads(args.before.read_text())))
    plots = plot_all(results, bench_json.parent)
    write_section(md, markdown(results, plots, md.resolve().parent, before))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
