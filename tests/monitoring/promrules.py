"""The shipped Prometheus rules (k8s/monitoring/prometheus-rules.yaml, a Prometheus Operator
PrometheusRule) as plain rule files, for ``promtool`` and for a test Prometheus.

The operator's CRD wraps a rule file's content in ``spec``; Prometheus and promtool read the
content itself, so tests write ``spec`` to a file of their own.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "monitoring" / "prometheus-rules.yaml"
UNIT_TESTS = Path(__file__).resolve().parent  # promtool test files: *.yaml here
RULE_FILE_NAME = "clipserve-rules.yaml"  # the name the test files' rule_files refer to
MISSING = ("is not installed: Debian's `prometheus` package ships prometheus and promtool "
           "(scripts/setup.sh installs it when run as root where apt-get exists)")

_RANGE = re.compile(r"\[(\d+[smhdwy])\]")
_OFFSET = re.compile(r"\boffset (\d+[smhdwy])\b")


def binary(name: str) -> str | None:
    """Path of ``prometheus`` or ``promtool`` on PATH, or None."""
    return shutil.which(name)


def shipped_groups() -> list[dict]:
    """The rule groups of the shipped PrometheusRule."""
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def all_rules(groups: list[dict]) -> list[dict]:
    return [rule for group in groups for rule in group["rules"]]


def write_rules(path: Path, groups: list[dict]) -> Path:
    """Write ``groups`` as a plain Prometheus rule file; returns ``path``."""
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def shortened(groups: list[dict], durations: dict[str, str], for_: str,
              interval: str) -> list[dict]:
    """A test copy of ``groups`` for a run of minutes instead of days: every range window and
    ``offset`` whose duration is a key of ``durations`` becomes its value, every alert's
    ``for:`` becomes ``for_`` and every group is evaluated each ``interval``. The shipped
    rules are not changed.

    Raises:
        KeyError: a rule uses a duration ``durations`` does not map (so no window is missed).
    """
    out = copy.deepcopy(groups)
    for group in out:
        group["interval"] = interval
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(lambda m: f"[{durations[m.group(1)]}]", rule["expr"])
            rule["expr"] = _OFFSET.sub(lambda m: f"offset {durations[m.group(1)]}", rule["expr"])
            if "alert" in rule:
                rule["for"] = for_
    return out
