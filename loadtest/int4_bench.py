"""INT4 speed on this CPU: MatMulNBits at accuracy_level 0 (weight-only, float activations)
and 4 (int8 activations at run time, W4A8) against FP32, side by side, in process.

    python -m clipserve.loadtest.int4_bench --model ViT-B-32::none --batch 8 --seconds 6

It exports the model's image tower (FP32 ONNX, then the transformer optimizer's fusions, as
the export does), writes the INT4 candidates named by ``--methods`` (default: RTN symmetric
block 32 at both levels, block 128 at both levels) and runs every session on the same batch of
built-in digit images in interleaved rounds, keeping each one's best round, so a burst of
other load hits every row alike. Each row: images/s, the ratio to FP32 measured in the same
run, file size and min cosine to FP32. Prints a table and writes ``<out>/int4_speed.json``
with the CPU and its busy cores at the start (timings compare only within one run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from clipserve import calibration as cal
from clipserve import cpu as cpu_info

from . import workload as wl

DEFAULT_METHODS = ("rtn-sym-b32-a0", "rtn-sym-b32-a4", "rtn-sym-b128-a0", "rtn-sym-b128-a4")


def build(spec: str, cache: Path, methods, log=print) -> tuple[dict, int]:
    """{label: ONNX path} for FP32 and each INT4 method (image tower), and the image size."""
    from clipserve.endpoints import Tower
    from clipserve.export import models, quantize, recipes
    from clipserve.export import onnx_export as ox

    model_spec = models.parse_model(spec)
    folder = cache / "int4_bench" / model_spec.scale
    folder.mkdir(parents=True, exist_ok=True)
    model = models.load(model_spec, cache, log=log)
    shapes = ox.tower_shapes(model)
    fp32 = ox.export_tower(model, Tower.IMAGE, shapes, folder / "fp32_image.onnx")
    optimized = quantize.optimize(fp32, folder / "fp32opt_image.onnx")
    files = {"fp32": fp32}
    for name in methods:
        recipe = recipes.Int4Recipe.parse(name)
        path = folder / f"int4_{recipe.name}.onnx"
        log(f"{spec}: int4 {recipe.name}")
        quantize.to_int4_recipe(optimized, path, recipe)
        files[recipe.name] = path
    return files, shapes.image_size


def measure(files: dict, pixels: np.ndarray, seconds: float, rounds: int = 3,
            threads: int | None = None) -> list[dict]:
    """One row per file: best-of-``rounds`` images/s (rounds interleaved across files), ratio
    to FP32, size, min cosine to FP32."""
    from clipserve.export import evaluate

    sessions = {label: evaluate.make_session(path, threads) for label, path in files.items()}
    outputs = {label: s.run(None, {"pixels": pixels})[0] for label, s in sessions.items()}
    speeds = {label: [] for label in files}
    for _ in range(rounds):
        for label, session in sessions.items():
            speeds[label].append(evaluate.throughput(session, pixels, seconds / rounds))
    base = max(speeds["fp32"])
    rows = []
    for label, path in files.items():
        best = max(speeds[label])
        rows.append({"label": label, "images_per_s": round(best, 2),
                     "ratio_to_fp32": round(best / base, 3),
                     # rounds are interleaved, so round i of every graph saw similar load:
                     # the median of the per-round ratios is less moved by load drift
                     "ratio_median_per_round": round(float(np.median(
                         np.array(speeds[label]) / np.array(speeds["fp32"]))), 3),
                     "rounds_images_per_s": [round(v, 2) for v in speeds[label]],
                     "size_mb": round(Path(path).stat().st_size / 1e6, 2),
                     "min_cosine_to_fp32": round(float(cal.cosine_rows(
                         outputs[label], outputs["fp32"]).min()), 5)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| graph | images/s (best round) | x FP32 (best rounds) | x FP32 (median per round) "
             "| size MB | min cos to FP32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['images_per_s']:.1f} | {r['ratio_to_fp32']:.2f} | "
                     f"{r['ratio_median_per_round']:.2f} | "
                     f"{r['size_mb']:.1f} | {r['min_cosine_to_fp32']:.5f} |")
    return "\n".join(lines)


def _busy_cores(interval: float = 2.0) -> float | None:
    """Cores busy over ``interval`` seconds (from /proc/stat), before the run."""
    def read():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)
    try:
        idle0, total0 = read()
        time.sleep(interval)
        idle1, total1 = read()
    except OSError:
        return None
    machine = cpu_info.detect()
    return round((1 - (idle1 - idle0) / max(total1 - total0, 1e-9)) * machine.cores, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32::none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="measured seconds per graph, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each graph's best round is kept")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--cache", default=str(Path(".cache")))
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        files, size = build(args.model, Path(args.cache), methods,
                            log=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:
        print(f"int4_bench: error: {exc}", file=sys.stderr)
        return 2
    pixels = wl.builtin_pixels(args.batch, size)
    busy = _busy_cores()
    rows = measure(files, pixels, args.seconds, rounds=args.rounds)
    machine = cpu_info.detect()
    result = {"model": args.model, "batch": args.batch, "seconds": args.seconds,
              "rounds": args.rounds,
              "cpu": machine.as_dict(), "cpu_description": machine.describe(),
              "busy_cores_at_start": busy, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int4_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} image tower, batch {args.batch}, {machine.describe()}; "
          f"busy cores at start: {busy}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
