"""``clipserve ab-report``: each arm's live quality against the reference precision, with
intervals, read from the gateway's counters or from a Prometheus scraping them.

    clipserve ab-report --metrics http://127.0.0.1:9464/metrics            # one gateway, since start
    clipserve ab-report --metrics http://prometheus:9090 --window 1h        # all pods, last hour

Per arm (scale x precision): live OOD-flag rate and ReportOutcome accuracy against the
reference arm's (difference with a Newcombe hybrid-score interval), shadow top-1 agreement with
the reference (Wilson interval), the ECE gauge and mean latency (no interval: histograms carry
no variance). Intervals come from scipy (``binomtest(...).proportion_ci``, Wilson).

Each arm gets the offline report's verdict rule (``clipserve.stats.verdict``): a metric is
safe when its whole interval stays within the budget, unsafe when even the interval's best end
breaks it, inconclusive otherwise, with an estimate of the traffic that would settle it; the
arm's verdict is unsafe if any metric is, safe only if all are. The live budget
(``--budget``, LIVE_BUDGET_ITEMS) covers what live counters can judge: ReportOutcome accuracy,
shadow top-1 agreement and the OOD-flag rate (two-sided: an arm that flags much less is as
suspect as one that flags much more). ECE and latency are shown, not judged: the ECE gauge
and latency histograms carry no variance.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

from clipserve import stats
from clipserve.config import add_flags, from_args
from clipserve.endpoints import Precision

_WINDOW = re.compile(r"^\d+[smhdw]$")

# What an arm may lose against the reference arm, in percentage points of a proportion.
LIVE_BUDGET_ITEMS = MappingProxyType({
    "accuracy": stats.BudgetItem(1.0, True, True,
                                 "ReportOutcome top-1 accuracy, points lost"),
    "agreement": stats.BudgetItem(5.0, True, True,
                                  "shadow top-1 agreement with the reference, points below 100"),
    "flag_rate": stats.BudgetItem(2.0, True, False,
                                  "live OOD-flag rate, points moved either way"),
})


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class AbReportConfig:
    """What ``clipserve ab-report`` takes."""

    metrics: str = field(default="http://127.0.0.1:9464/metrics", metadata=_help(
        "a gateway's /metrics URL (counters since it started) or a Prometheus base URL "
        "(http://HOST:9090; every pod it scrapes, over --window)"))
    window: str = field(default="1h", metadata=_help(
        "Prometheus range for increase(), e.g. 30m, 1h, 1d (ignored for a gateway URL)"))
    reference: str = field(default="fp32", metadata=_help(
        "the precision every other arm is compared against"))
    confidence: float = field(default=0.95, metadata=_help("interval confidence level"))
    budget: str = field(default="", metadata=_help(
        "allowed harm per live metric, KEY=POINTS,...; keys: " + ", ".join(
            f"{k} ({v.meaning}, default {v.default:g})" for k, v in LIVE_BUDGET_ITEMS.items())))
    json: str = field(default="", metadata=_help("also write the rows as JSON to this file"))

    def __post_init__(self):
        problems = []
        if not self.metrics.startswith(("http://", "https://")):
            problems.append(f"metrics must be an http(s) URL, got {self.metrics!r}")
        if not _WINDOW.match(self.window):
            problems.append(f"window must look like 30m, 1h or 1d, got {self.window!r}")
        try:
            Precision.parse(self.reference)
        except ValueError as exc:
            problems.append(str(exc))
        if not 0 < self.confidence < 1:
            problems.append(f"confidence must be in (0, 1), got {self.confidence}")
        try:
            stats.parse_budget(self.budget, items=LIVE_BUDGET_ITEMS)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid ab-report config: " + "; ".join(problems))

    @property
    def is_gateway(self) -> bool:
        return urllib.parse.urlparse(self.metrics).path.rstrip("/").endswith("/metrics")


@dataclass
class ArmCounts:
    """One arm's counters (over the window, or since the gateway started)."""

    ood_flagged: float = 0.0
    ood_scored: float = 0.0
    correct: float = 0.0
    incorrect: float = 0.0
    shadow_images: float = 0.0
    shadow_agreements: float = 0.0
    latency_sum_s: float = 0.0
    calls: float = 0.0
    ece: float | None = None
    ece_samples: float = 0.0


Arm = tuple[str, str]  # (scale, precision)


def counts_from_text(text: str) -> dict[Arm, ArmCounts]:
    """Arms' counters from a gateway's /metrics page (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    arms: dict[Arm, ArmCounts] = {}

    def arm(labels: dict) -> ArmCounts | None:
        key = (labels.get("scale", ""), labels.get("precision", ""))
        if not key[0] or key[1] in ("", "none"):
            return None
        return arms.setdefault(key, ArmCounts())

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            a = arm(s.labels)
            if a is None:
                continue
            name, labels, value = s.name, s.labels, s.value
            deployment = labels.get("label_set") == "deployment"
            if name == "clipserve_ood_flagged_total" and deployment:
                a.ood_flagged += value
            elif name == "clipserve_ood_score_count" and deployment:
                a.ood_scored += value
            elif name == "clipserve_outcomes_total":
                if labels.get("result") == "correct":
                    a.correct += value
                else:
                    a.incorrect += value
            elif name == "clipserve_shadow_images_total":
                a.shadow_images += value
            elif name == "clipserve_shadow_agreements_total":
                a.shadow_agreements += value
            elif name == "clipserve_request_duration_seconds_sum":
                a.latency_sum_s += value
            elif name == "clipserve_request_duration_seconds_count":
                a.calls += value
            elif name == "clipserve_calibration_ece":
                a.ece = value
            elif name == "clipserve_calibration_window_samples":
                a.ece_samples += value
    return arms


_PROM_QUERIES = {
    "ood_flagged": 'increase(clipserve_ood_flagged_total{{label_set="deployment"}}[{w}])',
    "ood_scored": 'increase(clipserve_ood_score_count{{label_set="deployment"}}[{w}])',
    "correct": 'increase(clipserve_outcomes_total{{result="correct"}}[{w}])',
    "incorrect": 'increase(clipserve_outcomes_total{{result="incorrect"}}[{w}])',
    "shadow_images": "increase(clipserve_shadow_images_total[{w}])",
    "shadow_agreements": "increase(clipserve_shadow_agreements_total[{w}])",
    "latency_sum_s": "increase(clipserve_request_duration_seconds_sum[{w}])",
    "calls": "increase(clipserve_request_duration_seconds_count[{w}])",
    "ece_samples": "clipserve_calibration_window_samples",
}


def counts_from_prometheus(base_url: str, window: str) -> dict[Arm, ArmCounts]:
    """Arms' counters summed over every pod a Prometheus scrapes, over ``window``.

    Raises:
        ValueError: the Prometheus cannot be reached or answers an error.
    """
    arms: dict[Arm, ArmCounts] = {}
    for attr, template in _PROM_QUERIES.items():
        expr = f"sum by (scale, precision) ({template.format(w=window)})"
        for labels, value in _prom_query(base_url, expr):
            if labels.get("precision") in (None, "none"):
                continue
            a = arms.setdefault((labels.get("scale", ""), labels["precision"]), ArmCounts())
            # increase() extrapolates to the window's edges; counts are whole.
            setattr(a, attr, float(round(value)) if attr != "latency_sum_s" else value)
    # The gauge per pod: the mean over pods (each pod's window has its own outcomes).
    for labels, value in _prom_query(base_url, "avg by (scale, precision) "
                                               "(clipserve_calibration_ece)"):
        key = (labels.get("scale", ""), labels.get("precision", ""))
        if key in arms:
            arms[key].ece = value
    return arms


def _prom_query(base_url: str, expr: str) -> list[tuple[dict, float]]:
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot query Prometheus at {base_url}: {exc}") from None
    if body.get("status") != "success":
        raise ValueError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]
            if math.isfinite(float(r["value"][1]))]


# -- intervals -------------------------------------------------------------------------------

def wilson(k: float, n: float, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of k successes in n trials (scipy); None when n is 0."""
    from scipy.stats import binomtest

    n, k = int(round(n)), int(round(k))
    if n <= 0:
        return None
    ci = binomtest(min(k, n), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def difference(k1: float, n1: float, k2: float, n2: float,
               confidence: float = 0.95) -> dict | None:
    """p1 - p2 with Newcombe's hybrid score interval (method 10 of Newcombe 1998, built from
    the two Wilson intervals); None when either n is 0."""
    a, b = wilson(k1, n1, confidence), wilson(k2, n2, confidence)
    if a is None or b is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    low = d - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2)
    high = d + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2)
    return {"arm": p1, "reference": p2, "difference": d, "low": low, "high": high,
            "n": min(n1, n2)}


def _delta(metric: str, d: dict, higher_is_better: bool, confidence: float) -> stats.Delta:
    return stats.Delta(metric=metric, reference=d["reference"], value=d["arm"],
                       delta=d["difference"], lo=d["low"], hi=d["high"], n=int(d["n"]),
                       higher_is_better=higher_is_better, confidence=confidence)


def _judged(results: list[stats.VerdictResult], n: int) -> dict:
    """One metric's verdict from one (one-sided) or two (two-sided) budget lines, with the
    traffic per arm that would settle it when inconclusive."""
    combined = stats.verdict_of_many(results)
    needed = [r.items_needed for r in results
              if r.verdict is stats.Verdict.INCONCLUSIVE and r.items_needed is not None]
    total = max(needed) if combined is stats.Verdict.INCONCLUSIVE and needed else None
    return {"verdict": combined.value, "budget": results[0].budget, "n": n,
            "worst": results[0].worst, "best": results[0].best,
            "items_needed": total, "more_needed": None if total is None else total - n}


def judge(row: dict, budget: dict[str, float], confidence: float = 0.95) -> dict:
    """The arm's per-metric verdicts and overall verdict under the live ``budget``
    (LIVE_BUDGET_ITEMS keys, points). Metrics without traffic are left out; an arm with none
    judged gets verdict ``no data``."""
    verdicts = {}
    if row["accuracy"] is not None:
        delta = _delta("accuracy", row["accuracy"], True, confidence)
        verdicts["accuracy"] = _judged([stats.verdict(delta, budget["accuracy"], points=True)],
                                       delta.n)
    agree = row["shadow_agreement"]
    if agree is not None:
        delta = stats.Delta(metric="agreement", reference=1.0, value=agree["rate"],
                            delta=agree["rate"] - 1.0, lo=agree["low"] - 1.0,
                            hi=agree["high"] - 1.0, n=int(agree["images"]),
                            higher_is_better=True, confidence=confidence)
        verdicts["agreement"] = _judged([stats.verdict(delta, budget["agreement"], points=True)],
                                        delta.n)
    if row["ood_flag_rate"] is not None:
        rise = _delta("flag_rate", row["ood_flag_rate"], False, confidence)
        drop = _delta("flag_rate", row["ood_flag_rate"], True, confidence)
        verdicts["flag_rate"] = _judged(
            [stats.verdict(rise, budget["flag_rate"], points=True),
             stats.verdict(drop, budget["flag_rate"], points=True)], rise.n)
    overall = (stats.verdict_of_many(v["verdict"] for v in verdicts.values()).value
               if verdicts else "no data")
    return {"verdict": overall, "verdicts": verdicts}


def report(arms: dict[Arm, ArmCounts], reference: str, confidence: float = 0.95,
           budget: dict[str, float] | None = None) -> list[dict]:
    """One row per non-reference arm that has a reference arm of its scale, judged against
    ``budget`` (LIVE_BUDGET_ITEMS' defaults when None)."""
    budget = stats.parse_budget("", items=LIVE_BUDGET_ITEMS) if budget is None else budget
    rows = []
    for (scale, precision), a in sorted(arms.items()):
        ref = arms.get((scale, reference))
        if precision == reference or ref is None:
            continue
        agreement = wilson(a.shadow_agreements, a.shadow_images, confidence)
        rows.append({
            "scale": scale, "precision": precision, "reference": reference,
            "ood_flag_rate": difference(a.ood_flagged, a.ood_scored, ref.ood_flagged,
                                        ref.ood_scored, confidence),
            "accuracy": difference(a.correct, a.correct + a.incorrect, ref.correct,
                                   ref.correct + ref.incorrect, confidence),
            "shadow_agreement": None if agreement is None else {
                "rate": a.shadow_agreements / a.shadow_images, "low": agreement[0],
                "high": agreement[1], "images": a.shadow_images},
            "ece": a.ece, "ece_reference": ref.ece, "ece_samples": a.ece_samples,
            "mean_latency_ms": 1000 * a.latency_sum_s / a.calls if a.calls else None,
            "mean_latency_ms_reference": (1000 * ref.latency_sum_s / ref.calls
                                          if ref.calls else None),
            "counts": asdict(a),
        })
        rows[-1].update(judge(rows[-1], budget, confidence))
    return rows


def _diff(d: dict | None) -> str:
    if d is None:
        return "no data"
    return (f"{d['arm']:.4f} vs {d['reference']:.4f}: {d['difference']:+.4f} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}]")


def format_rows(rows: list[dict], confidence: float, source: str) -> str:
    if not rows:
        return f"no arm to compare (need the reference and another precision) in {source}"
    lines = [f"Live A/B from {source} ({100 * confidence:g}% intervals; a metric is safe when "
             f"its whole interval is within budget, unsafe when none of it is)"]
    for r in rows:
        agree = r["shadow_agreement"]
        lines += [
            f"{r['scale']} {r['precision']} vs {r['reference']}: {r['verdict'].upper()}",
            *(f"  {name:<15} {v['verdict']} (budget {v['budget']:g} points)"
              + (f": about {v['more_needed']} more per arm would settle it"
                 if v["more_needed"] is not None else "")
              for name, v in r["verdicts"].items()),
            f"  OOD-flag rate   {_diff(r['ood_flag_rate'])}",
            f"  accuracy        {_diff(r['accuracy'])}",
            "  shadow top-1    " + ("no shadow traffic" if agree is None else
                                     f"{agree['rate']:.4f} [{agree['low']:.4f}, "
                                     f"{agree['high']:.4f}] over {agree['images']:.0f} images"),
            f"  ECE             {r['ece'] if r['ece'] is not None else '-'} (reference "
            f"{r['ece_reference'] if r['ece_reference'] is not None else '-'})",
            f"  mean latency    {r['mean_latency_ms'] or 0:.2f} ms (reference "
            f"{r['mean_latency_ms_reference'] or 0:.2f} ms)"]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ab-report`` on the ``clipserve`` subcommand parser."""
    parser = sub.add_parser("ab-report", help="live A/B quality per arm with intervals",
                            description=__doc__.splitlines()[0])
    add_flags(parser, AbReportConfig)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config = from_args(AbReportConfig, args)
        if config.is_gateway:
            with urllib.request.urlopen(config.metrics, timeout=30) as response:
                arms = counts_from_text(response.read().decode())
            source = f"{config.metrics} (since the gateway started)"
        else:
            arms = counts_from_prometheus(config.metrics, config.window)
            source = f"{config.metrics} (last {config.window})"
    except (ValueError, OSError) as exc:
        print(f"clipserve ab-report: {exc}", file=sys.stderr)
        return 2
    rows = report(arms, Precision.parse(config.reference).value, config.confidence,
                  stats.parse_budget(config.budget, items=LIVE_BUDGET_ITEMS))
    print(format_rows(rows, config.confidence, source))
    if config.json:
        Path(config.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
