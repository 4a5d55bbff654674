"""The live routing policy: start-up validation, reload on change, keep the old one on errors."""

from __future__ import annotations

import json
import os

import pytest
from prometheus_client import CollectorRegistry

from clipserve.endpoints import Precision
from clipserve.server.metrics import ServerMetrics
from clipserve.server.routing import RoutingPolicy
from clipserve.server.routing_file import RoutingSource

FP32, INT8 = Precision.FP32, Precision.INT8
AVAILABLE = {("s", FP32), ("s", INT8)}
DEFAULT = RoutingPolicy.single("s")


def write(path, weights, bump_ns=0):
    path.write_text(json.dumps({"weights": weights}))
    if bump_ns:  # same-second rewrites on coarse-mtime filesystems still look changed
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump_ns))


def source(path, registry=None):
    metrics = ServerMetrics(registry or CollectorRegistry(), ("s",))
    return RoutingSource(path, DEFAULT, "s", AVAILABLE, metrics), metrics


def test_without_a_file_the_default_policy_stands(tmp_path):
    src, _ = source(None)
    assert src.policy == DEFAULT
    assert not src.reload() and not src.check()


def test_file_is_read_at_start(tmp_path):
    path = tmp_path / "routing.json"
    write(path, {"fp32": 90, "int8": 10})
    src, _ = source(path)
    assert src.policy.shares() == {("s", FP32): 0.9, ("s", INT8): 0.1}


def test_bad_file_at_start_is_fatal(tmp_path):
    path = tmp_path / "routing.json"
    write(path, {"int4": 1})
    with pytest.raises(ValueError, match="s_int4, not in the repository"):
        source(path)
    with pytest.raises(ValueError, match="cannot read routing file"):
        source(tmp_path / "absent.json")


def test_check_reloads_only_when_the_file_changed(tmp_path):
    path = tmp_path / "routing.json"
    write(path, {"fp32": 90, "int8": 10})
    src, _ = source(path)
    assert not src.check()
    write(path, {"fp32": 50, "int8": 50}, bump_ns=1_000_000_000)
    assert src.check()
    assert src.policy.shares() == {("s", FP32): 0.5, ("s", INT8): 0.5}


def test_bad_reload_keeps_previous_policy_and_counts_the_error(tmp_path):
    registry = CollectorRegistry()
    path = tmp_path / "routing.json"
    write(path, {"fp32": 90, "int8": 10})
    src, _ = source(path, registry)
    before = src.policy
    path.write_text("{not json")
    assert not src.reload()
    assert src.policy == before
    assert registry.get_sample_value("clipserve_routing_reloads_total",
                                     {"result": "error"}) == 1
    write(path, {"int8": 1})
    assert src.reload()
    assert src.policy.shares() == {("s", INT8): 1.0}
    assert registry.get_sample_value("clipserve_routing_reloads_total", {"result": "ok"}) == 1
