"""The benchmark's arithmetic and report: ratios, targets, the explanation of misses, plots and
BENCHMARKS.md, all computed from the results dict that :mod:`.bench` writes to bench.json.

Pure functions of that dict (plus matplotlib for the PNGs), so the report can be regenerated
from a saved bench.json::

    python -m clipserve.loadtest.bench_report benchmarks/bench.json BENCHMARKS.md
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from .stats import SweepPoint, saturation, throughput_at_p99

# The targets for this 2-core CPU.
GATEWAY_THROUGHPUT_MIN = 0.90  # gateway / Triton-direct items/s
ADDED_P50_MAX_MS = 1.5  # gateway p50 - Triton-direct p50, one caller
BATCHING_EFFICIENCY_MIN = 0.80  # Triton at concurrency / raw ORT at its best batch
PEER_RATIO_MIN = 1.0  # clipserve / peer items/s at the peer's p99


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

def _run(entry: dict, stack: str, concurrency: int) -> dict | None:
    return (entry.get(stack) or {}).get("runs", {}).get(str(concurrency))


def _lat(run: dict | None, key: str) -> float | None:
    return None if run is None else run["latency_ms"].get(key)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _points(runs: dict) -> list[SweepPoint]:
    return [SweepPoint(int(c), r["items_per_s"], r["latency_ms"].get("p99"), r["error_rate"])
            for c, r in sorted(runs.items(), key=lambda kv: int(kv[0]))]


def analyze(results: dict) -> dict:
    """Per model and precision: the side-by-side numbers, ratios and targets.

    Returns {"models": {spec: {"rows": {precision: {...}}, "peer": [...]}}, "targets": [...]}.
    """
    n = results["config"]["concurrency"]
    gflops = results.get("roofline", {}).get("attainable_gflops")
    out: dict = {"models": {}, "targets": []}
    for spec, model in results["models"].items():
        rows = {}
        fp32 = model["precisions"].get("fp32")
        for precision, entry in model["precisions"].items():
            tri_n, gw_n = _run(entry, "triton", n), _run(entry, "gateway", n)
            tri_1, gw_1 = _run(entry, "triton", 1), _run(entry, "gateway", 1)
            ort_best = entry["ort"]["best_items_per_s"]
            row = {
                "model_mb": entry["model_bytes"] / 1e6,
                "ort_best": ort_best, "ort_batch": entry["ort"]["best_batch"],
                "triton": tri_n and tri_n["items_per_s"], "gateway": gw_n and gw_n["items_per_s"],
                "triton_p50_1": _lat(tri_1, "p50"), "gateway_p50_1": _lat(gw_1, "p50"),
                "triton_p99_1": _lat(tri_1, "p99"), "gateway_p99_1": _lat(gw_1, "p99"),
                "triton_p99_n": _lat(tri_n, "p99"), "gateway_p99_n": _lat(gw_n, "p99"),
                "errors": sum(sum(r["errors"].values()) for s in ("triton", "gateway")
                              for r in (entry.get(s) or {}).get("runs", {}).values()),
            }
            row["gateway_ratio"] = _ratio(row["gateway"], row["triton"])
            row["added_p50"] = (None if None in (row["gateway_p50_1"], row["triton_p50_1"])
                                else row["gateway_p50_1"] - row["triton_p50_1"])
            row["added_p99"] = (None if None in (row["gateway_p99_1"], row["triton_p99_1"])
                                else row["gateway_p99_1"] - row["triton_p99_1"])
            row["batching_efficiency"] = _ratio(row["triton"], ort_best)
            if fp32 is not None:
                base_rows = {"ort": fp32["ort"]["best_items_per_s"],
                             "triton": (_run(fp32, "triton", n) or {}).get("items_per_s"),
                             "gateway": (_run(fp32, "gateway", n) or {}).get("items_per_s")}
                row["speedup"] = {k: _ratio(row["ort_best"] if k == "ort" else row[k], v)
                                  for k, v in base_rows.items()}
                row["size_ratio"] = _ratio(entry["model_bytes"], fp32["model_bytes"])
            if gflops:
                flops = model["image_flops"]
                row["ort_gflops"] = ort_best * flops / 1e9
                row["ort_roofline"] = row["ort_gflops"] / gflops
                row["gateway_roofline"] = (row["gateway"] or 0) * flops / 1e9 / gflops
            row["evidence"] = {
                "triton_stats": (tri_n or {}).get("triton_stats", {}),
                "gateway_stats": (gw_n or {}).get("triton_stats", {}),
                "cpu_triton_run": (tri_n or {}).get("cpu_ms_per_item", {}),
                "cpu_gateway_run": (gw_n or {}).get("cpu_ms_per_item", {}),
                "cpu_gateway_run_1": (gw_1 or {}).get("cpu_ms_per_item", {}),
                "ort_by_batch": entry["ort"]["by_batch"],
            }
            rows[precision] = row
            _targets(out["targets"], spec, precision, row)
        peer_rows = _peer_rows(model, n)
        for pr in peer_rows:
            if pr.get("ratio") is not None:
                out["targets"].append(_target(
                    spec, pr["precision"], "clipserve / peer items/s at the peer's p99",
                    pr["ratio"], PEER_RATIO_MIN, pr["ratio"] >= PEER_RATIO_MIN, ">=",
                    _why_peer(pr)))
        out["models"][spec] = {"rows": rows, "peer": peer_rows}
    return out


def _target(spec, precision, what, value, threshold, met, op, why) -> dict:
    return {"model": spec, "precision": precision, "target": what, "value": value,
            "threshold": threshold, "op": op, "met": met, "why": "" if met else why,
            "unit": "ms" if what.endswith("(ms)") else "ratio"}


def _targets(targets: list, spec: str, precision: str, row: dict) -> None:
    ev = row["evidence"]
    if row["gateway_ratio"] is not None:
        targets.append(_target(spec, precision, "gateway / Triton-direct items/s",
                               row["gateway_ratio"], GATEWAY_THROUGHPUT_MIN,
                               row["gateway_ratio"] >= GATEWAY_THROUGHPUT_MIN, ">=",
                               _why_gateway_throughput(row, ev)))
    if row["added_p50"] is not None:
        targets.append(_target(spec, precision, "gateway added p50, one caller (ms)",
                               row["added_p50"], ADDED_P50_MAX_MS,
                               row["added_p50"] <= ADDED_P50_MAX_MS, "<=",
                               _why_added_latency(row, ev)))
    if row["batching_efficiency"] is not None:
        targets.append(_target(spec, precision, "batching efficiency (Triton at N / raw ORT best)",
                               row["batching_efficiency"], BATCHING_EFFICIENCY_MIN,
                               row["batching_efficiency"] >= BATCHING_EFFICIENCY_MIN, ">=",
                               _why_batching(row, ev)))


def _cpu_text(cpu: dict) -> str:
    names = {"gateway": "gateway", "triton": "Triton+ORT", "client": "load generator",
             "peer": "infinity-emb"}
    return ", ".join(f"{names.get(k, k)} {v:.2f}" for k, v in cpu.items() if v > 0.005)


def _why_gateway_throughput(row: dict, ev: dict) -> str:
    cpu_t, cpu_g = ev["cpu_triton_run"], ev["cpu_gateway_run"]
    parts = []
    if cpu_t and cpu_g:
        direct = cpu_t.get("triton", 0) + cpu_t.get("client", 0)
        through = cpu_g.get("triton", 0) + cpu_g.get("gateway", 0) + cpu_g.get("client", 0)
        parts.append(f"CPU ms per image: direct run {_cpu_text(cpu_t)}; gateway run "
                     f"{_cpu_text(cpu_g)}. All processes share the same cores, so with the CPU "
                     f"saturated the expected ratio is about {direct / through:.0%} "
                     f"({direct:.2f} / {through:.2f} ms)" if through else "")
    tri, gw = ev["triton_stats"], ev["gateway_stats"]
    if tri.get("avg_batch") and gw.get("avg_batch"):
        parts.append(f"Triton formed batches of {tri['avg_batch']:.1f} direct vs "
                     f"{gw['avg_batch']:.1f} behind the gateway")
    return "; ".join(p for p in parts if p)


def _why_added_latency(row: dict, ev: dict) -> str:
    cpu = ev["cpu_gateway_run_1"]
    text = (f"one caller: Triton-direct p50 {row['triton_p50_1']:.2f} ms, gateway p50 "
            f"{row['gateway_p50_1']:.2f} ms")
    if cpu.get("gateway"):
        text += (f"; the gateway spends {cpu['gateway']:.2f} ms of CPU per call (PNG decode, "
                 "protobuf, a second gRPC hop through tritonclient, asyncio), which is serial "
                 "work on the request's path")
    return text


def _why_batching(row: dict, ev: dict) -> str:
    st = ev["triton_stats"]
    parts = []
    if st.get("avg_batch"):
        at_batch = ev["ort_by_batch"]
        nearest = min(at_batch, key=lambda b: abs(int(b) - st["avg_batch"]))
        parts.append(f"Triton formed batches of {st['avg_batch']:.1f} on average (raw ORT "
                     f"{at_batch[nearest]:.1f} items/s at batch {nearest}, "
                     f"{row['ort_best']:.1f} at its best batch {row['ort_batch']})")
        parts.append(f"model time per item inside Triton {st['compute_ms_per_item']:.2f} ms vs "
                     f"{1000 / row['ort_best']:.2f} ms raw; {st['queue_ms_per_request']:.1f} ms "
                     f"queued and {st['input_output_ms_per_request']:.2f} ms of input/output "
                     "copies per request")
    cpu = ev["cpu_triton_run"]
    if cpu:
        parts.append(f"CPU ms per image: {_cpu_text(cpu)} (the load generator and Triton's "
                     "gRPC/Python-backend work take cores from onnxruntime)")
    return "; ".join(parts)


def _why_peer(pr: dict) -> str:
    text = (f"at p99 <= {pr['budget_ms']:.0f} ms clipserve reaches {pr['clipserve']:.1f} "
            f"items/s, the peer {pr['peer']:.1f}")
    if pr.get("ort_best") and pr["peer"] > pr["ort_best"]:
        text += (f"; the peer is above clipserve's own ceiling (raw onnxruntime in-process, "
                 f"{pr['ort_best']:.1f} items/s at its best batch), so no serving change closes "
                 "the gap: it is the model runtime on this CPU")
    if pr.get("peer_cpu") and pr.get("clipserve_cpu"):
        text += (f"; CPU ms per image at the top step: peer {_cpu_text(pr['peer_cpu'])}; "
                 f"clipserve {_cpu_text(pr['clipserve_cpu'])}")
    return text


def _peer_rows(model: dict, n: int) -> list[dict]:
    peer = model.get("peer") or {}
    rows = []
    for dtype, entry in (peer.get("dtypes") or {}).items():
        row = {"dtype": dtype, "precision": entry.get("precision"),
               "status": entry.get("status"), "error": entry.get("error", "")}
        gw_entry = model["precisions"].get(entry.get("precision") or "")
        if entry.get("status") == "ok" and entry.get("runs") and gw_entry:
            peer_points = _points(entry["runs"])
            gw_points = _points((gw_entry.get("gateway") or {}).get("runs", {}))
            best = saturation(peer_points)
            budget = best.p99_ms
            row.update(budget_ms=budget, peer=best.items_per_s, peer_load=best.load,
                       ort_best=gw_entry["ort"]["best_items_per_s"],
                       clipserve=throughput_at_p99(gw_points, budget),
                       peer_points=[(p.load, p.items_per_s, p.p99_ms) for p in peer_points],
                       clipserve_points=[(p.load, p.items_per_s, p.p99_ms) for p in gw_points],
                       peer_cpu=(entry["runs"].get(str(n)) or {}).get("cpu_ms_per_item", {}),
                       clipserve_cpu=(_run(gw_entry, "gateway", n) or {}).get("cpu_ms_per_item",
                                                                               {}))
            row["ratio"] = _ratio(row["clipserve"], row["peer"])
        rows.append(row)
    return rows


# -- plots --------------------------------------------------------------------------------

def plot_all(results: dict, out: Path) -> list[Path]:
    """One throughput-bars PNG and one p99-vs-throughput PNG per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    analysis = analyze(results)
    n = results["config"]["concurrency"]
    paths = []
    for spec, model in results["models"].items():
        rows = analysis["models"][spec]["rows"]
        scale = model["scale"]
        precisions = list(rows)
        stacks = [("raw ORT (best batch)", "ort_best"), (f"Triton direct, {n} callers", "triton"),
                  (f"gateway, {n} callers", "gateway")]
        peer_by_precision = {r["precision"]: r for r in analysis["models"][spec]["peer"]
                             if r.get("peer") is not None}
        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / (len(stacks) + (1 if peer_by_precision else 0))
        x = np.arange(len(precisions))
        for i, (label, key) in enumerate(stacks):
            ax.bar(x + i * width, [rows[p][key] or 0 for p in precisions], width, label=label)
        if peer_by_precision:
            ax.bar(x + len(stacks) * width,
                   [peer_by_precision[p]["peer"] if p in peer_by_precision else 0
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
        for precision, entry in model["precisions"].items():
            pts = _points((entry.get("gateway") or {}).get("runs", {}))
            if pts:
                ax.plot([p.items_per_s for p in pts], [p.p99_ms for p in pts], marker="o",
                        label=f"clipserve gateway {precision}")
                for p in pts:
                    ax.annotate(f"{p.load:g}", (p.items_per_s, p.p99_ms), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        for dtype, entry in ((model.get("peer") or {}).get("dtypes") or {}).items():
            pts = _points(entry.get("runs") or {})
            if pts and entry.get("status") == "ok":
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


def markdown(results: dict, plots: list[Path], base: Path) -> str:
    """BENCHMARKS.md from the results; ``plots`` are linked relative to ``base``."""
    analysis = analyze(results)
    cfg, machine = results["config"], results["machine"]
    n = cfg["concurrency"]
    gflops = results.get("roofline", {}).get("attainable_gflops")
    load_start, load_end = machine.get("loadavg_start", [0])[0], machine.get("loadavg_end", [0])[0]
    lines = [
        "# clipserve benchmarks",
        "",
        "Generated by one command, rerunnable on any machine:",
        "",
        "```bash",
        results.get("command", "python -m clipserve.loadtest.bench"),
        "```",
        "",
        f"Run {results.get('started_at', '?')}, {results.get('wall_s', 0) / 60:.1f} min, on "
        f"{machine.get('cpu') or 'an unknown CPU'} ({machine.get('cores')} cores), Python "
        f"{machine.get('python')}, " + ", ".join(f"{k} {v}" for k, v in
                                                 machine.get("versions", {}).items()) + ".",
        f"CPU: {machine.get('cpu_info', {}).get('describe', 'flags not recorded')}.",
        f"Load average {load_start:.2f} at the start and {load_end:.2f} at the end"
        + (" (the machine was **not idle**: other work shared the cores, so absolute numbers "
           "are low and noisy; ratios within the run are the meaningful part)."
           if max(load_start, load_end) > 1.0 else "."),
        "",
        "What is measured (all on 127.0.0.1, single-image requests of the same built-in digit "
        "images, encoded as PNG at the model's input size; Triton direct gets the same images "
        "decoded to uint8 pixels, as a client of raw Triton would send them):",
        "",
        f"- **raw ORT**: onnxruntime in-process on the exported `model.onnx`, batch sizes "
        f"{', '.join(cfg['ort_batches'])}, best kept: the ceiling.",
        f"- **Triton direct**: `tritonclient` gRPC to the same Triton (Python backend running "
        f"onnxruntime, dynamic batching on), {n} concurrent callers for throughput, 1 for latency.",
        "- **gateway**: the clipserve gateway (`clipserve serve --triton-url`) in front of that "
        "Triton, same load, routed by `x-clip-precision`.",
        "- **peer**: infinity-emb serving the same architecture with random weights from a local "
        "Hugging Face directory, in its own virtualenv, same images and callers.",
        f"- Closed loops: {cfg['duration']:g} s measured per throughput step, "
        f"{cfg['latency_duration']:g} s per one-caller step, each after {cfg['warmup']:g} s of "
        "warm-up; p50/p99 are nearest-rank over every request in the window.",
        "",
    ]
    lines += ["## Targets", ""]
    target_rows = []
    for t in analysis["targets"]:
        in_ms = t["unit"] == "ms"
        value = f"{t['value']:.2f} ms" if in_ms else f"{t['value']:.1%}"
        threshold = (f"{t['op']} {t['threshold']:g} ms" if in_ms
                     else f"{t['op']} {t['threshold']:.0%}")
        if t["met"] and in_ms and t["value"] < -ADDED_P50_MAX_MS:
            # The gateway's path includes Triton, so it cannot really be faster: the direct
            # run was disturbed (other load, or the first run after start-up).
            verdict = "met; negative: the direct run was disturbed, rerun to confirm"
        elif t["met"]:
            verdict = "met"
        elif in_ms:
            verdict = f"missed by {t['value'] - t['threshold']:.2f} ms"
        else:
            verdict = f"missed by {(t['threshold'] - t['value']) * 100:.1f} points"
        target_rows.append([results["models"][t["model"]]["scale"], t["precision"], t["target"],
                            value, threshold, verdict])
    lines += _table(["model", "precision", "target", "measured", "wanted", "verdict"],
                    target_rows)
    lines.append("")

    for spec, model in results["models"].items():
        rows = analysis["models"][spec]["rows"]
        scale = model["scale"]
        lines += [f"## {scale} ({spec}), {model['image_size']}x{model['image_size']} images", ""]
        if model.get("export_current") is False:
            lines += [f"The repository ({model['repository']}) was exported before the latest "
                      "change to the export stage and reused; rerun with `--reexport` to "
                      "measure a fresh export.", ""]
        lines += _table(
            ["precision", "model MB", "raw ORT img/s (batch)", f"Triton img/s @{n}",
             f"gateway img/s @{n}", "gateway/Triton", "p50 Triton/gateway @1 (ms)",
             "added p50 / p99 @1 (ms)", f"p99 Triton/gateway @{n} (ms)", "batching eff.",
             "errors"],
            [[p, _f(r["model_mb"]), f"{r['ort_best']:.1f} ({r['ort_batch']})", _f(r["triton"]),
              _f(r["gateway"]), _pct(r["gateway_ratio"]),
              f"{_f(r['triton_p50_1'], '{:.2f}')} / {_f(r['gateway_p50_1'], '{:.2f}')}",
              f"{_f(r['added_p50'], '{:+.2f}')} / {_f(r['added_p99'], '{:+.2f}')}",
              f"{_f(r['triton_p99_n'], '{:.0f}')} / {_f(r['gateway_p99_n'], '{:.0f}')}",
              _pct(r["batching_efficiency"]), str(r["errors"])] for p, r in rows.items()])
        lines.append("")
        if "fp32" in rows:
            lines += ["Precision against FP32 (throughput ratios; size of the image tower's "
                      "ONNX file):", ""]
            lines += _table(["precision", "raw ORT", "Triton direct", "gateway", "size"],
                            [[p, _x(r["speedup"]["ort"]), _x(r["speedup"]["triton"]),
                              _x(r["speedup"]["gateway"]), _x(r["size_ratio"])]
                             for p, r in rows.items() if p != "fp32"])
            lines.append("")
        if gflops:
            lines += [f"Roofline: the image tower costs {model['image_flops'] / 1e9:.3f} GFLOP per "
                      f"image (MatMul/Gemm/Conv of the FP32 ONNX graph at batch 1, 2 FLOPs per "
                      f"multiply-add); a {results['roofline']['matmul_n']}-square float32 matmul "
                      f"reaches {gflops:.1f} GFLOP/s here. Quantized rows count the same "
                      "(FP32-equivalent) FLOPs, so above 100% means the precision does less work "
                      "than FP32 arithmetic would.", ""]
            lines += _table(["precision", "raw ORT GFLOP/s", "of attainable",
                             f"gateway @{n} of attainable"],
                            [[p, _f(r.get("ort_gflops")), _pct(r.get("ort_roofline")),
                              _pct(r.get("gateway_roofline"))] for p, r in rows.items()])
            lines.append("")
        if model.get("runtime_axis"):
            from .runtime_bench import table_lines

            lines += [f"Runtime axis (in process, batch {cfg.get('runtime_batch')}, "
                      f"{cfg.get('runtime_threads') or 'all'} threads; each precision at its own "
                      "peak: " + "; ".join(f"{p} {v['factor']:g}x fp32 ({v['assumes']})"
                                          for p, v in model.get("peaks", {}).items()) + "):", ""]
            lines += table_lines(model["runtime_axis"])
            lines.append("")
        peer = model.get("peer")
        if peer:
            lines += ["### Against the peer (infinity-emb)", ""]
            if peer.get("status") != "ok":
                lines += [f"Peer not measured: {peer.get('reason') or peer.get('error')}", ""]
            else:
                lines += [f"infinity-emb {' / torch '.join(peer.get('versions', []))}, "
                          "`--engine torch --device cpu`, its own dynamic batching (batch 32). "
                          "Both swept over concurrent callers; *at equal p99* reads clipserve's "
                          "sweep at the p99 the peer had at its best throughput (interpolated "
                          "between steps).", ""]
                table_rows = []
                for pr in analysis["models"][spec]["peer"]:
                    if pr["status"] != "ok":
                        table_rows.append([pr["dtype"], pr["precision"] or "-",
                                           "failed: " + (pr["error"].splitlines() or [""])[0][:120],
                                           "-", "-", "-"])
                        continue
                    steps = ", ".join(f"{c:g}: {tp:.1f}/s p99 {_f(p99, '{:.0f}')} ms"
                                      for c, tp, p99 in pr["peer_points"])
                    cs = ", ".join(f"{c:g}: {tp:.1f}/s p99 {_f(p99, '{:.0f}')} ms"
                                   for c, tp, p99 in pr["clipserve_points"])
                    table_rows.append([pr["dtype"], pr["precision"], steps, cs,
                                       f"{pr['budget_ms']:.0f} ms: {pr['clipserve']:.1f} vs "
                                       f"{pr['peer']:.1f}", _x(pr["ratio"])])
                lines += _table(["peer dtype", "clipserve precision", "peer (callers: img/s, p99)",
                                 "clipserve gateway (callers: img/s, p99)",
                                 "img/s at equal p99 (clipserve vs peer)", "ratio"], table_rows)
                lines.append("")
        for path in plots:
            if path.name.startswith(f"{scale}-"):
                lines.append(f"![{path.stem}]({_relative(path, base)})")
        lines.append("")

    lines += ["## Why targets were missed", ""]
    missed = [t for t in analysis["targets"] if not t["met"]]
    if not missed:
        lines += ["Every target was met.", ""]
    for t in missed:
        lines.append(f"- **{results['models'][t['model']]['scale']} {t['precision']}, "
                     f"{t['target']}**: {t['why']}.")
    lines.append("")
    lines += ["## Evidence", ""]
    for spec, model in results["models"].items():
        rows = analysis["models"][spec]["rows"]
        lines += [f"### {model['scale']}: Triton's own statistics at {n} callers", ""]
        ev_rows = []
        for p, r in rows.items():
            for stack, key in (("direct", "triton_stats"), ("gateway", "gateway_stats")):
                st = r["evidence"][key]
                cpu = r["evidence"]["cpu_triton_run" if stack == "direct" else "cpu_gateway_run"]
                ev_rows.append([p, stack, _f(st.get("avg_batch"), "{:.2f}"),
                                _f(st.get("queue_ms_per_request")),
                                _f(st.get("compute_ms_per_execution")),
                                _f(st.get("compute_ms_per_item"), "{:.2f}"),
                                _cpu_text(cpu) or "-"])
        lines += _table(["precision", "load", "avg batch", "queue ms/request",
                         "compute ms/batch", "compute ms/item", "CPU ms per image by process"],
                        ev_rows)
        lines.append("")
        prof = model.get("gateway_profile")
        if prof:
            lines += [f"### {model['scale']}: gateway profile (py-spy, {prof.get('precision')}, "
                      f"{prof.get('concurrency')} callers)", ""]
            if prof.get("status") != "ok":
                lines += [f"Not available: {prof.get('status')}", ""]
            else:
                areas = ", ".join(f"{k} {v:.0f}%" for k, v in prof["by_area"].items())
                lines += [f"{prof['samples']} busy samples of the gateway's threads at 100 Hz "
                          f"({prof.get('idle_samples', 0)} waiting ones left out); self time by "
                          f"area: {areas}. Top functions by self time:", ""]
                lines += [f"- {name}: {pct:.1f}%" for name, pct in prof["top_self"]]
                lines.append("")
    lines += ["Raw numbers: `bench.json` next to the plots (every run's summary, Triton "
              "statistics and CPU per process).", ""]
    return "\n".join(lines)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the plots and the markdown from a saved bench.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m clipserve.loadtest.bench_report BENCH_JSON MARKDOWN",
              file=sys.stderr)
        return 2
    bench_json, md = Path(argv[0]), Path(argv[1])
    results = json.loads(bench_json.read_text())
    plots = plot_all(results, bench_json.parent)
    md.write_text(markdown(results, plots, md.resolve().parent))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
