"""What the benchmark measured, as types: :mod:`.bench` builds these, :mod:`.bench_report`
reads them by attribute, and ``bench.json`` is their :meth:`BenchResults.to_dict`.

The JSON keys are the ones bench.json has always had (``loadtest.compare`` and saved runs read
them), so :meth:`BenchResults.from_dict` reads old files too: fields a file lacks take their
defaults (older runs have no ``rounds``, ``gateways``, ``runtime_axis``, ``workloads`` or profile).
Concurrencies and batch sizes are ints here and strings in JSON (JSON object keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRITON = "triton"  # the Triton-direct stack's name among a precision's stacks
GATEWAY = "gateway"  # the gateway variant the report is about


def _int_keys(data: dict) -> dict[int, Any]:
    return {int(k): v for k, v in sorted(data.items(), key=lambda kv: int(kv[0]))}


@dataclass(frozen=True)
class TritonStats:
    """What Triton did during one run, from the difference of two statistics snapshots.

    Only ``executions`` and ``items`` are known when Triton ran nothing in the window; the
    rest is then None (and left out of the JSON)."""

    executions: int = 0
    items: int = 0
    avg_batch: float | None = None
    queue_ms_per_request: float | None = None
    compute_ms_per_execution: float | None = None
    compute_ms_per_item: float | None = None
    input_output_ms_per_request: float | None = None

    @classmethod
    def delta(cls, before: dict, after: dict) -> "TritonStats":
        """From two snapshots of Triton's cumulative statistics (see ``bench.triton_stats``)."""
        executions = after["execution_count"] - before["execution_count"]
        items = after["inference_count"] - before["inference_count"]
        requests = after["success"][0] - before["success"][0]
        if not executions or not requests:
            return cls(executions=executions, items=items)

        def per_request_ms(name):
            return (after[name][1] - before[name][1]) / requests / 1e6
        # Triton charges each request of a batch the whole batch's compute time.
        infer_ms = per_request_ms("compute_infer")
        avg_batch = items / executions
        return cls(executions=executions, items=items, avg_batch=round(avg_batch, 3),
                   queue_ms_per_request=round(per_request_ms("queue"), 3),
                   compute_ms_per_execution=round(infer_ms, 3),
                   compute_ms_per_item=round(infer_ms / avg_batch, 3),
                   input_output_ms_per_request=round(per_request_ms("compute_input")
                                                     + per_request_ms("compute_output"), 3))

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict | None) -> "TritonStats":
        return cls(**(data or {}))


@dataclass(frozen=True)
class CpuPerItem:
    """CPU milliseconds per item of each process group during one run. Group names are the
    stacks' ("triton", each gateway variant, "peer") and "client", the load generator."""

    ms: dict[str, float] = field(default_factory=dict)

    def of(self, *groups: str) -> float:
        """The sum over ``groups`` (0 for a group not measured)."""
        return sum(self.ms.get(g, 0.0) for g in groups)

    def __bool__(self) -> bool:
        return bool(self.ms)


@dataclass(frozen=True)
class RunSummary:
    """One closed-loop run of one stack at one concurrency."""

    concurrency: int
    requests: int
    ok: int
    items: int
    duration_s: float
    items_per_s: float
    error_rate: float
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # "p50", "p99", ...
    cpu: CpuPerItem = field(default_factory=CpuPerItem)
    triton_stats: TritonStats | None = None  # None for stacks without Triton (the peer)

    @property
    def p50(self) -> float | None:
        return self.latency_ms.get("p50")

    @property
    def p99(self) -> float | None:
        return self.latency_ms.get("p99")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        data = {"requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
                "error_rate": self.error_rate, "items": self.items,
                "duration_s": self.duration_s, "items_per_s": self.items_per_s,
                "latency_ms": dict(self.latency_ms), "concurrency": self.concurrency}
        if self.cpu:
            data["cpu_ms_per_item"] = dict(self.cpu.ms)
        if self.triton_stats is not None:
            data["triton_stats"] = self.triton_stats.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunSummary":
        stats = data.get("triton_stats")
        return cls(concurrency=int(data["concurrency"]), requests=data["requests"],
                   ok=data["ok"], items=data["items"], duration_s=data["duration_s"],
                   items_per_s=data["items_per_s"], error_rate=data["error_rate"],
                   errors=dict(data.get("errors") or {}),
                   latency_ms=dict(data.get("latency_ms") or {}),
                   cpu=CpuPerItem(dict(data.get("cpu_ms_per_item") or {})),
                   triton_stats=None if stats is None else TritonStats.from_dict(stats))


def _runs_to_dict(runs: dict[int, RunSummary]) -> dict:
    return {str(c): r.to_dict() for c, r in runs.items()}


def _runs_from_dict(data: dict | None) -> dict[int, RunSummary]:
    return {c: RunSummary.from_dict(r) for c, r in _int_keys(data or {}).items()}


@dataclass(frozen=True)
class StackRuns:
    """One stack (Triton direct or a gateway variant) at one precision: its runs by
    concurrency in every round (``bench --rounds``); the report reads the first round."""

    rounds: tuple[dict[int, RunSummary], ...] = ()

    @property
    def runs(self) -> dict[int, RunSummary]:
        return self.rounds[0] if self.rounds else {}

    def at(self, concurrency: int) -> RunSummary | None:
        return self.runs.get(concurrency)

    def to_dict(self) -> dict:
        return {"runs": _runs_to_dict(self.runs), "rounds": [_runs_to_dict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict) -> "StackRuns":
        rounds = tuple(_runs_from_dict(r) for r in data.get("rounds") or ())
        return cls(rounds=rounds or ((_runs_from_dict(data.get("runs")),)
                                     if data.get("runs") else ()))


@dataclass(frozen=True)
class OrtResult:
    """Raw onnxruntime in process: items/s by batch size and the best of them."""

    by_batch: dict[int, float]
    best_batch: int
    best_items_per_s: float

    def to_dict(self) -> dict:
        return {"by_batch": {str(b): v for b, v in self.by_batch.items()},
                "best_batch": self.best_batch, "best_items_per_s": self.best_items_per_s}

    @classmethod
    def from_dict(cls, data: dict) -> "OrtResult":
        return cls(by_batch=_int_keys(data["by_batch"]), best_batch=int(data["best_batch"]),
                   best_items_per_s=data["best_items_per_s"])


@dataclass(frozen=True)
class PrecisionResult:
    """Everything measured at one precision of one model. ``stacks`` holds Triton direct
    (:data:`TRITON`) and each gateway variant by name (:data:`GATEWAY` is the report's)."""

    model_bytes: int
    ort: OrtResult
    stacks: dict[str, StackRuns] = field(default_factory=dict)

    def run(self, stack: str, concurrency: int) -> RunSummary | None:
        runs = self.stacks.get(stack)
        return None if runs is None else runs.at(concurrency)

    def to_dict(self) -> dict:
        return {"model_bytes": self.model_bytes, "ort": self.ort.to_dict(),
                **{name: s.to_dict() for name, s in self.stacks.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PrecisionResult":
        stacks = {k: StackRuns.from_dict(v) for k, v in data.items()
                  if isinstance(v, dict) and "runs" in v}
        return cls(model_bytes=data["model_bytes"], ort=OrtResult.from_dict(data["ort"]),
                   stacks=stacks)


@dataclass(frozen=True)
class Profile:
    """The py-spy profile of the gateway during one throughput run.

    ``status`` is "ok" or why there is no profile ("py-spy not installed", ...).
    ``by_area`` is self time by bucket (``bench_report._BUCKETS`` plus "other") and
    ``top_self`` by leaf function, both as (name, percent of busy samples), largest first."""

    status: str
    precision: str = ""
    concurrency: int = 0
    samples: int = 0
    idle_samples: int = 0
    top_self: tuple[tuple[str, float], ...] = ()
    by_area: tuple[tuple[str, float], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.samples > 0

    def to_dict(self) -> dict:
        data = {"precision": self.precision, "concurrency": self.concurrency,
                "status": self.status}
        if self.status == "ok":
            data.update(samples=self.samples, idle_samples=self.idle_samples,
                        top_self=[[n, p] for n, p in self.top_self],
                        by_area=dict(self.by_area))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        by_area = sorted((data.get("by_area") or {}).items(), key=lambda kv: -kv[1])
        return cls(status=data.get("status", "unknown"), precision=data.get("precision", ""),
                   concurrency=int(data.get("concurrency") or 0),
                   samples=int(data.get("samples") or 0),
                   idle_samples=int(data.get("idle_samples") or 0),
                   top_self=tuple((n, p) for n, p in data.get("top_self") or ()),
                   by_area=tuple(by_area))


@dataclass(frozen=True)
class PeerDtype:
    """The peer at one of its dtypes, swept over concurrency like the gateway."""

    precision: str  # the clipserve precision it is compared with
    status: str = "ok"  # or "failed"
    runs: dict[int, RunSummary] = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict:
        data = {"precision": self.precision, "runs": _runs_to_dict(self.runs),
                "status": self.status}
        if self.error:
            data["error"] = self.error
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PeerDtype":
        return cls(precision=data.get("precision") or "", status=data.get("status", "failed"),
                   runs=_runs_from_dict(data.get("runs")), error=data.get("error", ""))


@dataclass(frozen=True)
class PeerResult:
    """The peer (infinity-emb): "ok" with its dtypes, or "skipped"/"failed" with why."""

    status: str
    server: str = ""
    versions: tuple[str, ...] = ()
    dtypes: dict[str, PeerDtype] = field(default_factory=dict)
    reason: str = ""
    error: str = ""

    def to_dict(self) -> dict:
        data: dict = {"status": self.status}
        if self.status == "ok":
            data.update(server=self.server, versions=list(self.versions),
                        dtypes={k: v.to_dict() for k, v in self.dtypes.items()})
        if self.reason:
            data["reason"] = self.reason
        if self.error:
            data["error"] = self.error
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PeerResult":
        return cls(status=data.get("status", "failed"), server=data.get("server", ""),
                   versions=tuple(data.get("versions") or ()),
                   dtypes={k: PeerDtype.from_dict(v)
                           for k, v in (data.get("dtypes") or {}).items()},
                   reason=data.get("reason", ""), error=data.get("error", ""))


@dataclass(frozen=True)
class WorkloadResult:
    """One workload (a kind of call and its inputs, ``bench --workloads``) on one model at one
    precision: Triton direct (:data:`TRITON`) and the gateway variants, runs by concurrency.

    ``prep_ms_per_item`` is the CPU ms one thread spends turning one input into what Triton
    takes (decode and resize an image, or tokenize a text), measured in the benchmark's own
    process with the gateway's code: the part of the gateway's CPU per item that is input
    preparation rather than serving. ``status`` is "ok", or "skipped" with ``reason``."""

    name: str
    kind: str  # "image", "text" or "classify" (loadtest.workload.KINDS)
    precision: str
    description: str = ""
    prep_ms_per_item: float | None = None
    input_bytes_mean: float | None = None
    stacks: dict[str, StackRuns] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""

    def run(self, stack: str, concurrency: int) -> RunSummary | None:
        runs = self.stacks.get(stack)
        return None if runs is None else runs.at(concurrency)

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "precision": self.precision,
                "description": self.description, "status": self.status,
                "stacks": {k: v.to_dict() for k, v in self.stacks.items()}}
        for key in ("prep_ms_per_item", "input_bytes_mean"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "WorkloadResult":
        return cls(name=data["name"], kind=data["kind"], precision=data.get("precision", ""),
                   description=data.get("description", ""),
                   prep_ms_per_item=data.get("prep_ms_per_item"),
                   input_bytes_mean=data.get("input_bytes_mean"),
                   stacks={k: StackRuns.from_dict(v)
                           for k, v in (data.get("stacks") or {}).items()},
                   status=data.get("status", "ok"), reason=data.get("reason", ""))


@dataclass(frozen=True)
class ModelResult:
    """Everything measured for one model, by precision."""

    spec: str
    scale: str
    image_size: int
    repository: str
    export_current: bool
    image_flops: int
    flops_by_op: dict[str, int] = field(default_factory=dict)
    flops_uncounted: int = 0
    precisions: dict[str, PrecisionResult] = field(default_factory=dict)
    gateways: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant -> its flags
    profile: Profile | None = None  # None: profiling was off (--no-profile) or not reached
    peer: PeerResult | None = None
    runtime_axis: list[dict] | None = None  # runtime_bench.measure's rows, as they come
    peaks: dict | None = None
    workloads: dict[str, WorkloadResult] = field(default_factory=dict)  # by workload name

    def to_dict(self) -> dict:
        data: dict = {"spec": self.spec, "scale": self.scale, "image_size": self.image_size,
                      "repository": self.repository, "export_current": self.export_current,
                      "image_flops": self.image_flops, "flops_by_op": dict(self.flops_by_op),
                      "flops_uncounted": self.flops_uncounted,
                      "precisions": {k: v.to_dict() for k, v in self.precisions.items()}}
        if self.runtime_axis is not None:
            data["runtime_axis"] = self.runtime_axis
        if self.peaks is not None:
            data["peaks"] = self.peaks
        if self.gateways:
            data["gateways"] = {k: list(v) for k, v in self.gateways.items()}
        if self.profile is not None:
            data["gateway_profile"] = self.profile.to_dict()
        if self.peer is not None:
            data["peer"] = self.peer.to_dict()
        if self.workloads:
            data["workloads"] = {k: v.to_dict() for k, v in self.workloads.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelResult":
        profile, peer = data.get("gateway_profile"), data.get("peer")
        return cls(spec=data["spec"], scale=data["scale"], image_size=data["image_size"],
                   repository=data.get("repository", ""),
                   export_current=data.get("export_current", True),
                   image_flops=data["image_flops"], flops_by_op=dict(data.get("flops_by_op") or {}),
                   flops_uncounted=data.get("flops_uncounted", 0),
                   precisions={k: PrecisionResult.from_dict(v)
                               for k, v in data["precisions"].items()},
                   gateways={k: tuple(v) for k, v in (data.get("gateways") or {}).items()},
                   profile=Profile.from_dict(profile) if profile else None,
                   peer=PeerResult.from_dict(peer) if peer else None,
                   runtime_axis=data.get("runtime_axis"), peaks=data.get("peaks"),
                   workloads={k: WorkloadResult.from_dict(v)
                              for k, v in (data.get("workloads") or {}).items()})


@dataclass(frozen=True)
class BenchResults:
    """One benchmark run: what ``<out>/bench.json`` holds. ``config`` is the run's
    ``BenchConfig`` as a dict and ``machine`` what ``bench.machine_info`` found (both echoes,
    read for the report's header)."""

    config: dict
    machine: dict
    models: dict[str, ModelResult]
    attainable_gflops: float | None = None  # the roofline matmul's
    matmul_n: int = 0
    version: int = 1
    started_at: str = ""
    command: str = "python -m clipserve.loadtest.bench"
    wall_s: float = 0.0

    @property
    def concurrency(self) -> int:
        return int(self.config["concurrency"])

    def to_dict(self) -> dict:
        data: dict = {"version": self.version, "started_at": self.started_at,
                      "command": self.command, "config": self.config, "machine": self.machine,
                      "models": {k: v.to_dict() for k, v in self.models.items()}}
        if self.attainable_gflops is not None:
            data["roofline"] = {"attainable_gflops": self.attainable_gflops,
                                "matmul_n": self.matmul_n}
        data["wall_s"] = self.wall_s
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResults":
        roof = data.get("roofline") or {}
        return cls(config=data["config"], machine=data.get("machine") or {},
                   models={k: ModelResult.from_dict(v) for k, v in data["models"].items()},
                   attainable_gflops=roof.get("attainable_gflops"),
                   matmul_n=roof.get("matmul_n", 0), version=data.get("version", 1),
                   started_at=data.get("started_at", ""),
                   command=data.get("command", "python -m clipserve.loadtest.bench"),
                   wall_s=data.get("wall_s", 0.0))
