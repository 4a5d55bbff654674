"""Prometheus itself checks and evaluates the shipped rules: ``promtool check rules`` on
k8s/monitoring/prometheus-rules.yaml, and ``promtool test rules`` on the unit tests in
tests/monitoring/*.yaml (input series -> expected alerts, rendered annotations and recorded
values), which must cover every alert and recording rule.

Needs ``promtool`` (Debian's ``prometheus`` package; scripts/setup.sh installs it as root);
skips with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.monitoring import promrules

TEST_FILES = sorted(promrules.UNIT_TESTS.glob("*.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = promrules.binary("promtool")
    if path is None:
        pytest.skip("promtool " + promrules.MISSING)
    return path


def run_tests(promtool: str, groups: list[dict], workdir: Path) -> subprocess.CompletedProcess:
    """``promtool test rules`` on every test file, against ``groups`` as the rule file."""
    promrules.write_rules(workdir / promrules.RULE_FILE_NAME, groups)
    copies = []
    for path in TEST_FILES:
        shutil.copy(path, workdir / path.name)
        copies.append(path.name)
    return subprocess.run([promtool, "test", "rules", *copies], cwd=workdir,
                          capture_output=True, text=True, timeout=300)


def test_shipped_rules_pass_promtool_check(promtool, tmp_path):
    groups = promrules.shipped_groups()
    path = promrules.write_rules(tmp_path / "rules.yaml", groups)
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(promrules.all_rules(groups))} rules found" in result.stdout


def test_every_alert_and_recording_rule_has_a_unit_test():
    rules = promrules.all_rules(promrules.shipped_groups())
    tests = [t for path in TEST_FILES for t in yaml.safe_load(path.read_text())["tests"]]
    for path in TEST_FILES:
        assert yaml.safe_load(path.read_text())["rule_files"] == [promrules.RULE_FILE_NAME]
    firing = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])
              if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])
             if not a.get("exp_alerts")}
    evaluated = {e["expr"].split("{")[0].strip() for t in tests
                 for e in t.get("promql_expr_test", [])}
    for rule in rules:
        if "alert" in rule:
            # Both sides: it fires on the series meant to fire it, and not before its `for:`
            # or on a series that must not trigger it.
            assert rule["alert"] in firing, f"no test expects {rule['alert']} to fire"
            assert rule["alert"] in quiet, f"no test expects {rule['alert']} to stay quiet"
        else:
            assert rule["record"] in evaluated, f"no test evaluates {rule['record']}"


def test_promtool_unit_tests_pass(promtool, tmp_path):
    result = run_tests(promtool, promrules.shipped_groups(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def test_the_unit_tests_catch_a_broken_threshold(promtool, tmp_path):
    groups = promrules.shipped_groups()
    (rule,) = [r for r in promrules.all_rules(groups) if r.get("alert") == "ClipserveOODRateJump"]
    assert "ratio5m > 0.15" in rule["expr"]
    rule["expr"] = rule["expr"].replace("ratio5m > 0.15", "ratio5m > 0.55")
    result = run_tests(promtool, groups, tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "alertname: ClipserveOODRateJump" in output, output

