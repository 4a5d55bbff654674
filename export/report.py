"""Write the quality report: JSON for machines, a Markdown table and a PNG plot for people."""

from __future__ import annotations

import json
from pathlib import Path

from clipserve.endpoints import Precision

# Column order of the Markdown table; report.json carries every field of every row.
COLUMNS = [
    ("model", "model", "{}"), ("precision", "precision", "{}"), ("tower", "tower", "{}"),
    ("size_bytes", "size MB", "MB"), ("cosine_mean", "cos mean", "{:.5f}"),
    ("cosine_min", "cos min", "{:.5f}"), ("zero_shot_top1", "top-1", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"), ("ece_calibrated", "ECE (T fit)", "{:.3f}"),
    ("temperature", "T", "{:.4f}"), ("ood_auroc", "OOD AUROC", "{:.3f}"),
    ("fpr95", "FPR@95", "{:.3f}"), ("ood_threshold", "OOD thr", "{:.3f}"),
    ("items_per_s", "items/s", "{:.0f}"),
]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    if fmt == "MB":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def markdown(rows: list[dict], notes: list[str]) -> str:
    """The report as a Markdown table plus notes."""
    lines = ["# clipserve export report", "",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    lines += ["", *notes, ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """One row of panels per figure (top-1, ECE before/after, OOD AUROC, size, throughput),
    precisions on the x axis, one line per model; image towers only except for size/speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = [p.value for p in Precision]
    models = sorted({row["model"] for row in rows})
    panels = [("zero_shot_top1", "zero-shot top-1", "image"),
              ("ece", "ECE (native T), dashed: fitted T", "image"),
              ("ood_auroc", "OOD AUROC (MCM)", "image"),
              ("cosine_mean", "cosine to FP32 (solid image, dashed text)", "both"),
              ("size_bytes", "size MB (solid image, dashed text)", "both"),
              ("items_per_s", "items/s (solid image, dashed text)", "both")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title, towers) in zip(axes.flat, panels):
        for i, model in enumerate(models):
            color = f"C{i}"
            for tower, style in (("image", "-"), ("text", "--")):
                if towers == "image" and tower == "text":
                    continue
                by_p = {r["precision"]: r for r in rows if r["model"] == model and r["tower"] == tower}
                xs = [p for p in precisions if p in by_p and by_p[p].get(key) is not None]
                ys = [by_p[p][key] / (1e6 if key == "size_bytes" else 1) for p in xs]
                ax.plot(xs, ys, style, marker="o", color=color,
                        label=model if tower == "image" else None)
                if key == "ece":
                    ax.plot(xs, [by_p[p]["ece_calibrated"] for p in xs], "--", marker="x",
                            color=color)
        if key == "size_bytes":
            ax.set_yscale("log")  # text towers (vocabulary table) dwarf small image towers
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("clipserve: what each precision costs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(rows: list[dict], directory: Path, notes: list[str]) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``directory``."""
    directory = Path(directory)
    paths = {"json": directory / "report.json", "md": directory / "report.md",
             "png": directory / "report.png"}
    # report.json is a plain list, one object per model x precision x tower.
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    paths["md"].write_text(markdown(rows, notes))
    plot(rows, paths["png"])
    return paths
