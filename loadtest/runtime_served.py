"""The runtime axis served: each precision under each CPU runtime, raw in process, through
Triton directly and through the clipserve gateway, side by side in one run.

    python -m clipserve.loadtest.runtime_served --repository .cache/bench/vit-ort \\
        --seconds 4 --batch 8 --concurrency 2

``--repository`` is a python-backend repository written by ``clipserve export`` (any
``--runtime``). For each runtime (onnxruntime, openvino) a copy of it is written whose
endpoints run that runtime (:func:`retarget_repository`: model files hard-linked, config.pbtxt
rewritten by the export's own writer with :func:`clipserve.export.runtimes.runtime_options`;
bf16 always runs OpenVINO, so it is measured once). Both stacks (one tritonserver + one gateway
per runtime) run at the same time and every point is measured in ``--rounds`` interleaved
rounds (best kept), so a burst of load from other work on the shared machine hits every row
alike. Each point: calls of ``--batch`` images from ``--concurrency`` callers for ``--seconds``
(after ``--warmup``), Triton's average formed batch, and the min cosine of the served
embeddings (straight from Triton) to raw onnxruntime FP32 on the same pixels. The raw columns
come from :func:`.runtime_bench.measure` on the endpoints' own model.onnx files.

Figures go to ``<out>/runtime_served.json`` and a BENCHMARKS.md section between the
runtime-served markers, with the CPU, its flags, load before and after, and the roofline at each
precision's own peak: the analytic one from flags, cores and clock
(:func:`.roofline.analytic_peaks`) and the measured float32 matmul times the precision's factor
(:func:`.roofline.precision_peaks`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from clipserve import calibration as cal
from clipserve import cpu as cpu_info
from clipserve import procs
from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name

from . import roofline, runtime_bench
from . import workload as wl

START, END = "<!-- runtime-served:start -->", "<!-- runtime-served:end -->"
RUNTIMES = ("onnxruntime", "openvino")
# The targets (set for a CPU with AMX): best INT8 through the gateway vs ORT FP32, and
# BF16's speed-up and fidelity.
TARGET_INT8, TARGET_BF16, TARGET_BF16_COSINE = 3.5, 3.0, 0.999


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def served_runtime(endpoint: Path) -> str:
    """The ``runtime`` parameter of an endpoint's config.pbtxt (onnxruntime where absent, as
    model.py reads it)."""
    import re

    text = (endpoint / "config.pbtxt").read_text()
    match = re.search(r'key:\s*"runtime"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    return match.group(1) if match else "onnxruntime"


def retarget_repository(source: Path, dest: Path, runtime: str, threads: int = 0,
                        drop_bf16: bool = False) -> Path:
    """Copy the python-backend repository ``source`` to ``dest`` with every endpoint set to run
    ``runtime`` (bf16: openvino, the only runtime that computes it). Model files are hard-linked
    (copied across filesystems); each config.pbtxt is written again by
    :func:`clipserve.export.repository.config_pbtxt`. ``drop_bf16`` leaves bf16 endpoints out
    of an onnxruntime copy (they would run OpenVINO anyway: the benchmark measures them in the
    openvino copy, and the tritonserver loads faster without them). Returns ``dest``.

    Raises:
        ValueError: ``source`` has no endpoints, or an endpoint is not a python-backend one.
    """
    from clipserve.export import repository, runtimes

    endpoints = [p for p in sorted(Path(source).iterdir()) if (p / "config.pbtxt").is_file()]
    if not endpoints:
        raise ValueError(f"{source}: no endpoints (no */config.pbtxt)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, copy_function=_link_or_copy)
    for endpoint in endpoints:
        if 'backend: "python"' not in (endpoint / "config.pbtxt").read_text():
            raise ValueError(f"{endpoint}: not a python-backend endpoint (export with the "
                             "default --backend python)")
        sidecar = Sidecar.read(endpoint)
        precision, tower = Precision(sidecar.precision), Tower(sidecar.tower)
        if precision is Precision.BF16 and runtime == "onnxruntime" and drop_bf16:
            shutil.rmtree(dest / endpoint.name)  # the openvino copy serves it
            continue
        chosen = "openvino" if precision is Precision.BF16 else runtime
        options = dict(runtimes.runtime_options(chosen, precision, threads),
                       runtime_choice=f"runtime_served: forced {chosen}")
        target = dest / endpoint.name / "config.pbtxt"
        target.unlink()  # a hard link to the source's: never write through it
        target.write_text(repository.config_pbtxt(
            endpoint.name, tower, sidecar, "python", precision, runtime=chosen,
            runtime_options=options))
    return dest


def triton_embeddings(url: str, model: str, pixels: np.ndarray) -> np.ndarray:
    """One call of ``pixels`` to a Triton image endpoint; its embeddings."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("embedding")],
                              client_timeout=120)
        return result.as_numpy("embedding")
    finally:
        client.close()


def points(scale: str, precisions: list[Precision]) -> list[tuple[str, Precision]]:
    """(runtime, precision) pairs measured: every precision under each runtime, except bf16
    under onnxruntime (it has no bf16 CPU kernels; its repository serves bf16 with openvino)."""
    return [(r, p) for p in precisions for r in RUNTIMES
            if not (p is Precision.BF16 and r == "onnxruntime")]


def _summary(run, cpu, stats) -> dict:
    data = run.overall().to_dict()
    lat = data["latency_ms"]
    return {"items_per_s": round(data["items_per_s"], 2), "calls_ok": data["ok"],
            "errors": data["errors"], "p50_ms": lat["p50"], "p99_ms": lat["p99"],
            "avg_batch": stats.get("avg_batch"),
            # Triton's model time per item over the window: not quantized by the few slow calls
            # a short window holds (a ViT-B call of 8 images takes seconds on a busy 2-core box)
            "compute_items_per_s": (round(1000.0 / stats["compute_ms_per_item"], 2)
                                    if stats.get("compute_ms_per_item") else None),
            "cpu_ms_per_item": {k: round(v * 1000 / max(data["items"], 1), 2)
                                for k, v in cpu.items()}}


def measure_served(stacks: dict, scale: str, precisions: list[Precision], images: list[bytes],
                   size: int, batch: int, concurrency: int, seconds: float, warmup: float,
                   rounds: int, log=print) -> dict:
    """Triton-direct and gateway figures per (runtime, precision); ``stacks``: runtime ->
    (TritonProcess, GatewayProcess). Returns {(runtime, precision.value): {"triton": [...],
    "gateway": [...]}} with one summary per round."""
    from . import bench
    from .targets import GatewayTarget, TritonTarget

    out = {}
    for _ in range(rounds):
        for runtime, p in points(scale, precisions):
            triton, gateway = stacks[runtime]
            model = endpoint_name(scale, p, Tower.IMAGE)
            groups = {"triton": triton.pid, "gateway": gateway.pid}
            load = {"triton": (lambda t=triton, m=model: TritonTarget(t.grpc_url, m, size),
                               wl.Workload({"image": 1.0}, images, batch=batch)),
                    "gateway": (lambda g=gateway: GatewayTarget(g.address),
                                wl.Workload({"image": 1.0}, images, batch=batch,
                                            metadata=wl.routing_metadata(scale, p.value)))}
            entry = out.setdefault((runtime, p.value), {"triton": [], "gateway": []})
            for stack, (factory, workload) in load.items():
                before = bench.triton_stats(triton.grpc_url, model)
                run, cpu = bench.measure(factory, workload, concurrency, seconds, warmup, groups)
                stats = bench.stats_delta(before, bench.triton_stats(triton.grpc_url, model))
                summary = _summary(run, cpu, stats)
                entry[stack].append(summary)
                log(f"  {runtime:11s} {p.value:5s} {stack:7s} {summary['items_per_s']:7.1f} img/s "
                    f"p50 {summary['p50_ms'] or 0:7.1f} ms, avg batch {summary['avg_batch']}, "
                    f"errors {sum(summary['errors'].values())}")
    return out


def combine(raw_rows: list[dict], served: dict, cosines: dict, served_runtimes: dict) -> list[dict]:
    """One row per served (runtime, precision): raw, Triton and gateway img/s (best round),
    each as a ratio to onnxruntime FP32 in the same column, and the min cosines."""
    as_served = {label for label, *_, hint in runtime_bench.ROWS if hint is None}
    raw = {(r["runtime"], r["precision"]): r for r in raw_rows
           if "error" not in r and r["label"] in as_served}
    rows = []
    for (runtime, precision), entry in served.items():
        best = {s: max(entry[s], key=lambda x: x["items_per_s"]) for s in ("triton", "gateway")}
        r = raw.get((runtime, precision), {})
        rows.append({"runtime": runtime, "precision": precision,
                     "served_runtime": served_runtimes[runtime, precision],
                     "raw_items_per_s": r.get("items_per_s"),
                     "raw_min_cosine_to_ort_fp32": r.get("min_cosine_to_ort_fp32"),
                     "served_min_cosine_to_ort_fp32": cosines[runtime, precision],
                     "triton": best["triton"], "gateway": best["gateway"],
                     "rounds": {s: [x["items_per_s"] for x in entry[s]] for s in entry}})
    base = next((x for x in rows if x["runtime"] == "onnxruntime" and x["precision"] == "fp32"),
                None)
    for row in rows:
        for key, value in (("raw", row["raw_items_per_s"]),
                           ("triton", row["triton"]["items_per_s"]),
                           ("gateway", row["gateway"]["items_per_s"])):
            ref = None if base is None else (base["raw_items_per_s"] if key == "raw"
                                             else base[key]["items_per_s"])
            row[f"{key}_vs_ort_fp32"] = round(value / ref, 3) if value and ref else None
    return rows


def add_roofline(rows: list[dict], flops: int, analytic: dict, measured: dict) -> None:
    """GFLOP/s of each row's gateway and raw throughput and their fractions of the precision's
    own peaks (analytic from flags/cores/clock; measured fp32 matmul x factor)."""
    for row in rows:
        p = row["precision"]
        for key, speed in (("raw", row["raw_items_per_s"]),
                           ("gateway", row["gateway"]["items_per_s"])):
            gflops = (speed or 0) * flops / 1e9
            row[f"{key}_gflops"] = round(gflops, 1)
            if p in analytic:
                row[f"{key}_of_analytic_peak"] = round(gflops / analytic[p]["gflops"], 3)
            row[f"{key}_of_measured_peak"] = round(gflops / measured[p]["gflops"], 3)


def verdict(rows: list[dict], cpu) -> list[str]:
    """The issue's targets against the gateway column: met, or missed by how much, and why."""
    ok = [r for r in rows if r["gateway_vs_ort_fp32"]]
    lines = []
    factors = roofline.precision_peak_factors(cpu)
    peaks = (f"this CPU has {'AMX' if cpu.amx else 'no AMX'}: its bf16 peak is "
             f"{factors['bf16'][0]:g}x and its int8 peak {factors['int8'][0]:g}x the fp32 one")
    whys = []
    int8 = max((r for r in ok if r["precision"] == "int8"), key=lambda r: r["gateway_vs_ort_fp32"],
               default=None)
    if int8:
        got = int8["gateway_vs_ort_fp32"]
        state = "met" if got >= TARGET_INT8 else f"missed by {TARGET_INT8 - got:.2f}x"
        lines.append(f"- Best INT8 through the gateway: {int8['runtime']}, {got:.2f}x ORT FP32 "
                     f"through the gateway (target >= {TARGET_INT8}x): **{state}**.")
        if got < TARGET_INT8:
            whys.append(why_missed(int8, TARGET_INT8, peaks))
    bf16 = next((r for r in ok if r["precision"] == "bf16"), None)
    if bf16:
        got, cos = bf16["gateway_vs_ort_fp32"], bf16["served_min_cosine_to_ort_fp32"]
        fast = "met" if got >= TARGET_BF16 else f"missed by {TARGET_BF16 - got:.2f}x"
        faithful = "met" if cos >= TARGET_BF16_COSINE else "missed"
        lines.append(f"- BF16 through the gateway: {got:.2f}x ORT FP32 (target >= {TARGET_BF16}x): "
                     f"**{fast}**; min cosine {cos:.6f} (target >= {TARGET_BF16_COSINE}): "
                     f"**{faithful}**.")
        if got < TARGET_BF16:
            whys.append(why_missed(bf16, TARGET_BF16, peaks))
    lines += [f"- Why ({w}" for w in whys]  # each starts with "runtime precision): "
    return lines


def why_missed(row: dict, target: float, peaks: str) -> str:
    """Where a row's speed-up falls below ``target``, from its own measurements: in process
    already (the CPU and the runtime), in Triton (the python backend), or only behind the
    gateway (its CPU per image, on the cores it shares with Triton)."""
    name = f"{row['runtime']} {row['precision']}"
    raw, triton = row.get("raw_vs_ort_fp32"), row.get("triton_vs_ort_fp32")
    if raw is not None and raw < target:
        return (f"{name}): in process it reaches only {raw:.2f}x, so the limit is the runtime on "
                f"this CPU, not the serving path; {peaks}.")
    if triton is not None and triton < target:
        return (f"{name}): {raw or 0:.2f}x in process but {triton:.2f}x through Triton alone: "
                "the python backend's per-batch cost takes the rest.")
    cpu = row["gateway"].get("cpu_ms_per_item", {})
    t_cpu = row["triton"].get("cpu_ms_per_item", {}).get("triton")
    return (f"{name}): {raw or 0:.2f}x in process and {triton or 0:.2f}x through Triton meet "
            f"it; behind the gateway Triton's CPU per image went from "
            f"{t_cpu if t_cpu is not None else '?'} to {cpu.get('triton', '?')} ms and the "
            f"gateway spent {cpu.get('gateway', '?')} ms of CPU per image on the same cores, so "
            "on this machine the gateway's cost, not the runtime, sets the figure.")


def markdown(result: dict) -> str:
    """The BENCHMARKS.md section of one run."""
    m, cfg = result["machine"], result["config"]
    load = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    an, me = result["peaks"]["analytic"], result["peaks"]["measured"]
    lines = [START, "## Runtime axis served: raw, through Triton, through the gateway", "",
             f"`{result['command']}` on {result['started_at']}: {cfg['scale']} image tower "
             f"(uint8 NHWC {result['image_size']}px), calls of {cfg['batch']} images from "
             f"{cfg['concurrency']} callers, {cfg['seconds']} s per point after "
             f"{cfg['warmup']} s warm-up, {cfg['rounds']} interleaved rounds (best kept); raw: "
             f"in process at batch {cfg['batch']}, {cfg['threads'] or 'all'} threads. Both "
             "stacks (a tritonserver with the python backend and a gateway per runtime) ran at "
             f"once. onnxruntime {m['versions'].get('onnxruntime')}, OpenVINO "
             f"{m['versions'].get('openvino')}.", "",
             f"CPU: {m['cpu']['describe']}; clock {m['clock_ghz']} GHz (/proc/cpuinfo).",
             f"Load average {load(m['loadavg_start'])} at the start and "
             f"{load(m['loadavg_end'])} at the end (1/5/15 min): "
             f"{runtime_bench.load_judgement(m)}", "",
             "| runtime | precision | raw img/s | Triton img/s | gateway img/s | raw / Triton / "
             "gateway vs ORT FP32 | Triton model img/s (its statistics, gateway run) | Triton "
             "avg batch | min cosine to ORT FP32 (served) | gateway GFLOP/s | of its "
             "precision's peak (analytic / measured) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        g, t = r["gateway"], r["triton"]
        ratios = " / ".join(f"{r[k + '_vs_ort_fp32']:.2f}x" if r[k + "_vs_ort_fp32"] else "-"
                            for k in ("raw", "triton", "gateway"))
        peak = (f"{r.get('gateway_of_analytic_peak', 0):.0%} of {an[r['precision']]['gflops']:.0f}"
                if r["precision"] in an else "-")
        lines.append(
            f"| {r['runtime']} | {r['precision']} | {r['raw_items_per_s'] or 0:.1f} | "
            f"{t['items_per_s']:.1f} | {g['items_per_s']:.1f} | {ratios} | "
            f"{g.get('compute_items_per_s') or '-'} | {t['avg_batch']} | "
            f"{r['served_min_cosine_to_ort_fp32']:.6f} | {r['gateway_gflops']:.0f} | {peak} / "
            f"{r['gateway_of_measured_peak']:.0%} of {me[r['precision']]['gflops']:.0f} |")
    errors = sum(sum(r[s]["errors"].values()) for r in result["rows"] for s in ("triton", "gateway"))
    lines += ["", f"Failed calls in the kept rounds: {errors}.", "", *verdict_lines(result), "",
              f"Roofline: {result['image_gflop']:.3f} GFLOP per image. Peaks per precision, "
              "analytic (flags x cores x clock): " + "; ".join(
                  f"{p} {v['gflops']:.0f} GFLOP/s ({v['assumes']})" for p, v in an.items()
                  if p in ("fp32", "bf16", "int8")) + ". Measured: a "
              f"{cfg['matmul_n']}-square numpy float32 matmul ({me['fp32']['gflops']:.0f} "
              "GFLOP/s in this run) times the same factors.", "", END]
    return "\n".join(lines) + "\n"


def verdict_lines(result: dict) -> list[str]:
    return verdict(result["rows"], cpu_info.from_flags(result["machine"]["cpu"]["flags"],
                                                       cores=result["machine"]["cpu"]["cores"]))


def write_section(path: Path, section: str) -> None:
    """Replace the runtime-served section of ``path``; a new one goes right after the
    runtime-axis section (or at the end)."""
    from clipserve.loadtest.report import replace_section

    replace_section(path, section, START, END, after=runtime_bench.END)


def run(repository: Path, work: Path, out: Path, markdown_path: Path, batch: int = 8,
        concurrency: int = 2, seconds: float = 4.0, warmup: float = 1.5, rounds: int = 2,
        threads: int = 0, matmul_n: int = 1024, log=print) -> dict:
    """The whole served runtime axis; returns what it writes to runtime_served.json."""
    from clipserve.export import runtimes
    from clipserve.server.repository import Catalog
    from clipserve.server.triton_process import TritonProcess

    from .bench import GatewayProcess

    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), os.getloadavg()
    busy_start = procs.busy_cores(runtime_bench.BUSY_SAMPLE_S)
    machine = cpu_info.detect()
    ghz = roofline.clock_ghz()
    log(f"CPU: {machine.describe()}, {ghz} GHz; load {load_start}, {busy_start:.2f} cores busy")
    catalog = Catalog.from_repository(repository)
    scales = sorted({spec.sidecar.scale for spec in catalog})
    if len(scales) != 1:
        raise ValueError(f"{repository}: expected the endpoints of one scale, found {scales}")
    scale = scales[0]
    precisions = [p for p in Precision if catalog.has(scale, p, Tower.IMAGE)
                  and p in (Precision.FP32, Precision.INT8, Precision.BF16, Precision.FP16)]
    if Precision.FP32 not in precisions:
        raise ValueError(f"{repository}: no fp32 image endpoint for {scale} (the reference)")
    size = catalog.get(scale, Precision.FP32, Tower.IMAGE).sidecar.image_size
    files = {p.value: catalog.get(scale, p, Tower.IMAGE).directory / "1" / "model.onnx"
             for p in precisions if p in (Precision.FP32, Precision.INT8)}
    pixels = wl.builtin_pixels(64, size)
    images = [wl.encode_png(x) for x in pixels]
    sample = pixels[:batch]
    flops = roofline.onnx_flops(files["fp32"])["total"]
    fp32_gflops = roofline.attainable_gflops(matmul_n, 2.0)
    peaks = {"analytic": roofline.analytic_peaks(machine, ghz),
             "measured": roofline.precision_peaks(machine, fp32_gflops)}
    log(f"raw in process at batch {batch} ({seconds} s per row, {rounds} rounds)")
    raw_rows = runtime_bench.measure(files, sample, threads, seconds, flops, peaks["measured"],
                                     rounds, log)
    reference = runtimes.make_session(files["fp32"], "onnxruntime", Precision.FP32, threads).run(
        None, {"pixels": sample})[0]

    stacks, logs = {}, work / "logs"
    try:
        for runtime in RUNTIMES:
            repo = retarget_repository(repository, work / f"repo-{runtime}", runtime, threads,
                                       drop_bf16=True)
            triton = TritonProcess(repo, log_path=logs / f"triton-{runtime}.log")
            log(f"{runtime}: starting tritonserver on {repo}")
            triton.start(timeout_s=900)
            gateway = GatewayProcess(repo, triton.grpc_url, scale, logs / f"gateway-{runtime}.log")
            stacks[runtime] = (triton, gateway)
            gateway.start(timeout_s=300)
        cosines, served_runtimes = {}, {}
        for runtime, p in points(scale, precisions):
            triton, _ = stacks[runtime]
            model = endpoint_name(scale, p, Tower.IMAGE)
            served_runtimes[runtime, p.value] = served_runtime(work / f"repo-{runtime}" / model)
            out_emb = triton_embeddings(triton.grpc_url, model, sample)
            cosines[runtime, p.value] = round(float(
                cal.cosine_rows(out_emb, reference).min()), 6)
            log(f"  {runtime} {p.value}: served by {served_runtimes[runtime, p.value]}, min cosine "
                f"{cosines[runtime, p.value]:.6f}")
        from . import bench

        for runtime, p in points(scale, precisions):  # every endpoint's first runs are slow
            triton, _ = stacks[runtime]
            model = endpoint_name(scale, p, Tower.IMAGE)
            from .targets import TritonTarget
            bench.warm(lambda t=triton, m=model: TritonTarget(t.grpc_url, m, size),
                       wl.Workload({"image": 1.0}, images, batch=batch), concurrency)
        served = measure_served(stacks, scale, precisions, images, size, batch, concurrency,
                                seconds, warmup, rounds, log)
    finally:
        for triton, gateway in stacks.values():
            gateway.stop()
            triton.stop()
    rows = combine(raw_rows, served, cosines, served_runtimes)
    add_roofline(rows, flops, peaks["analytic"], peaks["measured"])
    result = {"version": 1, "started_at": started,
              "command": "python -m clipserve.loadtest.runtime_served " + " ".join(sys.argv[1:]),
              "config": {"repository": str(repository), "scale": scale, "batch": batch,
                         "concurrency": concurrency, "seconds": seconds, "warmup": warmup,
                         "rounds": rounds, "threads": threads, "matmul_n": matmul_n},
              "machine": runtime_bench.machine_record(machine, load_start, busy_start,
                                                           clock_ghz=ghz),
              "image_size": size, "image_gflop": flops / 1e9, "peaks": peaks,
              "raw_rows": raw_rows, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_served.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section(markdown_path, markdown(result))
    log(f"wrote {out / 'runtime_served.json'} and {markdown_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.runtime_served",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True,
                        help="a python-backend repository from `clipserve export`")
    parser.add_argument("--work", default=".cache/bench/runtime-served",
                        help="folder for the per-runtime repository copies and logs")
    parser.add_argument("--batch", type=int, default=8, help="images per call (and raw batch)")
    parser.add_argument("--concurrency", type=int, default=2, help="callers per point")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds sent before each")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the endpoints and raw rows (0: all cores)")
    parser.add_argument("--out", default="benchmarks", help="folder for runtime_served.json")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="report to update")
    args = parser.parse_args(argv)
    if min(args.batch, args.concurrency, args.rounds) < 1 or args.seconds <= 0 or args.threads < 0:
        print("runtime_served: batch, concurrency, rounds and seconds must be positive",
              file=sys.stderr)
        return 2
    repository = Path(args.repository).resolve()
    if not repository.is_dir():
        print(f"runtime_served: {repository} is not a folder", file=sys.stderr)
        return 2
    run(repository, Path(args.work).resolve(), Path(args.out), Path(args.markdown), args.batch,
        args.concurrency, args.seconds, args.warmup, args.rounds, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
