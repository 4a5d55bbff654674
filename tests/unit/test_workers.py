"""``--workers``: the default follows the cores the container may use, every worker gets the same
ports, and each gauge says how the workers' values merge on the one /metrics page."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

from clipserve.server import workers
from clipserve.server.config import ServerConfig
from clipserve.server.metrics import ServerMetrics


def test_default_is_one_zero_is_the_available_cores_and_an_explicit_count_wins(monkeypatch):
    monkeypatch.setattr(workers, "available_cores", lambda: 3)
    assert workers.effective_workers(ServerConfig()) == 1  # one ReportOutcome store
    assert workers.effective_workers(ServerConfig(workers=0)) == 3
    assert workers.effective_workers(ServerConfig(workers=1)) == 1
    assert workers.effective_workers(ServerConfig(workers=5)) == 5


def test_negative_workers_is_refused():
    with pytest.raises(ValueError, match="workers must be 0"):
        ServerConfig(workers=-1)


def test_ports_asked_as_0_are_picked_once_for_all_workers():
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, health_port=0,
                          metrics_port=0, workers=4)
    child = workers.worker_config(config, "127.0.0.1:8001")
    assert child.port and child.http_port and child.health_port
    assert len({child.port, child.http_port, child.health_port}) == 3
    assert child.triton_url == "127.0.0.1:8001" and child.workers == 1
    fixed = workers.worker_config(ServerConfig(port=6000, http_port=None), "t:1")
    assert fixed.port == 6000 and fixed.http_port is None and fixed.health_port is None


def test_every_gauge_names_its_multiprocess_mode():
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, ("s",))
    gauges = [v for v in vars(metrics).values() if isinstance(v, Gauge)]
    assert len(gauges) == 10
    modes = {g._name: g._multiprocess_mode for g in gauges}
    # prometheus_client's default, "all", would keep dead workers' in-flight calls forever.
    assert "all" not in modes.values(), modes
    assert modes["clipserve_requests_in_flight"] == "livesum"
    assert modes["clipserve_backend_ready"] == "livemin"
