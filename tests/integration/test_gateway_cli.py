"""``clipserve serve`` as a user runs it: it starts its own tritonserver, serves, reloads routing
on SIGHUP and shuts everything down on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.procs import free_port
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def tritons_on(repository: Path) -> list[int]:
    """Pids of tritonserver processes serving ``repository``."""
    marker = f"--model-repository={repository.resolve()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_serve_starts_triton_reloads_on_sighup_and_stops_on_sigterm(repository, tmp_path):
    # A copy, so the check that our Triton is gone cannot see the session's shared one.
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo, copy_function=link_or_copy)
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"weights": {"fp32": 1}}))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "clipserve.cli", "serve", "--repository", str(repo),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
         "--routing-file", str(routing), "--routing-poll-s", "3600", "--shutdown-grace-s", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "gateway did not become SERVING"
            time.sleep(0.2)
        assert tritons_on(repo), "serve should have started its own tritonserver"

        embed = pb_grpc.EmbeddingServiceStub(channel)

        def precision() -> int:
            return embed.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), timeout=20).endpoint.precision

        assert precision() == pb.PRECISION_FP32
        routing.write_text(json.dumps({"weights": {"int8": 1}}))
        process.send_signal(signal.SIGHUP)  # the poll interval is an hour: only SIGHUP reloads
        deadline = time.monotonic() + 10
        while precision() != pb.PRECISION_INT8:
            assert time.monotonic() < deadline, "SIGHUP did not reload the routing file"
            time.sleep(0.1)
    finally:
        channel.close()
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "routing reloaded" in output
    assert not tritons_on(repo), "tritonserver outlived clipserve serve"
