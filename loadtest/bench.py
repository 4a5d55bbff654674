"""The side-by-side benchmark: one command, one machine, the same model and images everywhere.

    python -m clipserve.loadtest.bench --out benchmarks      # writes BENCHMARKS.md too

For each model (random-init ViT-B-32 and the built-in default, digits-s) and precision it
measures, in order:

1. raw onnxruntime in-process on the exported ``model.onnx`` at several batch sizes (the
   ceiling; the best batch is kept),
2. Triton directly through ``tritonclient`` (single-image requests, N concurrent callers,
   dynamic batching on), at 1 caller for latency and N for throughput; the client decodes
   every call's images itself with the gateway's decoder (``--no-direct-decode``: once, up
   front), so both sides pay for decoding,
3. the clipserve gateway in front of the same Triton, same load,
4. the peer, infinity-emb, serving the same architecture with random weights from a local
   Hugging Face directory, installed into its own virtualenv here (ViT architectures only),
   swept over concurrency like the gateway so the two compare at equal p99,

then, at ``--workload-precision``, the other workloads (``--workloads``, see
:mod:`.bench_workloads`: 640x480 JPEG photos, EmbedTexts, Classify) on Triton direct and the
gateway at N callers, with the input preparation (decode, tokenize) timed apart so the report
can give the gateway's CPU per item with and without it, and the gateway cores one GPU would
need (at ``--gpu-items-per-s`` when given, else at the Triton throughput measured here);
plus the roofline (image-tower FLOPs against a large matmul's GFLOP/s), Triton's own batch
statistics, CPU time per image of each process, and a py-spy profile of the gateway. The
results are typed (:class:`.bench_results.BenchResults`) and go to ``<out>/bench.json`` and
PNGs, and the report to BENCHMARKS.md (see :mod:`.bench_report`).
Exported repositories, the peer virtualenv and its model directory are cached under
``--bench-cache-dir``; the first run builds them (the ViT-B-32 export takes about half an hour
on 2 cores).
Everything listens on 127.0.0.1 and every load step is bounded in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipserve.config import add_flags, describe, from_args
from clipserve.endpoints import Precision, Tower, endpoint_name
from clipserve.procs import free_port, group_cpu_s, self_cpu_s, start_group, stop_group

from . import bench_report, roofline, runner
from . import bench_workloads as bw
from . import workload as wl
from .bench_results import (GATEWAY, TRITON, BenchResults, CpuPerItem, ModelResult, OrtResult,
                            PeerDtype, PeerResult, PrecisionResult, Profile, RunSummary,
                            StackRuns, TritonStats, WorkloadResult)

HOST = "127.0.0.1"
PEER_DTYPES = {"float32": Precision.FP32, "int8": Precision.INT8}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class BenchConfig:
    """Everything the benchmark takes (flags, or ``CLIPSERVE_<FIELD>`` env vars)."""

    models: str = field(default="ViT-B-32::none,digits-s", metadata=_help(
        "comma-separated NAME[::WEIGHTS] to export and measure (as `clipserve export`)"))
    precisions: tuple[str, ...] = field(default=("fp32", "fp16", "int8", "int4"), metadata=_help(
        "precisions to export and measure"))
    out: str = field(default="benchmarks", metadata=_help(
        "folder for bench.json and the plots"))
    markdown: str = field(default="BENCHMARKS.md", metadata=_help("the report to write"))
    bench_cache_dir: str = field(default=".cache/bench", metadata=_help(
        "exported repositories, the peer virtualenv and its model, logs"))
    export_cache_dir: str = field(default=".cache", metadata=_help(
        "the export stage's cache (trained checkpoints); the default shares the tests' cache, "
        "so the built-in model trains once for both"))
    concurrency: int = field(default=8, metadata=_help(
        "callers for the throughput runs (single-image requests)"))
    sweep: tuple[str, ...] = field(default=("1", "4"), metadata=_help(
        "extra gateway/peer concurrency steps for the equal-p99 comparison (the throughput "
        "concurrency is added)"))
    duration: float = field(default=8.0, metadata=_help("seconds measured per throughput run"))
    latency_duration: float = field(default=4.0, metadata=_help(
        "seconds measured per one-caller latency run"))
    warmup: float = field(default=1.5, metadata=_help(
        "seconds sent before each measured window"))
    ort_seconds: float = field(default=2.0, metadata=_help(
        "seconds per raw onnxruntime batch size"))
    ort_batches: tuple[str, ...] = field(default=("1", "4", "16", "64"), metadata=_help(
        "batch sizes tried for raw onnxruntime (up to the model's max batch; a size whose "
        "single run would take over twice --ort-seconds is skipped)"))
    peer: bool = field(default=True, metadata=_help("benchmark infinity-emb as the peer"))
    peer_dtypes: tuple[str, ...] = field(default=("float32", "int8"), metadata=_help(
        "infinity-emb --dtype values to run (float32 ~ fp32, int8 ~ int8)"))
    runtime_axis: bool = field(default=True, metadata=_help(
        "also run each precision under each CPU runtime (onnxruntime, OpenVINO) in process "
        "at --runtime-batch/--runtime-threads, --ort-seconds each (see runtime_bench)"))
    runtime_batch: int = field(default=8, metadata=_help("batch of the runtime-axis rows"))
    runtime_threads: int = field(default=0, metadata=_help(
        "intra-op threads of the runtime-axis rows (0: all cores, as Triton's model.py)"))
    gateways: tuple[str, ...] = field(default=("gateway=--workers 1",), metadata=_help(
        "gateway variants measured side by side against the same Triton, NAME=FLAGS (extra "
        "`clipserve serve` flags, space-separated), e.g. 'gateway=--workers 1,"
        "nocoalesce=--no-coalesce --workers 1,w2=--workers 2'; the one named 'gateway' is the "
        "report's, the others are in bench.json"))
    rounds: int = field(default=1, metadata=_help(
        "measure every stack this many times per precision, in a rotated order each round "
        "(for A/B comparisons of --gateways on a noisy machine; see loadtest.compare)"))
    profile: bool = field(default=True, metadata=_help(
        "profile the gateway with py-spy during one throughput run"))
    workloads: tuple[str, ...] = field(default=("png", "jpeg", "text", "classify"),
                                       metadata=_help(
        "workloads to run (see bench_workloads): png is the precision sweep of single-image "
        "EmbedImages of digit PNGs; jpeg (640x480 photos), text (EmbedTexts) and classify "
        "(Classify) run at --workload-precision; e.g. --workloads jpeg for a quick run"))
    workload_precision: str = field(default="int8", metadata=_help(
        "the precision the jpeg/text/classify workloads run at (the fastest CPU precision: "
        "where the gateway's share of the CPU is largest)"))
    workload_latency: bool = field(default=False, metadata=_help(
        "also run the jpeg/text/classify workloads at one caller (latency), --latency-duration "
        "each; off by default to keep the full run near 20 minutes"))
    photo_count: int = field(default=16, metadata=_help(
        "distinct 640x480 JPEG photos the jpeg workload cycles through"))
    direct_decode: bool = field(default=True, metadata=_help(
        "the Triton-direct client decodes and resizes every call's images itself (the "
        "gateway's decoder, in the load generator's process), so both sides pay for decoding; "
        "--no-direct-decode: decoded once up front, as a client that already holds pixels"))
    gpu_items_per_s: tuple[str, ...] = field(default=(), metadata=_help(
        "SCALE[:WORKLOAD]=ITEMS_PER_S, or =xFACTOR of the Triton-direct rate measured in the "
        "run: the throughput one GPU's Triton is assumed to reach, for the report's gateway "
        "cores per GPU (e.g. 'ViT-B-32=2500,ViT-B-32:text=x40'); not measured here, so the "
        "report prints it as a given assumption; without one it sizes the gateway for the "
        "Triton throughput measured in this run"))
    matmul_n: int = field(default=2048, metadata=_help("side of the roofline matmul"))
    before: str = field(default="", metadata=_help(
        "an earlier run's bench.json (e.g. benchmarks/bench-before-issue10.json): the report "
        "prints its targets beside this run's (also: python -m clipserve.loadtest.bench_report "
        "BENCH_JSON MARKDOWN --before OLD)"))
    reexport: bool = field(default=False, metadata=_help(
        "export again when the export sources changed since the cached export (otherwise the "
        "cached one is used and the report says so)"))

    def __post_init__(self):
        for p in self.precisions:
            Precision.parse(p)
        for d in self.peer_dtypes:
            if d not in PEER_DTYPES:
                raise ValueError(f"unknown peer dtype {d!r}; valid: {', '.join(PEER_DTYPES)}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.before and not Path(self.before).is_file():  # not after the whole run
            raise ValueError(f"--before {self.before}: no such file (an earlier bench.json)")
        if self.concurrency < 1 or self.duration <= 0 or self.latency_duration <= 0:
            raise ValueError("concurrency and durations must be positive")
        [int(b) for b in self.ort_batches]
        names = [g.partition("=")[0].strip() for g in self.gateways]
        if not names or "" in names or len(set(names)) != len(names):
            raise ValueError(f"gateways must be distinct NAME=FLAGS entries, got "
                             f"{', '.join(self.gateways)}")
        [int(c) for c in self.sweep]
        bw.check_names(self.workloads)
        Precision.parse(self.workload_precision)
        bw.parse_gpu_rates(self.gpu_items_per_s)
        if self.photo_count < 1:
            raise ValueError(f"photo_count must be at least 1, got {self.photo_count}")

    @property
    def steps(self) -> list[int]:
        return sorted({int(c) for c in self.sweep} | {1, self.concurrency})

    @property
    def gateway_variants(self) -> dict[str, tuple[str, ...]]:
        """Variant name -> its extra `clipserve serve` flags."""
        return {name.strip(): tuple(flags.split())
                for name, _, flags in (g.partition("=") for g in self.gateways)}


class Log:
    """Progress lines with the time since the start."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.start:7.1f}s] {message}", flush=True)


# -- the gateway as a child process ------------------------------------------------------------

class GatewayProcess:
    """``clipserve serve`` as a child process in front of an already running Triton."""

    def __init__(self, repository: Path, triton_url: str, scale: str, log_path: Path,
                 extra_args: tuple[str, ...] = ()):
        self.repository, self.triton_url, self.scale = repository, triton_url, scale
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
        self.extra_args = tuple(extra_args)  # more `clipserve serve` flags (the soak's files)
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self, timeout_s: float = 120.0) -> None:
        """Start and wait for gRPC health SERVING; raises RuntimeError with the log's tail."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        cmd = [sys.executable, "-m", "clipserve.cli", "serve", "--repository",
               str(self.repository), "--triton-url", self.triton_url, "--host", HOST,
               "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--default-scale", self.scale, "--log-level", "WARNING", *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        self._proc = start_group(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        self.stop()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"the gateway did not become SERVING:\n{tail}")

    def stop(self, grace_s: float = 10.0) -> None:
        stop_group(self._proc, grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- measurements -------------------------------------------------------------------------

def ort_throughput(path: Path, pixels: np.ndarray, batches: list[int],
                   seconds: float) -> OrtResult:
    """Items/s of raw onnxruntime on ``path`` per batch size, session options as Triton's
    model.py sets them (all cores, full graph optimisation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    by_batch = {}
    seconds_per_item = 0.0
    for batch in sorted(batches):
        if by_batch and batch * seconds_per_item > 2 * seconds:
            break  # one run would take too long; larger batches gain little on a CPU anyway
        x = pixels[np.arange(batch) % len(pixels)]
        session.run(["embedding"], {"pixels": x})  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            session.run(["embedding"], {"pixels": x})
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and runs >= 2:
                break
        by_batch[batch] = batch * runs / elapsed
        seconds_per_item = 1.0 / by_batch[batch]
    best = max(by_batch, key=by_batch.get)
    return OrtResult(by_batch={b: round(v, 3) for b, v in by_batch.items()}, best_batch=best,
                     best_items_per_s=round(by_batch[best], 3))


def triton_stats(url: str, model: str) -> dict:
    """Triton's cumulative statistics for ``model`` (counts and nanoseconds)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        data = client.get_inference_statistics(model_name=model, as_json=True)
    finally:
        client.close()
    stat = data["model_stats"][0]
    inference = stat.get("inference_stats", {})

    def part(name):
        entry = inference.get(name, {})
        return int(entry.get("count", 0)), int(entry.get("ns", 0))
    return {"inference_count": int(stat.get("inference_count", 0)),
            "execution_count": int(stat.get("execution_count", 0)),
            **{name: part(name) for name in ("success", "queue", "compute_input",
                                             "compute_infer", "compute_output")}}


def stats_delta(before: dict, after: dict) -> dict:
    """What Triton did between two snapshots, as a dict (see :meth:`TritonStats.delta`)."""
    return TritonStats.delta(before, after).to_dict()


def run_summary(run: runner.RunResult, concurrency: int, cpu: dict | None = None,
                stats: TritonStats | None = None) -> RunSummary:
    """One run's summary; ``cpu`` is CPU seconds per process group over the window."""
    data = run.overall().to_dict()  # rounded as `clipserve loadtest --json` writes them
    items = data["items"]
    return RunSummary(
        concurrency=concurrency, requests=data["requests"], ok=data["ok"], items=items,
        duration_s=data["duration_s"], items_per_s=data["items_per_s"],
        error_rate=data["error_rate"], errors=data["errors"], latency_ms=data["latency_ms"],
        cpu=CpuPerItem({k: round(v * 1000 / max(items, 1), 3) for k, v in (cpu or {}).items()}),
        triton_stats=stats)


def summarize_run(run: runner.RunResult, concurrency: int, cpu: dict | None = None) -> dict:
    """:func:`run_summary` as bench.json writes it (for callers that keep dicts)."""
    return run_summary(run, concurrency, cpu).to_dict()


async def _closed(target, workload, concurrency, duration, warmup) -> runner.RunResult:
    return await runner.closed_loop(target, workload, concurrency, warmup + duration,
                                    warmup_s=warmup)


def warm(target_factory, workload, concurrency: int, timeout_s: float = 120.0) -> None:
    """Two calls per caller at ``concurrency``, unmeasured."""
    async def go():
        target = target_factory()
        try:
            await runner.closed_loop(target, workload, concurrency, timeout_s,
                                     max_requests=2 * concurrency)
        finally:
            await target.close()
    asyncio.run(go())


def measure(target_factory, workload, concurrency: int, duration: float, warmup: float,
            cpu_groups: dict[str, int]) -> tuple[runner.RunResult, dict]:
    """One closed-loop run; returns it and CPU seconds per process group over the run (and
    the load generator's own as "client")."""
    async def go():
        target = target_factory()
        try:
            return await _closed(target, workload, concurrency, duration, warmup)
        finally:
            await target.close()
    before = {name: group_cpu_s(pgid) for name, pgid in cpu_groups.items()}
    client_before = self_cpu_s()
    run = asyncio.run(go())
    cpu = {name: group_cpu_s(pgid) - before[name] for name, pgid in cpu_groups.items()}
    cpu["client"] = self_cpu_s() - client_before
    # The window is duration/(warmup+duration) of the run; scale CPU to the window.
    share = duration / (warmup + duration)
    return run, {k: v * share for k, v in cpu.items()}


# -- profiling ----------------------------------------------------------------------------

def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "100", "--format", "raw", "--output", str(out),
                             "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish_py_spy(proc: subprocess.Popen | None, out: Path, precision: str,
                  concurrency: int) -> Profile:
    """Wait for py-spy and summarise its output; a Profile whose status says why not if
    there is none."""
    where = {"precision": precision, "concurrency": concurrency}
    if proc is None:
        return Profile(status="py-spy not installed", **where)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Profile(status="py-spy did not finish", **where)
    if proc.returncode != 0 or not out.is_file():
        return Profile(status=f"py-spy failed: {(err or '').strip()[-300:]}", **where)
    return Profile.from_dict({"status": "ok", **where,
                              **bench_report.summarize_collapsed(out.read_text())})


# -- the benchmark ------------------------------------------------------------------------

_EXPORT_MARKER = "bench-export.json"  # in a cached repository: what it was exported from


def sources_digest() -> str:
    """Hash of what decides an exported repository's files: the export stage's sources and
    ``clipserve/endpoints.py``. A cached repository is reused while they match (delete
    ``<bench-cache-dir>/repositories`` to force a new export)."""
    import clipserve.endpoints
    import clipserve.export

    digest = hashlib.sha256()
    folder = Path(clipserve.export.__file__).parent
    paths = [p for p in sorted(folder.rglob("*"))
             if p.suffix in (".py", ".json") and "__pycache__" not in p.parts]
    for path in [*paths, Path(clipserve.endpoints.__file__)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_repository(spec: str, precisions: tuple[str, ...], cache: Path, export_cache: Path,
                      log: Log, reexport: bool = False) -> tuple[Path, bool]:
    """An exported repository for one model, cached under ``<cache>/repositories``.

    Reuses the export made from the current export sources at these precisions or more (the
    benchmark measures only the precisions asked for); without one, and unless ``reexport``,
    the newest such export from older sources (an export of ViT-B-32 takes many minutes, and
    most changes to the export stage do not change the ONNX files). Returns (path, whether it
    was exported from the current sources).
    """
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export

    name = spec.replace("::", "-").replace("/", "-")
    digest = sources_digest()
    key = hashlib.sha256(f"{spec}|{','.join(precisions)}|{digest}".encode()).hexdigest()[:12]
    root = cache / "repositories"
    path = root / f"{name}-{key}"
    if (path / "report.json").is_file():
        log(f"{spec}: using the exported repository {path}")
        return path, True
    # An export of the same model at more precisions serves a run that asks for fewer
    # (a quick `--precisions int8` run must not re-export ViT-B-32 for half an hour).
    exported = {p: json.loads((p / _EXPORT_MARKER).read_text())
                for p in root.glob(f"{name}-*")
                if (p / "report.json").is_file() and (p / _EXPORT_MARKER).is_file()}
    covering = {p: m for p, m in exported.items() if m.get("spec", spec) == spec
                and set(precisions) <= set(m.get("precisions") or ())}
    current = [p for p, m in covering.items() if m.get("sources") == digest]
    if current:
        newest = max(current, key=lambda p: p.stat().st_mtime)
        log(f"{spec}: using the exported repository {newest} (it has "
            f"{', '.join(covering[newest]['precisions'])})")
        return newest, True
    if not reexport and covering:
        newest = max(covering, key=lambda p: p.stat().st_mtime)
        log(f"{spec}: WARNING: the export sources changed since {newest.name} was exported; "
            "using it anyway (pass --reexport for a fresh export)")
        return newest, False
    building = path.with_name(path.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    log(f"{spec}: exporting at {', '.join(precisions)} (first run only; cached in {path})")
    export(ExportConfig(models=spec, precisions=precisions, repository=str(building),
                        cache_dir=str(export_cache), throughput_seconds=0.3),
           log=lambda line: log(f"  {line}"))
    (building / _EXPORT_MARKER).write_text(json.dumps(
        {"spec": spec, "precisions": list(precisions), "sources": digest}) + "\n")
    building.rename(path)
    return path, True


_MEASURED_GFLOPS: dict[int, float] = {}  # the run's float32 matmul, by side


def config_gflops(config: BenchConfig) -> float:
    """The float32 matmul GFLOP/s measured at the start of this run (measured now if not)."""
    if config.matmul_n not in _MEASURED_GFLOPS:
        _MEASURED_GFLOPS[config.matmul_n] = roofline.attainable_gflops(config.matmul_n, 3.0)
    return _MEASURED_GFLOPS[config.matmul_n]


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("onnxruntime", "numpy", "grpc", "tritonclient"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    try:
        from importlib.metadata import version
        versions["nvidia-pytriton"] = version("nvidia-pytriton")
    except Exception:  # not installed: reported as absent
        pass
    from clipserve import cpu as cpu_info

    detected = cpu_info.detect()
    try:
        from clipserve.export.runtimes import openvino_version
        versions["openvino"] = openvino_version()
    except ImportError:  # the export extra is missing; the runtime axis will say so
        pass
    return {"cpu": model, "cpu_info": {**detected.as_dict(), "describe": detected.describe()},
            "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "versions": versions}


def bench_model(spec: str, config: BenchConfig, cache: Path, out: Path,
                log: Log) -> ModelResult:
    """Everything measured for one model: see the module docstring."""
    from clipserve.export.models import parse_model
    from clipserve.server.repository import Catalog
    from clipserve.server.triton_process import TritonProcess

    from .targets import GatewayTarget, TritonTarget

    model_spec = parse_model(spec)
    scale = model_spec.scale
    repository, current = ensure_repository(spec, config.precisions, cache,
                                            Path(config.export_cache_dir).resolve(), log,
                                            config.reexport)
    catalog = Catalog.from_repository(repository)
    precisions = [p for p in (Precision.parse(x) for x in config.precisions)
                  if catalog.has(scale, p, Tower.IMAGE)]
    image_spec = catalog.get(scale, precisions[0], Tower.IMAGE)
    size = image_spec.sidecar.image_size
    fp32_onnx = catalog.get(scale, Precision.FP32, Tower.IMAGE).directory / "1" / "model.onnx"
    flops = roofline.onnx_flops(fp32_onnx)
    log(f"{scale}: image tower {flops['total'] / 1e9:.3f} GFLOP per image at {size}x{size}")
    pixels = wl.builtin_pixels(64, size)
    images = [wl.encode_png(p) for p in pixels]
    workload_precision, workloads, extra_inputs = _plan_workloads(
        config, catalog, scale, precisions, images, log)
    model_result = {"spec": spec, "scale": scale, "image_size": size,
                    "repository": repository.name, "export_current": current,
                    "image_flops": flops["total"], "flops_by_op": flops["by_op"],
                    "flops_uncounted": len(flops["uncounted"])}
    ort_results: dict[str, tuple[int, OrtResult]] = {}

    max_batch = image_spec.max_batch_size or 64
    batches = [b for b in (int(x) for x in config.ort_batches) if b <= max_batch]
    for p in precisions:
        spec_p = catalog.get(scale, p, Tower.IMAGE)
        onnx_path = spec_p.directory / "1" / "model.onnx"
        size_bytes = sum(f.stat().st_size for f in (spec_p.directory / "1").glob("model.onnx*"))
        log(f"{scale} {p.value}: raw onnxruntime at batch {', '.join(map(str, batches))}")
        ort_result = ort_throughput(onnx_path, pixels, batches, config.ort_seconds)
        log(f"  best {ort_result.best_items_per_s:.1f} items/s at batch "
            f"{ort_result.best_batch}")
        ort_results[p.value] = (size_bytes, ort_result)
    if config.runtime_axis:
        from clipserve import cpu as cpu_info

        from . import runtime_bench

        files = {p.value: catalog.get(scale, p, Tower.IMAGE).directory / "1" / "model.onnx"
                 for p in precisions if p in (Precision.FP32, Precision.INT8)}
        peaks = roofline.precision_peaks(cpu_info.detect(), config_gflops(config))
        log(f"{scale}: runtime axis at batch {config.runtime_batch}")
        model_result["runtime_axis"] = runtime_bench.measure(
            files, pixels[np.arange(config.runtime_batch) % len(pixels)], config.runtime_threads,
            config.ort_seconds, flops["total"], peaks, log=log)
        model_result["peaks"] = peaks

    logs = cache / "logs"
    triton = TritonProcess(repository, log_path=logs / f"triton-{scale}.log")
    log(f"{scale}: starting tritonserver")
    triton.start(timeout_s=600)
    gateways = {name: GatewayProcess(repository, triton.grpc_url, scale,
                                     logs / f"{name}-{scale}.log", extra_args=flags)
                for name, flags in config.gateway_variants.items()}
    profile: Profile | None = None
    stack_rounds: dict[str, dict[str, list[dict[int, RunSummary]]]] = {
        p.value: {} for p in precisions}
    workload_stacks: dict[str, dict[str, StackRuns]] = {}
    try:
        for name, gateway in gateways.items():
            log(f"{scale}: starting the gateway {name} ({' '.join(gateway.extra_args)})")
            gateway.start()
        # CPU by process group: a gateway's workers are in its group.
        groups = {"triton": triton.pid, **{name: g.pid for name, g in gateways.items()}}
        profiled = GATEWAY if GATEWAY in gateways else next(iter(gateways))
        workload = wl.Workload({"image": 1.0}, images)
        sweep = bw.PNG in config.workloads
        # A fresh onnxruntime session is slow for its first runs (allocations, kernel set-up),
        # and only the first precision measured would pay for it: warm every endpoint first,
        # at every concurrency measured, so each batch size Triton forms has run once.
        if sweep:
            log(f"{scale}: warming every image endpoint")
        for p in (precisions if sweep else []):
            model = endpoint_name(scale, p, Tower.IMAGE)
            for c in config.steps:
                warm(lambda m=model: TritonTarget(triton.grpc_url, m, size), workload, c)

        def measure_stack(stack: str, factory, load, r: int, i: int, p: Precision,
                          model: str, steps: list[int] | None = None,
                          label: str = "") -> dict[int, RunSummary]:
            """One stack at each of its concurrencies: summaries by concurrency."""
            nonlocal profile
            runs = {}
            for c in steps or ([1, config.concurrency] if stack == TRITON else config.steps):
                duration = config.latency_duration if c == 1 else config.duration
                profile_this = (stack == profiled and c == config.concurrency and i == 0
                                and r == 0 and config.profile)
                spy = (start_py_spy(gateways[stack].pid, duration, logs / f"py-spy-{scale}.txt")
                       if profile_this else None)
                before = triton_stats(triton.grpc_url, model)
                run, cpu = measure(factory, load, c, duration, config.warmup, groups)
                summary = run_summary(run, c, cpu, TritonStats.delta(
                    before, triton_stats(triton.grpc_url, model)))
                runs[c] = summary
                if profile_this:
                    profile = finish_py_spy(spy, logs / f"py-spy-{scale}.txt", p.value, c)
                log(f"{scale} {label or p.value} {stack:7s} c={c:<3d} "
                    f"{summary.items_per_s:8.1f} items/s  p50 {summary.p50 or 0:8.1f} ms  "
                    f"p99 {summary.p99 or 0:8.1f} ms  Triton batch "
                    f"{summary.triton_stats.avg_batch or 0:5.2f}  errors {summary.error_count}")
            return runs

        for i, p in enumerate(precisions if sweep else []):
            model = endpoint_name(scale, p, Tower.IMAGE)
            rounds = stack_rounds[p.value]
            gw_workload = wl.Workload({"image": 1.0}, images,
                                      metadata=wl.routing_metadata(scale, p.value))
            stacks = {
                TRITON: (lambda m=model: TritonTarget(triton.grpc_url, m, size,
                                                      decode_per_call=config.direct_decode),
                         workload),
                **{name: (lambda a=g.address: GatewayTarget(a), gw_workload)
                   for name, g in gateways.items()},
            }
            for stack in stacks:
                rounds[stack] = []
            # Rounds repeat every stack, each round in another order (a shared machine's load
            # drifts): the report reads the first round, bench.json has all of them.
            order = list(stacks)
            for r in range(config.rounds):
                for stack in order[r % len(order):] + order[:r % len(order)]:
                    rounds[stack].append(measure_stack(stack, *stacks[stack], r, i, p, model))

        steps = [1, config.concurrency] if config.workload_latency else [config.concurrency]
        for name, data in extra_inputs.items():
            wp = workload_precision
            model = bw.stats_model(name, scale, wp)
            factories = {TRITON: bw.triton_factory(name, catalog, scale, wp, triton.grpc_url,
                                                   config.direct_decode),
                         **{g: (lambda a=gw.address: GatewayTarget(a))
                            for g, gw in gateways.items()}}
            loads = {TRITON: data.workload(),
                     **{g: data.workload(wl.routing_metadata(scale, wp.value))
                        for g in gateways}}
            log(f"{scale}: workload {name} at {wp.value}: warming both stacks")
            for stack, factory in factories.items():
                warm(factory, loads[stack], config.concurrency)
            workload_stacks[name] = {
                stack: StackRuns((measure_stack(stack, factory, loads[stack], 0, -1, wp, model,
                                                steps, label=f"{name}@{wp.value}"),))
                for stack, factory in factories.items()}
    finally:
        for gateway in gateways.values():
            gateway.stop()
        triton.stop()

    peer = (bench_peer(model_spec.name, images, config, cache, log)
            if config.peer and config.peer_dtypes else None)
    if bw.PNG in workloads and stack_rounds.get(workload_precision.value):
        workload_stacks[bw.PNG] = {name: StackRuns(tuple(r)) for name, r in
                                   stack_rounds[workload_precision.value].items()}
    model_result["workloads"] = {
        name: dataclasses.replace(result, stacks=workload_stacks.get(name, {}))
        for name, result in workloads.items()}
    return ModelResult(
        **model_result,
        precisions={p: PrecisionResult(model_bytes=size_bytes, ort=ort_result,
                                       stacks={name: StackRuns(tuple(r)) for name, r in
                                               stack_rounds.get(p, {}).items()})
                    for p, (size_bytes, ort_result) in ort_results.items()},
        gateways=dict(config.gateway_variants), profile=profile, peer=peer)


def _plan_workloads(config: BenchConfig, catalog, scale: str, precisions: list[Precision],
                    images: list[bytes], log: Log
                    ) -> tuple[Precision, dict[str, WorkloadResult], dict[str, bw.Inputs]]:
    """The precision the workloads run at, a result per selected workload (its stacks still
    empty, its input preparation measured now, or why it is skipped), and the inputs of the
    non-sweep workloads that will run."""
    wanted = Precision.parse(config.workload_precision)
    precision = wanted if wanted in precisions else precisions[0]
    if precision is not wanted:
        log(f"{scale}: no {wanted.value} endpoint; the workloads run at {precision.value}")
    size = catalog.get(scale, precision, Tower.IMAGE).sidecar.image_size
    results, extra = {}, {}
    for name in config.workloads:
        spec = bw.WORKLOADS[name]
        reason = bw.skip_reason(name, catalog, scale, precision)
        if reason:
            log(f"{scale}: workload {name} skipped: {reason}")
            results[name] = WorkloadResult(name, spec.kind, precision.value, spec.description,
                                           status="skipped", reason=reason)
            continue
        data = bw.inputs(name, images, config.photo_count)
        tokenizer = (bw.tokenizer_for(catalog, scale, precision) if spec.kind == "text"
                     else None)
        prep = bw.prep_ms_per_item(data, size, tokenizer)
        log(f"{scale}: workload {name}: input preparation {prep:.3f} CPU ms per item "
            f"(one thread){f', {data.bytes_mean / 1000:.1f} KB per image' if data.images else ''}")
        results[name] = WorkloadResult(
            name, spec.kind, precision.value, spec.description, prep_ms_per_item=prep,
            input_bytes_mean=None if data.bytes_mean is None else round(data.bytes_mean, 1))
        if name != bw.PNG:
            extra[name] = data
    return precision, results, extra


def bench_peer(arch: str, images: list[bytes], config: BenchConfig, cache: Path,
               log: Log) -> PeerResult:
    """infinity-emb at each dtype, swept like the gateway; failures are recorded, not raised."""
    from . import peer as peer_mod
    from .peer_model import ARCHITECTURES
    from .targets import InfinityTarget

    if arch not in ARCHITECTURES:
        return PeerResult(status="skipped", reason=f"no Hugging Face mapping for {arch} (the "
                                                   f"peer runs {', '.join(ARCHITECTURES)})")
    logs = cache / "logs"
    try:
        log("peer: preparing the infinity-emb virtualenv (cached after the first run)")
        python = peer_mod.ensure_venv(cache / "infinity-venv", logs / "peer-install.log")
        model_dir = peer_mod.ensure_model_dir(python, cache / f"peer-model-{arch}", arch,
                                              logs / "peer-model.log")
    except peer_mod.PeerError as exc:
        log(f"peer: FAILED: {exc}")
        return PeerResult(status="failed", error=str(exc))
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              "print(m.version('infinity-emb'), m.version('torch'))"],
                             capture_output=True, text=True).stdout.split()
    dtypes: dict[str, PeerDtype] = {}
    workload = wl.Workload({"image": 1.0}, images)
    for dtype in config.peer_dtypes:
        server = peer_mod.PeerServer(python, model_dir, logs / f"peer-{dtype}.log", dtype)
        precision = PEER_DTYPES[dtype].value
        runs: dict[int, RunSummary] = {}
        try:
            log(f"peer {dtype}: starting infinity_emb on {server.address}")
            server.start(timeout_s=300)
            for c in config.steps:
                duration = config.latency_duration if c == 1 else config.duration
                run, cpu = measure(lambda: InfinityTarget(server.address, server.MODEL_NAME),
                                   workload, c, duration, config.warmup, {"peer": server.pid})
                summary = runs[c] = run_summary(run, c, cpu)
                log(f"peer {dtype:7s} c={c:<3d} {summary.items_per_s:8.1f} items/s  "
                    f"p50 {summary.p50 or 0:8.1f} ms  p99 {summary.p99 or 0:8.1f} ms  errors "
                    f"{summary.error_count}")
                if summary.ok == 0:
                    raise peer_mod.PeerError(f"every call failed ({summary.errors}):\n"
                                             f"{server.log_tail()}")
            dtypes[dtype] = PeerDtype(precision=precision, status="ok", runs=runs)
        except peer_mod.PeerError as exc:
            log(f"peer {dtype}: FAILED: {str(exc).splitlines()[0]}")
            dtypes[dtype] = PeerDtype(precision=precision, status="failed", runs=runs,
                                      error=str(exc)[-2000:])
        finally:
            server.stop()
    return PeerResult(status="ok", server="infinity-emb", versions=tuple(version), dtypes=dtypes)


def run(config: BenchConfig) -> BenchResults:
    """The whole benchmark; returns the results written to ``<out>/bench.json``."""
    log = Log()
    cache, out = Path(config.bench_cache_dir).resolve(), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"config: {describe(config)}")
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    machine = machine_info()
    log(f"roofline: {config.matmul_n}x{config.matmul_n} float32 matmul")
    gflops = roofline.attainable_gflops(config.matmul_n, 3.0)
    _MEASURED_GFLOPS[config.matmul_n] = gflops
    log(f"  attainable {gflops:.1f} GFLOP/s")
    models = {spec: bench_model(spec, config, cache, out, log)
              for spec in [s.strip() for s in config.models.split(",") if s.strip()]}
    machine["loadavg_end"] = os.getloadavg()
    results = BenchResults(
        config=dataclasses.asdict(config), machine=machine, models=models,
        attainable_gflops=round(gflops, 2), matmul_n=config.matmul_n, started_at=started,
        command="python -m clipserve.loadtest.bench " + " ".join(sys.argv[1:]),
        wall_s=round(time.monotonic() - log.start, 1))
    (out / "bench.json").write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    plots = bench_report.plot_all(results, out)
    before = None
    if config.before:
        before = (f"Before ({config.before})", BenchResults.from_dict(
            json.loads(Path(config.before).read_text())))
    markdown = bench_report.markdown(results, plots, Path(config.markdown).resolve().parent,
                                     before)
    # BENCHMARKS.md holds other commands' sections too (soak, runtime axis, warm-up, ...):
    # replace only this one, the file's head.
    bench_report.write_section(Path(config.markdown), markdown)
    log(f"wrote {out / 'bench.json'}, {', '.join(str(p) for p in plots)} and {config.markdown}")
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.bench",
                                     description=__doc__.splitlines()[0])
    add_flags(parser, BenchConfig)
    args = parser.parse_args(argv)
    try:
        config = from_args(BenchConfig, args)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
