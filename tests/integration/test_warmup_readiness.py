"""Warm-up runs before the gateway reports SERVING (issue 10; issue 15: a model is routable once
it has answered a warm-up request), on a real tritonserver and the real gateway.

The endpoint is written by the export's own ``write_endpoint`` (config.pbtxt, the real model.py,
a tiny ONNX graph), and its model.py is wrapped to append one line per ``execute`` to a file and
to hold its first ``execute`` for a moment, so the order is visible: at the instant gRPC health
(and HTTP readiness) first says SERVING, the file must already show the warm-up's execute.
Before this change the gateway was SERVING as soon as Triton was, with the file still empty.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.export.repository import ServingPolicy, write_endpoint
from clipserve.server.app import Gateway
from clipserve.server.config import ServerConfig
from clipserve.procs import free_port
from clipserve.server.triton_process import TritonProcess

pytestmark = pytest.mark.integration

SIZE, DIM = 8, 4
FIRST_EXECUTE_HOLD_S = 1.5  # long against a health poll (0.1 s): SERVING too early is seen

# Appended to the exported model.py: same model, every execute logged, the first one held.
RECORDER = '''

import time as _time

_Exported = TritonPythonModel


class TritonPythonModel(_Exported):
    _held = False

    def execute(self, requests):
        if not TritonPythonModel._held:
            TritonPythonModel._held = True
            _time.sleep({hold})
        responses = _Exported.execute(self, requests)
        with open({log!r}, "a") as f:
            f.write(f"{{len(requests)}}\\n")
        return responses
'''


def tiny_image_onnx(path: Path) -> Path:
    """pixels uint8 [N, SIZE, SIZE, 3] -> embedding float32 [N, DIM] (cast, flatten, matmul)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weights = np.random.default_rng(0).standard_normal((SIZE * SIZE * 3, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["x"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
        "tiny_image",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [onnx.numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_repository(root: Path, policy: ServingPolicy) -> tuple[Path, Path]:
    """One exported image endpoint whose model.py records its executes; returns (repo, log)."""
    repo, log = root / "repo", root / "executes.log"
    sidecar = Sidecar(scale="tiny", precision="fp32", tower="image", embed_dim=DIM,
                      source="tiny::test", image_size=SIZE, quantization={"method": "none"})
    endpoint = write_endpoint(repo, tiny_image_onnx(root / "tiny.onnx"), sidecar,
                              runtime_options={"runtime_choice": "test"}, policy=policy)
    model_py = endpoint / "1" / "model.py"
    model_py.write_text(model_py.read_text()
                        + RECORDER.format(hold=FIRST_EXECUTE_HOLD_S, log=str(log)))
    return repo, log


def executes(log: Path) -> list[int]:
    """Requests per execute so far."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


class Watcher(threading.Thread):
    """Polls gRPC health and HTTP readiness from before the gateway binds its ports; at the
    first SERVING / 200 of each, snapshots the execute log."""

    def __init__(self, grpc_port: int, http_port: int, log: Path):
        super().__init__(daemon=True)
        self.grpc_port, self.http_port, self.log = grpc_port, http_port, log
        self.seen: dict[str, list[int]] = {}
        self.not_serving_seen = False
        self.stop = threading.Event()

    def run(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        stub = health_pb2_grpc.HealthStub(channel)
        while not self.stop.is_set() and len(self.seen) < 2:
            if "grpc" not in self.seen:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                except grpc.RpcError:
                    status = None  # port not bound yet
                if status == health_pb2.HealthCheckResponse.SERVING:
                    self.seen["grpc"] = executes(self.log)
                elif status is not None:
                    self.not_serving_seen = True
            if "http" not in self.seen:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{self.http_port}/health/ready", timeout=0.5) as r:
                        if r.status == 200:
                            self.seen["http"] = executes(self.log)
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.02)
        channel.close()


def serve_and_watch(repo: Path, log: Path, tmp_path: Path, **overrides) -> Watcher:
    """Start Triton, then the gateway in front of it while a Watcher looks; stop both."""
    triton = TritonProcess(repo, log_path=tmp_path / "triton.log")
    triton.start(timeout_s=120)
    try:
        grpc_port, http_port = free_port(), free_port()
        watcher = Watcher(grpc_port, http_port, log)
        watcher.start()
        config = ServerConfig(repository=repo, host="127.0.0.1", port=grpc_port, metrics_port=0,
                              http_port=http_port, triton_url=triton.grpc_url,
                              health_poll_s=0.1, **overrides)
        gateway = Gateway(config)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(gateway.start())
            # keep the loop turning (health polls) until the watcher has seen both
            deadline = time.monotonic() + 30
            while watcher.is_alive() and time.monotonic() < deadline:
                loop.run_until_complete(asyncio.sleep(0.1))
        finally:
            watcher.stop.set()
            loop.run_until_complete(gateway.stop(0.5))
            loop.close()
        watcher.join(5)
    finally:
        triton.stop()
    return watcher


def test_gateway_is_serving_only_after_its_warmup_request_was_answered(tmp_path):
    # No Triton model_warmup here, so the only execute before SERVING can be the gateway's.
    repo, log = make_repository(tmp_path, ServingPolicy(model_warmup="none"))
    assert executes(log) == []  # Triton itself ran nothing while loading
    watcher = serve_and_watch(repo, log, tmp_path)
    # The moment each probe first said ready, the warm-up (one request of one item) had run.
    assert watcher.seen == {"grpc": [1], "http": [1]}, watcher.seen


def test_tritons_model_warmup_runs_before_the_model_is_ready(tmp_path):
    # Triton's own warm-up from config.pbtxt, on the CPU python backend of the pytriton wheel:
    # batch 1, then batch 64 (which reaches model.py as 64 one-item requests in one execute),
    # all before Triton reports the model READY, with the gateway's warm-up turned off.
    repo, log = make_repository(tmp_path, ServingPolicy(model_warmup="zero",
                                                        warmup_batch_sizes=(1, 64)))
    watcher = serve_and_watch(repo, log, tmp_path, endpoint_warmup=False)
    assert watcher.seen["grpc"] == [1, 64] and watcher.seen["http"] == [1, 64], watcher.seen
