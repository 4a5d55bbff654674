"""Triton's CPU tuning measured behind the gateway (issue 10, item 5): the first call after a
start against a warm call, with and without warm-up, and onnxruntime's spinning on and off.

    python -m clipserve.loadtest.warmup_bench --out benchmarks --markdown BENCHMARKS.md

Every variant serves the same exported endpoints (their model.onnx and model.py linked, not
copied) with a config.pbtxt rendered by the export's own ``config_pbtxt`` from a
:class:`~clipserve.export.repository.ServingPolicy`, so what differs between two rows is only
what the row says:

1. **First call vs warm call.** For each warm-up variant (none; Triton's ``model_warmup`` only;
   the gateway's warm-up request only; both, the default) and each of ``--restarts`` rounds
   (variants interleaved in a round, so load drift hits them alike): start Triton and
   ``clipserve serve`` in front of it, wait for gRPC health SERVING, open a channel and check
   health on it (the client's connection is not what is measured), then time one EmbedImages
   of one image (the first call) and ``--warm-calls`` more (the warm ones, median).
2. **allow_spinning 0 vs 1.** The default policy with spinning off and on, alternated for
   ``--rounds`` rounds; each round starts Triton and the gateway and runs a closed loop of
   single-image EmbedImages at each ``--callers``: throughput, p50/p99, Triton's average batch
   and the CPU milliseconds per image of Triton's and the gateway's process groups.

It prints a table, writes ``<out>/warmup_bench.json`` (CPU model and flags, load averages at
each step) and, with ``--markdown``, the section between the triton-tuning markers of that file.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from clipserve.config import add_flags, describe, from_args
from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name

from . import workload as wl

START = "<!-- triton-tuning:start (written by python -m clipserve.loadtest.warmup_bench) -->"
END = "<!-- triton-tuning:end -->"
# config.pbtxt parameters that the policy renders; everything else of an endpoint is kept.
THREAD_PARAMETERS = ("intra_op_threads", "inter_op_threads", "allow_spinning")
WARMUP_VARIANTS = {  # name: (Triton model_warmup, gateway warm-up request)
    "none": ("none", False),
    "triton model_warmup": ("zero", False),
    "gateway warm-up": ("none", True),
    "both (default)": ("zero", True),
}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class WarmupBenchConfig:
    """Everything the benchmark takes (flags, or ``CLIPSERVE_<FIELD>`` env vars)."""

    repository: str = field(default="", metadata=_help(
        "an exported repository to take the endpoints from; empty: export --model at fp32 "
        "into --bench-cache-dir (as loadtest.bench does)"))
    model: str = field(default="digits-s", metadata=_help("the model (scale) measured"))
    precision: str = field(default="fp32", metadata=_help("its precision measured"))
    restarts: int = field(default=3, metadata=_help(
        "starts per warm-up variant (first calls measured)"))
    warm_calls: int = field(default=30, metadata=_help("warm calls after each first call"))
    callers: tuple[str, ...] = field(default=("1", "4", "8"), metadata=_help(
        "closed-loop callers of the spinning comparison"))
    duration: float = field(default=5.0, metadata=_help("seconds measured per closed loop"))
    warmup: float = field(default=1.0, metadata=_help(
        "seconds sent before each measured closed-loop window"))
    rounds: int = field(default=2, metadata=_help(
        "spinning off/on rounds (alternated; medians reported)"))
    out: str = field(default="benchmarks", metadata=_help("folder for warmup_bench.json"))
    markdown: str = field(default="", metadata=_help(
        "replace the triton-tuning section of this file (e.g. BENCHMARKS.md); empty: do not"))
    bench_cache_dir: str = field(default=".cache/bench", metadata=_help(
        "exported repository (when --repository is empty), variant repositories, logs"))
    export_cache_dir: str = field(default=".cache", metadata=_help(
        "the export stage's cache (trained checkpoints), shared with the tests"))

    def __post_init__(self):
        Precision.parse(self.precision)
        if self.restarts < 1 or self.warm_calls < 1 or self.rounds < 1:
            raise ValueError("restarts, warm_calls and rounds must be at least 1")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("duration must be positive and warmup 0 or more")
        if not self.callers or any(int(c) < 1 for c in self.callers):
            raise ValueError(f"callers must be positive integers, got {','.join(self.callers)}")


# -- variant repositories ------------------------------------------------------------------

def endpoint_parameters(config_text: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt, parsed as Triton parses it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def retuned_repository(source: Path, dest: Path, names: list[str], policy) -> Path:
    """``dest`` holding endpoints ``names`` of ``source`` (python backend) with config.pbtxt
    rendered again for ``policy``: files linked, runtime parameters kept, thread parameters
    and batching/warm-up from the policy."""
    from clipserve.export.repository import config_pbtxt

    shutil.rmtree(dest, ignore_errors=True)
    for name in names:
        src, dst = source / name, dest / name
        (dst / "1").mkdir(parents=True)
        for path in src.iterdir():
            if path.is_file() and path.name != "config.pbtxt":
                (dst / path.name).symlink_to(path.resolve())
        for path in (src / "1").iterdir():
            (dst / "1" / path.name).symlink_to(path.resolve())
        params = endpoint_parameters((src / "config.pbtxt").read_text())
        runtime = params.pop("runtime", "onnxruntime")
        for key in THREAD_PARAMETERS:
            params.pop(key, None)
        sidecar = Sidecar.read(src)
        (dst / "config.pbtxt").write_text(config_pbtxt(
            name, Tower(sidecar.tower), sidecar, "python", Precision(sidecar.precision),
            runtime=runtime, runtime_options=params, policy=policy))
    return dest


# -- one stack: Triton + `clipserve serve` ----------------------------------------------------

class Stack:
    """Triton on a variant repository and the gateway process in front of it."""

    def __init__(self, repository: Path, scale: str, logs: Path, tag: str,
                 gateway_warmup: bool = True):
        from clipserve.server.triton_process import TritonProcess

        self.triton = TritonProcess(repository, log_path=logs / f"triton-{tag}.log")
        self._gateway_args = (repository, scale, logs / f"gateway-{tag}.log",
                              () if gateway_warmup else ("--no-endpoint-warmup",))
        self.gateway = None
        self.start_to_serving_s = None

    def __enter__(self) -> "Stack":
        from .bench import GatewayProcess

        start = time.monotonic()
        self.triton.start(timeout_s=600)
        repository, scale, log_path, extra = self._gateway_args
        self.gateway = GatewayProcess(repository, self.triton.grpc_url, scale, log_path, extra)
        try:
            self.gateway.start()
        except BaseException:
            self.triton.stop()
            raise
        self.start_to_serving_s = time.monotonic() - start
        return self

    def __exit__(self, *exc_info) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.triton.stop()


def first_and_warm_calls(address: str, image: bytes, warm_calls: int) -> dict:
    """The first EmbedImages on a connected channel, then ``warm_calls`` more (milliseconds)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from clipserve.server.v1 import clipserve_pb2 as pb
    from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        embed = pb_grpc.EmbeddingServiceStub(channel).EmbedImages
        request = pb.EmbedImagesRequest(images=[image])
        times = []
        for _ in range(1 + warm_calls):
            start = time.perf_counter()
            embed(request, timeout=60)
            times.append((time.perf_counter() - start) * 1e3)
    warm = statistics.median(times[1:])
    return {"first_ms": round(times[0], 3), "warm_p50_ms": round(warm, 3),
            "first_over_warm": round(times[0] / warm, 2)}


def measure_warmup(source: Path, names: list[str], config: WarmupBenchConfig, image: bytes,
                   cache: Path, log) -> dict:
    from clipserve.export.repository import ServingPolicy

    rows = {name: [] for name in WARMUP_VARIANTS}
    for restart in range(config.restarts):
        for variant, (model_warmup, gateway_warmup) in WARMUP_VARIANTS.items():
            tag = f"warmup-{variant.split()[0]}"
            repo = retuned_repository(source, cache / "variants" / tag, names,
                                      ServingPolicy(model_warmup=model_warmup))
            with Stack(repo, config.model, cache / "logs", tag, gateway_warmup) as stack:
                row = first_and_warm_calls(stack.gateway.address, image, config.warm_calls)
                row["start_to_serving_s"] = round(stack.start_to_serving_s, 2)
            row["loadavg"] = os.getloadavg()[0]
            rows[variant].append(row)
            log(f"warm-up {variant:20s} start {restart + 1}: first {row['first_ms']:7.1f} ms, "
                f"warm {row['warm_p50_ms']:6.1f} ms ({row['first_over_warm']:.2f}x), SERVING "
                f"after {row['start_to_serving_s']:.1f} s, load {row['loadavg']:.2f}")
    summary = {}
    for variant, runs in rows.items():
        summary[variant] = {
            "runs": runs,
            "first_ms_median": round(statistics.median(r["first_ms"] for r in runs), 3),
            "warm_p50_ms_median": round(statistics.median(r["warm_p50_ms"] for r in runs), 3),
            "first_over_warm_median": round(statistics.median(
                r["first_over_warm"] for r in runs), 2),
            "first_over_warm_max": max(r["first_over_warm"] for r in runs),
            "start_to_serving_s_median": round(statistics.median(
                r["start_to_serving_s"] for r in runs), 2),
            "triton_model_warmup": WARMUP_VARIANTS[variant][0],
            "gateway_warmup": WARMUP_VARIANTS[variant][1]}
    return summary


def measure_spinning(source: Path, names: list[str], config: WarmupBenchConfig,
                     images: list[bytes], cache: Path, log) -> dict:
    from clipserve.export.repository import ServingPolicy

    from .bench import measure, stats_delta, summarize_run, triton_stats
    from .targets import GatewayTarget

    model = endpoint_name(config.model, Precision.parse(config.precision), Tower.IMAGE)
    workload = wl.Workload({"image": 1.0}, images)
    callers = [int(c) for c in config.callers]
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in callers} for s in ("0", "1")}
    for round_ in range(config.rounds):
        for spin in (("0", "1") if round_ % 2 == 0 else ("1", "0")):
            tag = f"spinning-{spin}"
            repo = retuned_repository(source, cache / "variants" / tag, names,
                                      ServingPolicy(allow_spinning=spin == "1"))
            with Stack(repo, config.model, cache / "logs", tag) as stack:
                groups = {"triton": stack.triton.pid, "gateway": stack.gateway.pid}
                address = stack.gateway.address
                for c in callers:
                    before = triton_stats(stack.triton.grpc_url, model)
                    run, cpu = measure(lambda: GatewayTarget(address), workload, c,
                                       config.duration, config.warmup, groups)
                    row = summarize_run(run, c, cpu)
                    row["triton_stats"] = stats_delta(before, triton_stats(
                        stack.triton.grpc_url, model))
                    row["loadavg"] = os.getloadavg()[0]
                    runs[spin][c].append(row)
                    log(f"allow_spinning={spin} c={c}: {row['items_per_s']:7.1f} images/s, p50 "
                        f"{row['latency_ms']['p50']:.1f} ms, CPU ms/image triton "
                        f"{row['cpu_ms_per_item']['triton']:.2f} gateway "
                        f"{row['cpu_ms_per_item']['gateway']:.2f}, load {row['loadavg']:.2f}")
    summary = {}
    for spin, by_callers in runs.items():
        summary[spin] = {}
        for c, rows in by_callers.items():
            def med(get):
                values = [v for v in (get(r) for r in rows) if v is not None]
                return round(statistics.median(values), 3) if values else None
            summary[spin][str(c)] = {
                "runs": rows,
                "items_per_s": med(lambda r: r["items_per_s"]),
                "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
                "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                "errors": sum(sum(r["errors"].values()) for r in rows),
                "triton_cpu_ms_per_image": med(lambda r: r["cpu_ms_per_item"]["triton"]),
                "gateway_cpu_ms_per_image": med(lambda r: r["cpu_ms_per_item"]["gateway"]),
                "avg_batch": med(lambda r: r["triton_stats"].get("avg_batch"))}
    return summary


# -- report -------------------------------------------------------------------------------

def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def tables(result: dict) -> list[str]:
    lines = ["| warm-up | Triton model_warmup | gateway warm-up | first call ms | warm call ms "
             "(p50) | first / warm (median, max) | start to SERVING s |",
             "|---|---|---|---|---|---|---|"]
    for variant, row in result["warmup"].items():
        lines.append(
            f"| {variant} | {row['triton_model_warmup']} | "
            f"{'yes' if row['gateway_warmup'] else 'no'} | {row['first_ms_median']:.1f} | "
            f"{row['warm_p50_ms_median']:.1f} | {row['first_over_warm_median']:.2f}x, "
            f"{row['first_over_warm_max']:.2f}x | {row['start_to_serving_s_median']:.1f} |")
    lines += ["", "| callers | allow_spinning | images/s | p50 ms | p99 ms | Triton CPU ms/image "
              "| gateway CPU ms/image | Triton avg batch | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    spinning = result["spinning"]
    for c in spinning["0"]:
        for spin in ("0", "1"):
            row = spinning[spin][c]
            lines.append(
                f"| {c} | {spin} | {_fmt(row['items_per_s'])} | {_fmt(row['p50_ms'])} | "
                f"{_fmt(row['p99_ms'])} | {_fmt(row['triton_cpu_ms_per_image'], '.2f')} | "
                f"{_fmt(row['gateway_cpu_ms_per_image'], '.2f')} | "
                f"{_fmt(row['avg_batch'], '.2f')} | {row['errors']} |")
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    cfg = result["config"]
    loads = result["loadavg"]
    lines = [START, "## Issue 10: Triton tuned for the CPU (warm-up, spinning)", "",
             f"`python -m clipserve.loadtest.warmup_bench`, {result['when']}, "
             f"{result['minutes']:.1f} min, on {m['cpu']} ({m['cores']} cores; "
             f"{m['cpu_info']['describe']}), shared with other jobs: load average "
             f"{loads['start']:.2f} at the start, {loads['min']:.2f}-{loads['max']:.2f} over the "
             f"steps, {loads['end']:.2f} at the end. Model: {cfg['model']} {cfg['precision']} "
             f"(image and text endpoints of `{result['source']}`), one 32x32 PNG per call, "
             "gateway `clipserve serve --triton-url` in front of the pytriton CPU tritonserver "
             "(python backend, onnxruntime). Each variant's config.pbtxt is rendered by the "
             "export's `config_pbtxt` from its ServingPolicy; nothing else differs.", "",
             f"First call after start against warm calls: {cfg['restarts']} starts per variant, "
             f"interleaved; the first EmbedImages on a channel already connected (health "
             f"checked), then {cfg['warm_calls']} warm calls (median). Target: first call "
             "within 2x of a warm call.", ""]
    lines += tables(result)[:len(result["warmup"]) + 2]
    lines += ["", f"allow_spinning 0 vs 1 (the export's `--allow-spinning`; default off), "
              f"gateway + Triton, closed loops of single-image EmbedImages, {cfg['duration']:.0f} "
              f"s measured after {cfg['warmup']:.0f} s per step, {cfg['rounds']} rounds "
              "alternating the order, medians; CPU ms/image is each process group's CPU time "
              "over the window per image served.", ""]
    lines += tables(result)[len(result["warmup"]) + 3:]
    lines += ["", f"Findings: {result['findings']}", "", END]
    return "\n".join(lines) + "\n"


def findings(result: dict) -> str:
    warm = result["warmup"]
    none, default = warm["none"], warm["both (default)"]
    parts = [f"without warm-up the first call costs {none['first_ms_median']:.1f} ms against "
             f"{none['warm_p50_ms_median']:.1f} ms warm ({none['first_over_warm_median']:.2f}x); "
             f"with both warm-ups {default['first_ms_median']:.1f} ms against "
             f"{default['warm_p50_ms_median']:.1f} ms ({default['first_over_warm_median']:.2f}x, "
             f"worst start {default['first_over_warm_max']:.2f}x): the 2x target is "
             + ("met" if default["first_over_warm_max"] <= 2.0 else
                "met at the median" if default["first_over_warm_median"] <= 2.0 else "missed")]
    spin = result["spinning"]
    deltas = []
    for c in spin["0"]:
        off, on = spin["0"][c], spin["1"][c]
        if off["items_per_s"] and on["items_per_s"]:
            deltas.append(f"{c} callers: {off['items_per_s'] / on['items_per_s']:.2f}x the "
                          f"images/s of spinning on, Triton CPU/image "
                          f"{_fmt(off['triton_cpu_ms_per_image'], '.2f')} vs "
                          f"{_fmt(on['triton_cpu_ms_per_image'], '.2f')} ms")
    parts.append("spinning off gives " + "; ".join(deltas))
    return "; ".join(parts) + "."


def write_section(path: Path, section: str) -> None:
    """Replace the triton-tuning section of ``path`` (or append it)."""
    from clipserve.loadtest.report import replace_section

    replace_section(path, section, START, END)


def source_repository(config: WarmupBenchConfig, cache: Path, log) -> Path:
    if config.repository:
        return Path(config.repository).resolve()
    from .bench import ensure_repository

    path, _ = ensure_repository(config.model, (config.precision,), cache,
                                Path(config.export_cache_dir).resolve(), log)
    return path


def run(config: WarmupBenchConfig, log=print) -> dict:
    from .bench import machine_info

    started = time.monotonic()
    cache = Path(config.bench_cache_dir).resolve() / "warmup-bench"
    cache.mkdir(parents=True, exist_ok=True)
    source = source_repository(config, Path(config.bench_cache_dir).resolve(), log)
    precision = Precision.parse(config.precision)
    names = [endpoint_name(config.model, precision, t) for t in Tower
             if (source / endpoint_name(config.model, precision, t) / "config.pbtxt").is_file()]
    if endpoint_name(config.model, precision, Tower.IMAGE) not in names:
        raise ValueError(f"{source} has no {config.model} {precision.value} image endpoint")
    size = Sidecar.read(source / endpoint_name(config.model, precision, Tower.IMAGE)).image_size
    images = [wl.encode_png(p) for p in wl.builtin_pixels(64, size)]
    result = {"config": dict(config.__dict__), "machine": machine_info(), "source": source.name,
              "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    log(f"warmup_bench: {describe(config)}")
    result["warmup"] = measure_warmup(source, names, config, images[0], cache, log)
    result["spinning"] = measure_spinning(source, names, config, images, cache, log)
    steps = [r["loadavg"] for v in result["warmup"].values() for r in v["runs"]]
    steps += [r["loadavg"] for s in result["spinning"].values() for c in s.values()
              for r in c["runs"]]
    result["loadavg"] = {"start": result["machine"]["loadavg_start"][0], "min": min(steps),
                         "max": max(steps), "end": os.getloadavg()[0]}
    result["minutes"] = (time.monotonic() - started) / 60
    result["findings"] = findings(result)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.warmup_bench",
                                     description=__doc__.split("\n\n")[0])
    add_flags(parser, WarmupBenchConfig)
    try:
        config = from_args(WarmupBenchConfig, parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    result = run(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warmup_bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\n".join(tables(result)))
    print(f"\nFindings: {result['findings']}")
    if config.markdown:
        write_section(Path(config.markdown), markdown(result))
        print(f"wrote {out / 'warmup_bench.json'} and the triton-tuning section of "
              f"{config.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
