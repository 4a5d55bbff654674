"""The monitoring files under k8s/monitoring and the README's metrics section refer only to
metrics, labels and recording rules that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from clipserve.server.metrics import ServerMetrics

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
# Triton's own metrics used by the rules and dashboard (its /metrics page; see
# tests/integration/test_metrics.py, which reads nv_inference_request_success there).
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_queue_duration_us"}
# Labels Prometheus adds or Triton uses, besides ours.
OTHER_LABELS = {"le", "model", "pod", "job", "instance"}


def exposed() -> tuple[set[str], set[str]]:
    """Sample names and label names the gateway can expose."""
    registry = CollectorRegistry()
    ServerMetrics(registry, ("s",))
    names, labels = set(), set()
    for collector in list(registry._collector_to_names):
        for family in collector.describe() or collector.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "gauge": ("",)}[family.type]
            names.update(family.name + s for s in suffixes)
        labels.update(getattr(collector, "_labelnames", ()))
    return names, labels


def rules() -> list[dict]:
    spec = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def check_expr(expr: str, names: set[str], labels: set[str], recorded: set[str]) -> None:
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    for name in re.findall(r"\bclipserve_[a-z_]+", expr):
        assert name in names, f"{name} is not a metric the gateway exposes: {expr}"
    for name in re.findall(r"\bclipserve:[a-z0-9_:]+", expr):
        assert name in recorded, f"{name} is not a recording rule: {expr}"
    for name in re.findall(r"\bnv_[a-z_]+", expr):
        assert name in TRITON_METRICS, name
    grouped = re.findall(r"\bby \(([^)]*)\)", expr)
    selected = re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr)
    for label in [x.strip() for g in grouped for x in g.split(",")] + selected:
        assert label in labels | OTHER_LABELS, f"unknown label {label!r} in {expr}"


def test_rules_use_existing_metrics_and_labels():
    names, labels = exposed()
    all_rules = rules()
    recorded = {r["record"] for r in all_rules if "record" in r}
    assert {"clipserve:ood_rate:ratio5m", "clipserve:shadow_agreement:ratio15m",
            "clipserve:request_duration_seconds:p99_5m"} <= recorded
    for rule in all_rules:
        check_expr(rule["expr"], names, labels, recorded)
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
    alerts = {r["alert"] for r in all_rules if "alert" in r}
    assert {"ClipserveOODRateJump", "ClipserveCalibrationECEHigh", "ClipserveShadowAgreementLow",
            "ClipserveLatencyP99High"} <= alerts


def test_dashboard_queries_use_existing_metrics_and_labels():
    names, labels = exposed()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        check_expr(expr.replace("$__rate_interval", "5m"), names, labels | {"label_set"}, set())
    text = " ".join(exprs)
    for needed in ("clipserve_items_total", "clipserve_request_duration_seconds_bucket",
                   "clipserve_ood_flagged_total", "clipserve_calibration_ece",
                   "clipserve_shadow_agreements_total"):
        assert needed in text


def test_readme_documents_every_metric():
    readme = (ROOT / "README.md").read_text()
    assert "## Metrics" in readme
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names, _ = exposed()
    families = {re.sub(r"(_total|_bucket|_sum|_count)$", "", n) for n in names}
    for family in families:
        assert family in section, f"{family} is not in the README's metrics section"
