"""Write the quality report: JSON for machines, Markdown and PNG plots for people.

The Markdown leads with the verdict per endpoint (what a user reads first), then the figures
with their intervals, OOD scores, covariate shift, retrieval and the scale study. Every delta
is candidate minus FP32 on the same items with its paired-bootstrap 95% interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clipserve.endpoints import Precision
from clipserve.export.quality import OOD_SCORES, POINT_METRICS

PRECISION_ORDER = [p.value for p in Precision]
# Columns of the quality table: report.json carries every field of every row.
COLUMNS = [
    ("model", "model", "{}"), ("precision", "precision", "{}"), ("tower", "tower", "{}"),
    ("params", "params M", "M"), ("size_bytes", "size MB", "MB"),
    ("cosine_mean", "cos mean", "{:.5f}"), ("cosine_min", "cos min", "{:.5f}"),
    ("top1", "top-1", "{:.3f}"), ("top5", "top-5", "{:.3f}"), ("ece", "ECE", "{:.3f}"),
    ("ece_calibrated", "ECE (T fit)", "{:.3f}"), ("temperature", "T", "{:.4f}"),
    ("nll", "NLL", "{:.3f}"), ("brier", "Brier", "{:.3f}"),
    ("ood_auroc", "OOD AUROC", "{:.3f}"), ("ood_auroc_near", "near", "{:.3f}"),
    ("ood_auroc_far", "far", "{:.3f}"), ("fpr95", "FPR@95", "{:.3f}"),
    ("ood_threshold", "MCM thr", "{:.3f}"), ("items_per_s", "items/s", "{:.0f}"),
]
VERDICT_METRICS = ["top1", "ece", "nll", "ood_auroc", "shift_top1"]
SCALE_METRICS = ["top1", "ece", "nll", "ood_auroc", "shift_top1", "fpr95"]
TITLES = {"top1": "top-1", "top5": "top-5", "ece": "ECE (fitted T)", "ece_native": "ECE (own T)",
          "nll": "NLL", "brier": "Brier", "ood_auroc": "OOD AUROC (MCM)", "fpr95": "FPR@95",
          "shift_top1": "top-1 under shift", "shift_ece": "ECE under shift",
          "ood_auroc_knn": "OOD AUROC (kNN)", "ood_auroc_mahalanobis": "OOD AUROC (Mahalanobis)",
          "ood_auroc_mcm_shared_t": "OOD AUROC (MCM, FP32's T)"}


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "params":
        value = row.get("params_image" if row.get("tower") == "image" else "params_text")
    else:
        value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "MB":
        return f"{value / 1e6:.2f}"
    if fmt == "M":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def fmt_delta(metric: str, delta: dict | None) -> str:
    """``-0.7 [-2.2, +0.7]``: points for accuracies and recall, absolute otherwise."""
    if not delta:
        return "–"
    k, digits = (100.0, 1) if metric in POINT_METRICS else (1.0, 3)
    return (f"{delta['delta'] * k:+.{digits}f} [{delta['lo'] * k:+.{digits}f}, "
            f"{delta['hi'] * k:+.{digits}f}]")


def _served(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("seed", 0) == 0]


def _order(rows: list[dict]) -> list[dict]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(rows, key=lambda r: (models.index(r["model"]), r.get("seed", 0),
                                       PRECISION_ORDER.index(r["precision"])
                                       if r["precision"] in PRECISION_ORDER else 99,
                                       r["tower"]))


def verdict_table(rows: list[dict]) -> list[str]:
    lines = ["| endpoint | n test | verdict | deciding | " + " | ".join(
        f"{TITLES[m]} Δ" for m in VERDICT_METRICS) + " | flip rate | McNemar p | items to "
        "settle |", "|" + "---|" * (len(VERDICT_METRICS) + 7)]
    for r in _order(_served(rows)):
        if r["precision"] == "fp32":
            continue
        v = r.get("verdict", {})
        deltas = r.get("deltas", {})
        mcnemar = r.get("mcnemar") or {}
        p = mcnemar.get("p_value")
        lines.append("| " + " | ".join([
            r["endpoint"], str(r.get("n_test", "–")), f"**{v.get('verdict', '–')}**",
            ", ".join(v.get("deciding", [])) or "–",
            *[fmt_delta(m, deltas.get(m)) for m in VERDICT_METRICS],
            f"{r['flip_rate']:.3f}" if r.get("flip_rate") is not None else "–",
            f"{p:.3g}" if p is not None else "–",
            str(v.get("items_needed") or "–")]) + " |")
    return lines


def quality_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in _order(_served(rows)):
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return lines


def ood_table(rows: list[dict]) -> list[str]:
    image = [r for r in _order(_served(rows)) if r["tower"] == "image" and r.get("ood_auroc_by_set")]
    if not image:
        return []
    sets = list(image[0]["ood_auroc_by_set"])
    scores = [*OOD_SCORES, "mcm_shared_t"]
    head = ["endpoint", "live score"] + [f"{s} {name}" for name in ["pooled", *sets] for s in scores]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in image:
        pooled = [r.get("ood_auroc" + ("" if s == "mcm" else f"_{s}")) for s in scores]
        per_set = [r["ood_auroc_by_set"][n].get(s) for n in sets for s in scores]
        lines.append("| " + " | ".join([r["endpoint"], r.get("live_ood_score", "–")] + [
            "–" if v is None else f"{v:.3f}" for v in pooled + per_set]) + " |")
    flagged = ["", "Share flagged OOD at each score's threshold (fitted to keep >= 95% of "
               "calibration items, kNN and Mahalanobis on out-of-fold scores of those items; "
               "on test items it should read about 5%, or a little less for those two):", "",
               "| endpoint | test (ID) MCM | " + " | ".join(
                   f"{n} {s}" for n in sets for s in OOD_SCORES) + " |",
               "|" + "---|" * (2 + len(sets) * len(OOD_SCORES))]
    for r in image:
        flagged.append("| " + " | ".join([r["endpoint"], f"{r['flagged_rate_id']:.3f}"] + [
            f"{r['flagged_rate_by_set'][n][s]:.3f}" for n in sets for s in OOD_SCORES]) + " |")
    return lines + flagged


def shift_table(rows: list[dict]) -> list[str]:
    image = [r for r in _order(_served(rows)) if r["tower"] == "image" and r.get("shift_by_set")]
    if not image:
        return []
    sets = list(image[0]["shift_by_set"])
    head = ["endpoint", "top-1 in distribution", "top-1 under shift", "Δ top-1 in dist.",
            "Δ top-1 under shift", "Δ ECE under shift", *sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in image:
        d = r.get("deltas", {})
        lines.append("| " + " | ".join([
            r["endpoint"], f"{r['top1']:.3f}", f"{r['shift_top1']:.3f}",
            fmt_delta("top1", d.get("top1")), fmt_delta("shift_top1", d.get("shift_top1")),
            fmt_delta("shift_ece", d.get("shift_ece")),
            *[f"{r['shift_by_set'][n]['top1']:.3f}" for n in sets]]) + " |")
    return lines


def formats_table(rows: list[dict]) -> list[str]:
    """Recall@k of each embedding output format against float32, and its bytes per vector."""
    served = [r for r in _order(_served(rows)) if r.get("output_formats")]
    if not served:
        return []
    names = [k for k, v in served[0]["output_formats"].items() if isinstance(v, dict)]
    k = served[0]["output_formats"]["k"]
    lines = ["| endpoint | queries x corpus | " + " | ".join(
        f"{n} recall@{k} (bytes)" for n in names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in served:
        f = r["output_formats"]
        lines.append("| " + " | ".join([r["endpoint"], f"{f['n_queries']} x {f['n_corpus']}"] + [
            f"{f[n]['recall_at_k']:.3f} ({f[n]['bytes_per_vector']})" for n in names]) + " |")
    return lines


def retrieval_table(rows: list[dict]) -> list[str]:
    keys = [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    served = [r for r in _order(_served(rows)) if any(k in r for k in keys)]
    if not served:
        return []
    lines = ["| endpoint | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in served:
        d = r.get("deltas", {})
        lines.append("| " + " | ".join([r["endpoint"]] + [
            f"{r[k]:.3f}" + (f" ({fmt_delta(k, d[k])})" if k in d else "") for k in keys]) + " |")
    return lines


def candidates_table(rows: list[dict]) -> list[str]:
    """Per scale and INT8/INT4 endpoint: every candidate method measured on the calibration
    split (Δ against FP32 with paired 95% intervals, the verdict against the budget, cosine,
    speed, size), the one kept and why, and how long the search took."""
    lines = []
    for r in _order(_served(rows)):
        choice = (r.get("quantization") or {}).get("choice")
        if not choice:
            continue
        if not lines:
            lines = ["| endpoint | candidate | kept | verdict (calibration) | top-1 Δ | ECE Δ | "
                     "cos mean | cos min | items/s | size MB | s |", "|" + "---|" * 11]
        for name, f in choice["candidates"].items():
            kept = ("PTQ's pick; **QAT served**" if choice.get("qat_served") else "**kept**") \
                if name == choice["chosen"] else ""
            if "error" in f:
                lines.append(f"| {r['endpoint']} | {name} | | failed: {f['error'][:80]} "
                             f"| – | – | – | – | – | – | {f.get('seconds', 0):.1f} |")
                continue
            d = f.get("deltas", {})
            lines.append("| " + " | ".join([
                r["endpoint"], name, kept, f.get("verdict", "–"),
                fmt_delta("top1", d.get("top1")), fmt_delta("ece", d.get("ece")),
                f"{f['cosine_calibration']:.5f}", f"{f['cosine_min']:.5f}",
                f"{f['items_per_s']:.0f}" if "items_per_s" in f else "–",
                f"{f['size_bytes'] / 1e6:.2f}", f"{f.get('seconds', 0):.1f}"]) + " |")
    if not lines:
        return []
    notes = [""]
    for r in _order(_served(rows)):
        q = r.get("quantization") or {}
        if q.get("choice"):
            c = q["choice"]
            notes.append(f"- {r['endpoint']}: {c['mode']}, kept **{c['chosen']}**: {c['why']} "
                         f"({len(c['candidates'])} candidates in {c['seconds']:.0f}s)")
            if q.get("mixed_precision"):
                notes.append(f"  - mixed precision: {q['mixed_precision']['result']}")
    return lines + notes


QAT_METRICS = ["top1", "ece", "nll", "ood_auroc"]


def qat_table(rows: list[dict]) -> list[str]:
    """QAT beside PTQ per model and precision (image endpoints): each one's delta against
    FP32 and the paired QAT - PTQ delta, all on the same test items, and which one is served
    (``quantization.qat``, written by export/qat.py)."""
    entries = [r for r in _order(_served(rows)) if r["tower"] == "image"
               and (r.get("quantization") or {}).get("qat")]
    if not entries:
        return []
    head = ["model", "precision", "served"] + [
        f"{TITLES[m]} Δ {k}" for m in QAT_METRICS for k in ("PTQ", "QAT", "QAT-PTQ")] + [
        "QAT steps (epochs)", "distilled", "why"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in entries:
        q = r["quantization"]["qat"]
        cells = [r["model"], r["precision"], f"**{q['served'].upper()}**"]
        for m in QAT_METRICS:
            cells += [fmt_delta(m, q[k].get(m)) for k in ("ptq", "qat", "qat_minus_ptq")]
        t = q["training"]
        cells += [f"{t['steps']} ({t['epochs']})", f"{t['distilled_share']:.0%}", q["why"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- the scale study -------------------------------------------------------------------------

def scale_study(rows: list[dict]) -> list[dict]:
    """Per precision x tower x metric x model: every seed's delta, their mean and a t interval
    across seeds, against the model's parameter count (image + text towers). Only models
    scored with the first model's rule: a softmax- and a sigmoid-trained model are not two
    sizes of one model (they are compared by :func:`scoring_table`)."""
    from scipy import stats as sps

    rules = [r.get("scoring", "softmax") for r in rows]
    rows = [r for r, rule in zip(rows, rules) if rule == rules[0]] if rows else rows
    out = []
    keys = sorted({(r["precision"], r["tower"]) for r in rows if r["precision"] != "fp32"})
    models = list(dict.fromkeys(r["model"] for r in rows))
    for precision, tower in keys:
        for metric in SCALE_METRICS:
            for model in models:
                group = [r for r in rows if (r["model"], r["precision"], r["tower"]) ==
                         (model, precision, tower) and metric in r.get("deltas", {})]
                if not group:
                    continue
                values = np.array([r["deltas"][metric]["delta"] for r in group])
                mean = float(values.mean())
                if len(values) > 1:
                    half = float(sps.t.ppf(0.975, len(values) - 1) * values.std(ddof=1)
                                 / math.sqrt(len(values)))
                else:
                    half = float("nan")
                out.append({
                    "precision": precision, "tower": tower, "metric": metric, "model": model,
                    "params": int(group[0]["params_image"] + group[0]["params_text"]),
                    "n_seeds": len(values), "mean": mean, "lo": mean - half, "hi": mean + half,
                    "seeds": [{"seed": r.get("seed", 0), **r["deltas"][metric]} for r in group]})
    return out


def scale_trends(study: list[dict]) -> list[dict]:
    """Least-squares slope of the per-seed deltas against log10(parameters), with its 95%
    interval, per precision x tower x metric (needs >= 2 model sizes)."""
    from scipy import stats as sps

    trends = []
    for key in sorted({(s["precision"], s["tower"], s["metric"]) for s in study}):
        entries = [s for s in study if (s["precision"], s["tower"], s["metric"]) == key]
        if len({s["params"] for s in entries}) < 2:
            continue
        x = np.array([math.log10(s["params"]) for s in entries for _ in s["seeds"]])
        y = np.array([seed["delta"] for s in entries for seed in s["seeds"]])
        if len(x) < 3:
            continue
        fit = sps.linregress(x, y)
        half = float(sps.t.ppf(0.975, len(x) - 2) * fit.stderr)
        trends.append({"precision": key[0], "tower": key[1], "metric": key[2],
                       "slope_per_decade": float(fit.slope), "lo": float(fit.slope - half),
                       "hi": float(fit.slope + half), "n": int(len(x))})
    return trends


def scale_conclusion(trends: list[dict]) -> str:
    """One sentence on what the scale study shows, from its own numbers."""
    image = [t for t in trends if t["tower"] == "image"]
    if not image:
        return "The scale study needs at least two model sizes exported together."
    clear = [t for t in image if t["lo"] > 0 or t["hi"] < 0]
    if not clear:
        return (f"Across these sizes no image-endpoint delta changes detectably with scale: "
                f"all {len(image)} slopes of delta against log10(parameters) have 95% intervals "
                f"that include zero.")
    parts = []
    for t in clear:
        unit, k = ("points", 100) if t["metric"] in POINT_METRICS else ("", 1)
        parts.append(f"{t['precision']} {TITLES.get(t['metric'], t['metric'])} "
                     f"{t['slope_per_decade'] * k:+.2f}{' ' + unit if unit else ''} per 10x "
                     f"parameters [{t['lo'] * k:+.2f}, {t['hi'] * k:+.2f}]")
    return (f"{len(clear)} of {len(image)} image-endpoint deltas change detectably with scale: "
            + "; ".join(parts) + "; the rest are flat within their intervals.")


def scale_table(study: list[dict], trends: list[dict]) -> list[str]:
    if not study:
        return []
    lines = ["| precision | tower | metric | model | params M | seeds | mean Δ across seeds "
             "[95% t interval] | per-seed Δ [bootstrap interval] |", "|" + "---|" * 8]
    for s in study:
        if s["tower"] != "image":
            continue
        k, d = (100.0, 1) if s["metric"] in POINT_METRICS else (1.0, 3)
        spread = (f"{s['mean'] * k:+.{d}f} [{s['lo'] * k:+.{d}f}, {s['hi'] * k:+.{d}f}]"
                  if s["n_seeds"] > 1 else f"{s['mean'] * k:+.{d}f}")
        seeds = "; ".join(fmt_delta(s["metric"], x) for x in s["seeds"])
        lines.append(f"| {s['precision']} | {s['tower']} | {TITLES.get(s['metric'], s['metric'])} "
                     f"| {s['model']} | {s['params'] / 1e6:.2f} | {s['n_seeds']} | {spread} "
                     f"| {seeds} |")
    if trends:
        lines += ["", "| precision | tower | metric | slope per 10x params [95%] | points |",
                  "|---|---|---|---|---|"]
        for t in trends:
            k, d = (100.0, 2) if t["metric"] in POINT_METRICS else (1.0, 4)
            lines.append(f"| {t['precision']} | {t['tower']} | {TITLES.get(t['metric'], t['metric'])} "
                         f"| {t['slope_per_decade'] * k:+.{d}f} [{t['lo'] * k:+.{d}f}, "
                         f"{t['hi'] * k:+.{d}f}] | {t['n']} |")
    return lines


# -- notes -----------------------------------------------------------------------------------

def notes(rows: list[dict], *, config: dict, budget: dict[str, float]) -> list[str]:
    """The report's notes: what was measured on what, how, and the budget."""
    data = sorted({(r["model"], r.get("data", "?"), bool(r.get("domain_measured")))
                   for r in rows})
    out = []
    for model, description, measured in data:
        if measured:
            out.append(f"- {model}: measured on {description}.")
        else:
            out.append(f"- **{model}: quality was NOT measured on this model's domain** (it was "
                       f"measured on {description}, which only says the export runs). Its "
                       "sidecars carry no labels, temperature or OOD threshold, so the gateway "
                       "leaves live OOD scoring off. Pass `--eval-data DIR` (or run `clipserve "
                       "evaluate --write-sidecars`) to measure and fit on your data.")
    bound = sorted({r["model"] for r in rows if r.get("temperature_at_bound")})
    if bound:
        out.append(f"- Temperature fit hit its search bound for: {', '.join(bound)} "
                   "(the calibrated figures of those rows are not at an optimum).")
    out += [
        "- Deltas are candidate minus FP32 on the same test items, with a paired bootstrap 95% "
        "interval (items resampled, both precisions see the same resample; OOD metrics "
        "resample ID and OOD items within their groups). Accuracies and recall in percentage "
        "points. Temperature, thresholds and OOD state are fitted on the calibration split and "
        "held fixed in the resamples.",
        "- Verdict per endpoint against the budget " + ", ".join(
            f"{k}={v:g}{' pts' if k in POINT_METRICS or k in ('top1', 'top5', 'recall') else ''}"
            for k, v in budget.items()) + ": **safe** when every budgeted metric's interval "
        "stays within budget at its worst end, **unsafe** when one breaks it even at its best "
        "end, **inconclusive** otherwise, with an estimate of the test items that would settle "
        "it (interval half-width shrinking as 1/sqrt(n) around the same delta).",
        "- Image rows: the image tower at this precision against class embeddings from the "
        "text tower at the same precision (the pair a routed request uses). Text rows: the text "
        "tower at this precision against FP32 image embeddings. flip rate: share of test items "
        "whose top-1 differs from FP32's; McNemar: exact test on the discordant items.",
        "- ECE: 15 equal-width bins, with the model's own logit scale and at the temperature "
        "fitted on the calibration split. OOD: MCM (max softmax of cos/T) at the endpoint's "
        "own T and at FP32's T (so a changed T is not read as a changed ranking), kNN (cosine "
        "to the k-th nearest calibration embedding) and Mahalanobis (to class means, shared "
        "covariance). The live score is written to the image sidecars.",
        "- cosine: each tower's embeddings against the FP32 ONNX tower on the same inputs "
        "(images: test + OOD sets; texts: prompts + random token ids). items/s: onnxruntime "
        "in-process on this machine's CPU at a fixed batch, all cores; compare ratios within "
        "one run.",
        "- Output formats: the share of each query's float32 top-10 neighbours that the format "
        "finds (queries and corpus both in that format): image endpoints search test images "
        "among calibration images, text endpoints the prompts among random-id texts; int8 uses "
        "the per-dimension ranges written to the sidecar (`output_formats`).",
        "- Scale study: the same deltas against log10 of the model's parameters; with several "
        "seeds per size the spread across seeds (t interval) shows model-to-model variation, "
        "which item resampling cannot. It can show whether sensitivity changes over the sizes "
        "exported together; it cannot extrapolate beyond them, and the built-in digits models "
        "are tiny stand-ins for real CLIPs.",
        f"- Config: {config}",
    ]
    return out


SCORING_METRICS = (("ece", "Δ ECE (fitted)"), ("ece_native", "Δ ECE (own scale)"),
                   ("ood_auroc", "Δ OOD AUROC (max prob.)"), ("fpr95", "Δ FPR@95"),
                   ("ood_auroc_knn", "Δ AUROC kNN"))


def scoring_table(rows: list[dict]) -> list[str]:
    """How quantization moves calibration and OOD detection under each scoring rule: the
    image rows' paired-bootstrap deltas against FP32 of softmax-trained (CLIP) and
    sigmoid-trained (SigLIP) models side by side; empty unless both rules were exported."""
    image = [r for r in _order(_served(rows)) if r["tower"] == "image"]
    if len({r.get("scoring", "softmax") for r in image}) < 2:
        return []
    lines = ["| model | scoring | precision | " + " | ".join(t for _, t in SCORING_METRICS)
             + " |", "|" + "---|" * (3 + len(SCORING_METRICS))]
    for r in image:
        if r["precision"] == "fp32":
            continue
        deltas = r.get("deltas", {})
        lines.append(f"| {r['model']} | {r.get('scoring', 'softmax')} | {r['precision']} | "
                     + " | ".join(fmt_delta(m, deltas.get(m)) for m, _ in SCORING_METRICS) + " |")
    lines += ["", "Deltas against each model's own FP32 with paired bootstrap 95% intervals. "
              "Softmax: ECE on the top softmax probability, OOD by MCM; sigmoid: ECE on the top "
              "label's sigmoid probability, OOD by the largest sigmoid probability (its ranking "
              "is that of the largest cosine, so it does not depend on the fitted scale)."]
    return lines


def markdown(rows: list[dict], note_lines: list[str]) -> str:
    """The report as Markdown: verdicts first, then the tables and notes."""
    study = scale_study(rows)
    trends = scale_trends(study)
    lines = ["# clipserve export report", "", "## Verdict per endpoint (against FP32)", "",
             *verdict_table(rows), "", "## Quality", "", *quality_table(rows)]
    for title, table in (("Quantization-aware training beside post-training quantization",
                          qat_table(rows)),
                         ("OOD detection (AUROC per score)", ood_table(rows)),
                         ("Covariate shift", shift_table(rows)),
                         ("Retrieval (recall@k; Δ against FP32)", retrieval_table(rows)),
                         ("Embedding output formats (vector databases)", formats_table(rows)),
                         ("Quantization candidates (measured on the calibration split)",
                          candidates_table(rows)),
                         ("Softmax vs sigmoid scoring under quantization", scoring_table(rows))):
        if table:
            lines += ["", f"## {title}", "", *table]
    if study:
        lines += ["", "## Scale study", "", scale_conclusion(trends), "",
                  *scale_table(study, trends)]
    lines += ["", "## Notes", "", *note_lines, ""]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: Path, budget: dict[str, float] | None = None) -> Path:
    """Deltas against FP32 with their 95% intervals, one panel per metric, precisions on the
    x axis, one series per model (image endpoints, seed 0); the budget as a dashed line."""
    plt = _plt()
    served = [r for r in _served(rows) if r["tower"] == "image" and r.get("deltas")]
    metrics = [m for m in ["top1", "ece", "nll", "ood_auroc", "shift_top1", "fpr95"]
               if any(m in r["deltas"] for r in served)] or ["top1"]
    models = list(dict.fromkeys(r["model"] for r in served))
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(15, 4 * math.ceil(
        len(metrics) / cols)), squeeze=False)
    precisions = [p for p in PRECISION_ORDER if any(r["precision"] == p for r in served)]
    for ax, metric in zip(axes.flat, metrics):
        k = 100.0 if metric in POINT_METRICS else 1.0
        for i, model in enumerate(models):
            by_p = {r["precision"]: r["deltas"][metric] for r in served
                    if r["model"] == model and metric in r["deltas"]}
            xs = [j + (i - (len(models) - 1) / 2) * 0.12 for j, p in enumerate(precisions)
                  if p in by_p]
            ds = [by_p[p] for p in precisions if p in by_p]
            ax.errorbar(xs, [d["delta"] * k for d in ds],
                        yerr=[[(d["delta"] - d["lo"]) * k for d in ds],
                              [(d["hi"] - d["delta"]) * k for d in ds]],
                        fmt="o", capsize=3, color=f"C{i}", label=model)
        ax.axhline(0, color="grey", lw=0.8)
        limit = (budget or {}).get(metric)
        if limit is not None:
            higher = metric in ("top1", "top5", "shift_top1", "ood_auroc")
            ax.axhline(-limit if higher else limit, color="red", ls="--", lw=0.8,
                       label="budget")
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_title(f"Δ {TITLES.get(metric, metric)}" + (" (points)" if k == 100 else ""))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("clipserve: what each precision costs against FP32 (paired 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_scale(rows: list[dict], path: Path) -> Path | None:
    """Each delta against log10(parameters), per precision: seeds as faint points with their
    bootstrap intervals, the mean across seeds with its t interval."""
    study = [s for s in scale_study(rows) if s["tower"] == "image"]
    if len({s["model"] for s in study}) < 2:
        return None
    plt = _plt()
    metrics = [m for m in SCALE_METRICS if any(s["metric"] == m for s in study)]
    precisions = [p for p in PRECISION_ORDER if any(s["precision"] == p for s in study)]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols,
                             figsize=(15, 4 * math.ceil(len(metrics) / cols)), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        k = 100.0 if metric in POINT_METRICS else 1.0
        for i, precision in enumerate(precisions):
            entries = sorted((s for s in study if (s["metric"], s["precision"]) ==
                              (metric, precision)), key=lambda s: s["params"])
            x = np.array([math.log10(s["params"]) for s in entries]) + (i - 1) * 0.01
            for xi, s in zip(x, entries):
                for seed in s["seeds"]:
                    ax.errorbar([xi], [seed["delta"] * k],
                                yerr=[[(seed["delta"] - seed["lo"]) * k],
                                      [(seed["hi"] - seed["delta"]) * k]],
                                fmt=".", color=f"C{i}", alpha=0.3, capsize=2)
            means = np.array([s["mean"] for s in entries]) * k
            half = np.nan_to_num(np.array([s["hi"] - s["mean"] for s in entries]) * k)
            ax.errorbar(x, means, yerr=half, fmt="o-", color=f"C{i}", capsize=4, label=precision)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("log10 parameters (image + text towers)")
        ax.set_title(f"Δ {TITLES.get(metric, metric)}" + (" (points)" if k == 100 else ""))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("clipserve scale study: sensitivity to quantization against model size "
                 "(mean across seeds, t interval; faint: each seed, bootstrap interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(rows: list[dict], directory: Path, note_lines: list[str],
          budget: dict[str, float] | None = None, stem: str = "report") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md, <stem>.png (and <stem>-scale.png with several model
    sizes) into ``directory``."""
    directory = Path(directory)
    paths = {"json": directory / f"{stem}.json", "md": directory / f"{stem}.md",
             "png": directory / f"{stem}.png"}
    study = scale_study(rows)
    # report.json: {"rows": one object per model x seed x precision x tower, "scale_study"}.
    paths["json"].write_text(json.dumps({"rows": rows, "scale_study": study,
                                         "scale_trends": scale_trends(study)},
                                        indent=2, default=_jsonable) + "\n")
    paths["md"].write_text(markdown(rows, note_lines))
    plot(rows, paths["png"], budget)
    scale_png = plot_scale(rows, directory / f"{stem}-scale.png")
    if scale_png:
        paths["scale_png"] = scale_png
    return paths


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_rows(path: Path) -> list[dict]:
    """The rows of a report.json (also reads the older plain-list form)."""
    data = json.loads(Path(path).read_text())
    return data if isinstance(data, list) else data["rows"]
