"""ServerConfig: flags and CLIPSERVE_* env resolve into one validated object."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from clipserve.config import add_flags, from_args
from clipserve.server import cli
from clipserve.server.config import ServerConfig


def parse(argv, environ=None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_parser(sub)
    return from_args(ServerConfig, parser.parse_args(["serve", *argv]), environ or {})


def test_defaults_are_valid():
    config = ServerConfig()
    assert config.repository == Path("model_repository")
    assert config.triton_url == "" and config.routing_file is None
    assert config.triton_metrics_address == "127.0.0.1"  # the child's metrics: loopback
    assert config.effective_decode_workers >= 1
    assert config.effective_decode_queue == 8 * config.effective_decode_workers


def test_flags_beat_env_which_beats_defaults():
    config = parse(["--port", "7001", "--repository", "/r", "--routing-file", "w.json"],
                   {"CLIPSERVE_PORT": "7002", "CLIPSERVE_METRICS_PORT": "7003",
                    "CLIPSERVE_TRITON_URL": "triton:8001", "CLIPSERVE_REQUEST_TIMEOUT_S": "2.5"})
    assert config.port == 7001
    assert config.metrics_port == 7003
    assert config.repository == Path("/r")
    assert config.routing_file == Path("w.json")
    assert config.triton_url == "triton:8001"
    assert config.request_timeout_s == 2.5


def test_serve_registers_run():
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["serve"]).run is cli.run


def test_every_field_has_help():
    parser = argparse.ArgumentParser()
    add_flags(parser, ServerConfig)
    for action in parser._actions[1:]:
        assert action.help and not action.help.startswith(" ["), action.dest


@pytest.mark.parametrize("changes, fragment", [
    ({"port": 70000}, "port must be 0..65535"),
    ({"port": 9000, "metrics_port": 9000}, "both 9000"),
    ({"max_batch_items": 0}, "max_batch_items must be at least 1"),
    ({"decode_workers": -1}, "decode_workers must be 0"),
    ({"request_timeout_s": 0}, "request_timeout_s must be positive"),
    ({"triton_url": "http://triton:8001"}, "triton_url must be host:port"),
    ({"triton_url": "triton"}, "triton_url must be host:port"),
    ({"log_level": "loud"}, "log_level must be"),
    ({"event_loop": "trio"}, "event_loop must be one of auto, asyncio, uvloop"),
    ({"triton_metrics_address": "pod-ip"}, "triton_metrics_address must be an IP address"),
])
def test_invalid_values_are_rejected_with_the_field_named(changes, fragment):
    with pytest.raises(ValueError, match="invalid server config") as info:
        ServerConfig(**changes)
    assert fragment in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        ServerConfig(port=-1, max_labels=0)
    assert "port must be" in str(info.value) and "max_labels" in str(info.value)


def test_run_reports_a_bad_config_and_exits_2(capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--port", "99999"])
    assert cli.run(args) == 2
    assert "port must be 0..65535" in capsys.readouterr().err


def test_blas_threads_cap_numpys_pools_and_zero_leaves_them():
    # in a child process: the cap is process-wide and would leak into other tests
    import json
    import subprocess
    import sys

    code = ("import json, sys; from clipserve.server.app import limit_blas_threads; "
            "print(json.dumps([p['num_threads'] for p in limit_blas_threads(int(sys.argv[1]))]))")

    def pools(threads):
        out = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True,
                             text=True, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "",
                                                         "OMP_NUM_THREADS": ""})
        return json.loads(out.stdout.strip().splitlines()[-1])

    capped = pools(1)
    assert capped, "numpy's BLAS pool was not found"
    assert capped == [1] * len(capped)
    if (os.cpu_count() or 1) > 1:  # 0 leaves the library's default: a thread per core
        assert max(pools(0)) > 1
    with pytest.raises(ValueError, match="blas_threads"):
        ServerConfig(blas_threads=-1)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop", "auto"])
def test_run_loop_runs_serve_on_the_named_loop(monkeypatch, event_loop):
    """--event-loop picks the loop serve() runs on (uvloop where installed; the error names
    the way out where it is not)."""
    import asyncio
    import importlib.util

    from clipserve.server import app

    seen = {}

    async def fake_serve(config, worker=False):
        seen["loop"] = type(asyncio.get_running_loop()).__module__
        seen["worker"] = worker
        return 7

    monkeypatch.setattr(app, "serve", fake_serve)
    config = ServerConfig(event_loop=event_loop)
    if event_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            with pytest.raises(RuntimeError, match="pip install uvloop"):
                app.run_loop(config)
            return
    assert app.run_loop(config, worker=True) == 7
    assert seen["worker"] is True
    uvloop_here = importlib.util.find_spec("uvloop") is not None
    wanted = "uvloop" if event_loop == "uvloop" or (event_loop == "auto" and uvloop_here) \
        else "asyncio"
    assert seen["loop"].startswith(wanted)


def test_auto_event_loop_falls_back_to_asyncio_without_uvloop(monkeypatch):
    import asyncio
    import sys

    from clipserve.server import app

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert app.event_loop_runner("auto") is asyncio.run
    with pytest.raises(RuntimeError, match="pip install uvloop"):
        app.event_loop_runner("uvloop")
