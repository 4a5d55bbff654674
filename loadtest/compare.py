"""Side-by-side table of gateway variants over several benchmark runs (``--gateways``).

    python -m clipserve.loadtest.compare benchmarks/run1/bench.json benchmarks/run2/bench.json

On a shared machine one run is noisy; each cell is the median over the runs (and the rounds of
``bench --rounds``), with the range.
For each model, precision, stack (Triton direct and each gateway variant) and concurrency:
items/s, p50, Triton's average batch over the run, CPU ms per item of that stack's own process
group, and the ratio to Triton direct in the same run. Prints Markdown; ``--json`` writes the
medians too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _cell(values: list[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _rounds(stack_entry: dict) -> list[dict]:
    """A stack's runs by concurrency, one dict per round (bench --rounds; else its one run)."""
    return stack_entry.get("rounds") or ([stack_entry["runs"]] if "runs" in stack_entry else [])


def _add(table: dict, spec: str, precision: str, stack: str, model: dict, c: int, run: dict,
         direct: dict | None) -> None:
    row = table.setdefault((spec, precision, stack, c), {
        "model": spec, "precision": precision, "stack": stack,
        "flags": " ".join(model.get("gateways", {}).get(stack, [])),
        "concurrency": c, "items_per_s": [], "p50_ms": [], "triton_batch": [],
        "cpu_ms_per_item": [], "of_triton": []})
    row["items_per_s"].append(run["items_per_s"])
    row["p50_ms"].append(run["latency_ms"]["p50"])
    row["triton_batch"].append(run.get("triton_stats", {}).get("avg_batch"))
    row["cpu_ms_per_item"].append((run.get("cpu_ms_per_item") or {}).get(stack))
    row["of_triton"].append(run["items_per_s"] / direct["items_per_s"]
                            if direct and direct["items_per_s"] else None)


def rows(results: list[dict]) -> list[dict]:
    """One row per (model, precision, stack, concurrency), values listed per run and round
    (each round's ratio to Triton direct uses that round's Triton run)."""
    table: dict[tuple, dict] = {}
    for result in results:
        for spec, model in result["models"].items():
            for precision, entry in model["precisions"].items():
                stacks = [k for k, v in entry.items() if isinstance(v, dict) and "runs" in v]
                direct_rounds = _rounds(entry.get("triton", {}))
                for stack in stacks:
                    for r, runs in enumerate(_rounds(entry[stack])):
                        direct = direct_rounds[r] if r < len(direct_rounds) else {}
                        for c, run in runs.items():
                            _add(table, spec, precision, stack, model, int(c), run,
                                 direct.get(c))
    return list(table.values())


def _round_count(results: list[dict]) -> int:
    return max((len(_rounds(entry.get("triton", {}))) for r in results
                for model in r["models"].values() for entry in model["precisions"].values()),
               default=1)


def markdown(results: list[dict]) -> str:
    loads = [r["machine"].get("loadavg_start", [None])[0] for r in results]
    lines = [f"{len(results)} run(s) of {_round_count(results)} round(s); load average (1 min) at their starts: "
             + ", ".join(f"{x:.1f}" for x in loads if x is not None)
             + f"; {results[0]['machine'].get('cores')} cores, {results[0]['machine'].get('cpu')}."
             " Median (min-max) over the runs and rounds.", "",
             "| model | precision | stack | flags | callers | items/s | of Triton direct | p50 ms "
             "| Triton avg batch | CPU ms/item (stack) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows(results):
        lines.append(
            f"| {row['model']} | {row['precision']} | {row['stack']} | {row['flags'] or '-'} "
            f"| {row['concurrency']} | {_cell(row['items_per_s'])} "
            f"| {_cell(row['of_triton'], 2)} | {_cell(row['p50_ms'])} "
            f"| {_cell(row['triton_batch'], 2)} | {_cell(row['cpu_ms_per_item'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench.json files")
    parser.add_argument("--json", type=Path, help="also write the rows (values per run) here")
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.runs]
    print(markdown(results), end="")
    if args.json:
        args.json.write_text(json.dumps(rows(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
