"""The README's serve command, as written, on a repository with several scales.

The README shows ``clipserve serve --repository model_repository --port 50051 --metrics-port
9090`` right after the demo, whose repository holds three scales. This runs that exact line
(only the repository path and the two port numbers are replaced, so parallel runs do not
collide) as a subprocess, with a real child tritonserver, on a repository of two scales: the
test export's digits-s and a renamed copy of its fp32 endpoints.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.endpoints import Precision, Sidecar
from clipserve.procs import free_port, start_group, stop_group
from clipserve.server.repository import Catalog
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def readme_serve_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^clipserve serve --repository model_repository --port \d+ "
                      r"--metrics-port \d+$", text, re.M)
    assert match, "the README's serve command changed; update this test with it"
    return shlex.split(match.group(0))


def two_scale_repository(repository: Path, root: Path) -> Path:
    """digits-s (every endpoint, linked) and "digits-t": digits-s's fp32 towers renamed."""
    root.mkdir()
    for spec in Catalog.from_repository(repository):
        (root / spec.name).symlink_to(spec.directory, target_is_directory=True)
        if spec.precision is not Precision.FP32:
            continue
        copy = root / spec.name.replace("digits-s", "digits-t")
        (copy / "1").mkdir(parents=True)
        for f in (spec.directory / "1").iterdir():
            (copy / "1" / f.name).symlink_to(f)
        for f in spec.directory.iterdir():
            if f.is_file():
                (copy / f.name).write_bytes(f.read_bytes())
        (copy / "config.pbtxt").write_text(
            (copy / "config.pbtxt").read_text().replace(spec.name, copy.name))
        car = Sidecar.read(copy)
        car.scale = "digits-t"
        car.write(copy)
    return root


def test_readme_serve_command_serves_a_repository_of_several_scales(repository, tmp_path):
    repo = two_scale_repository(repository, tmp_path / "model_repository")
    port, metrics_port = free_port(), free_port()
    argv = readme_serve_command()
    argv[argv.index("--repository") + 1] = str(repo)
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    log = tmp_path / "serve.log"
    env = {**os.environ, "CLIPSERVE_HOST": "127.0.0.1"}  # the README binds 0.0.0.0
    with open(log, "w") as out:
        server = start_group([sys.executable, "-m", "clipserve.cli", *argv[1:]],
                             stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"clipserve serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not SERVING in time:\n{log.read_text()}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        embed = pb_grpc.EmbeddingServiceStub(channel)
        response = embed.EmbedTexts(pb.EmbedTextsRequest(texts=["seven"]), timeout=30)
        # Same embedding dimension and image size: the larger model file decides, and the
        # copy is the same file, so the name that sorts last (digits-t) is the default.
        assert response.endpoint.name == "digits-t_fp32_text"
        other = embed.EmbedTexts(pb.EmbedTextsRequest(texts=["seven"]), timeout=30,
                                 metadata=(("x-clip-scale", "digits-s"),
                                           ("x-clip-precision", "int8")))
        assert other.endpoint.name == "digits-s_int8_text"
        assert "no --default-scale was set: digits-t" in log.read_text()
        channel.close()
    finally:
        stop_group(server, grace_s=120)
