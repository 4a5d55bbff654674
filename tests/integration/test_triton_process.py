"""TritonProcess against the real tritonserver from the nvidia-pytriton wheel, on CPU.

Each test builds a tiny model repository in tmp_path. The whole file runs in about 20 s on
two cores: a Triton start is ~1 s, a graceful stop ~2 s (Triton's shutdown polls once a
second).
"""

from __future__ import annotations

import importlib.machinery
import socket
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clipserve.procs import group_members
from clipserve.server import triton_process
from clipserve.server.triton_process import TritonProcess, find_tritonserver

pytestmark = pytest.mark.integration

try:
    find_tritonserver()
except RuntimeError as exc:  # nvidia-pytriton missing, or no stub for this Python
    pytest.skip(str(exc), allow_module_level=True)


# A numpy-only model: y = 2 * x.
DOUBLE_CONFIG = """
name: "double"
backend: "python"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

DOUBLE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = (2 * x).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
"""

# Runs model.onnx (y = x + 1) with onnxruntime inside the stub: proves the stub sees the
# venv's packages, which is what the real clipserve models need.
ORT_CONFIG = DOUBLE_CONFIG.replace('"double"', '"ort_plus_one"')

ORT_MODEL = """
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            (y,) = self.session.run(["y"], {"x": x})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
"""

BROKEN_CONFIG = DOUBLE_CONFIG.replace('"double"', '"broken"')

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("clipserve-test: weights file is missing")
"""

HANGING_CONFIG = DOUBLE_CONFIG.replace('"double"', '"hanging"')

HANGING_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(600)
"""


def _add_model(repo: Path, name: str, config: str, model_py: str) -> Path:
    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (version_dir / "model.py").write_text(textwrap.dedent(model_py))
    return version_dir


def _write_plus_one_onnx(path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "plus_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    # Pinned opset/IR so a newer onnx package still writes something this onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], client_timeout=10).as_numpy("y")


@pytest.fixture
def double_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    _add_model(repo, "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    return repo


def test_serves_numpy_and_onnxruntime_models_then_stops_cleanly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _add_model(repo, "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    _write_plus_one_onnx(_add_model(repo, "ort_plus_one", ORT_CONFIG, ORT_MODEL) / "model.onnx")
    log_path = tmp_path / "triton.log"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    triton = TritonProcess(repo, log_path=log_path)
    triton.start(timeout_s=60)
    try:
        pid = triton.pid
        assert triton.is_running()
        assert triton.grpc_url.startswith("127.0.0.1:")
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        np.testing.assert_array_equal(_infer(client, "double", x), 2 * x)
        np.testing.assert_array_equal(_infer(client, "ort_plus_one", x), x + 1)
        client.close()
        with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
            assert b"nv_inference_count" in response.read()
    finally:
        triton.stop()

    assert not triton.is_running()
    assert not group_members(pid), "tritonserver or a Python backend stub outlived stop()"
    triton.stop()  # idempotent
    assert "Signal (15) received" in log_path.read_text()  # it was a graceful stop


def _external_ipv4() -> str | None:
    """A non-loopback IPv4 address of this host (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_metrics_address_opens_the_metrics_port_only(double_repo: Path) -> None:
    address = _external_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to test binding with")
    with TritonProcess(double_repo) as loopback:
        port = int(loopback.metrics_url.rsplit(":", 1)[1].split("/")[0])
        assert not _accepts(address, port)  # default: loopback only
    with TritonProcess(double_repo, metrics_address="0.0.0.0") as triton:
        port = int(triton.metrics_url.rsplit(":", 1)[1].split("/")[0])
        assert triton.metrics_url.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10).read()
        assert b"nv_inference_request_success" in text
        for url in (triton.grpc_url, triton.http_url):
            assert not _accepts(address, int(url.rsplit(":", 1)[1])), url
            assert _accepts("127.0.0.1", int(url.rsplit(":", 1)[1])), url


def test_kill_makes_server_unreachable_at_once(double_repo: Path) -> None:
    with TritonProcess(double_repo) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        assert client.is_server_ready(client_timeout=2)
        pid = triton.pid

        triton.kill()
        began = time.monotonic()
        try:
            ready = client.is_server_ready(client_timeout=2)
        except grpcclient.InferenceServerException:
            ready = False
        assert not ready
        assert time.monotonic() - began < 3
        assert not triton.is_running()
        assert not group_members(pid)
        client.close()
    # __exit__ called stop() after kill(): still fine.


def test_broken_model_fails_start_with_tritons_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _add_model(repo, "broken", BROKEN_CONFIG, BROKEN_MODEL)
    triton = TritonProcess(repo)

    began = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        triton.start(timeout_s=60)
    assert time.monotonic() - began < 30, "a load failure should end start() early"
    message = str(raised.value)
    assert "exited with code" in message
    assert "failed to load 'broken'" in message  # Triton's own text from the log tail
    assert "clipserve-test: weights file is missing" in message  # the model's exception
    assert not triton.is_running()


def test_model_that_never_loads_times_out(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _add_model(repo, "hanging", HANGING_CONFIG, HANGING_MODEL)
    triton = TritonProcess(repo)

    began = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready after 3 s"):
        triton.start(timeout_s=3)
    assert time.monotonic() - began < 20
    assert not triton.is_running()


def test_retries_once_when_a_picked_port_is_taken(
    double_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate losing the race between picking a free port and Triton binding it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = triton_process.free_port
        handed_out = []

        def free_port_first_taken(host: str) -> int:
            port = taken if not handed_out else real_free_port(host)
            handed_out.append(port)
            return port

        monkeypatch.setattr(triton_process, "free_port", free_port_first_taken)
        log_path = tmp_path / "triton.log"
        with TritonProcess(double_repo, log_path=log_path) as triton:
            assert triton.grpc_url != f"127.0.0.1:{taken}"
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            assert client.is_server_ready(client_timeout=2)
            client.close()

    log = log_path.read_text()
    assert f"'127.0.0.1:{taken}' already in use" in log
    assert log.count("$ ") == 2  # one failed launch, one retry


def test_explicit_port_taken_fails_without_retry(double_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        log_path = tmp_path / "triton.log"
        triton = TritonProcess(double_repo, grpc_port=taken, log_path=log_path)
        with pytest.raises(RuntimeError, match="already in use"):
            triton.start(timeout_s=60)
    assert log_path.read_text().count("$ ") == 1


def test_find_tritonserver_names_what_it_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake pytriton install whose wheel has a stub only for a Python we are not running.
    package = tmp_path / "site-packages" / "pytriton"
    dist = package / "tritonserver"
    (dist / "bin").mkdir(parents=True)
    (dist / "bin" / "tritonserver").touch()
    (dist / "backends" / "python").mkdir(parents=True)
    (dist / "backends" / "python" / "libtriton_python.so").touch()
    (dist / "backends" / "python" / "triton_python_backend_utils.py").touch()
    (dist / "python_backend_stubs" / "2.7").mkdir(parents=True)
    (package.parent / "nvidia_pytriton.libs").mkdir()
    fake_spec = importlib.machinery.ModuleSpec("pytriton", None, is_package=True)
    fake_spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(
        triton_process.importlib.util, "find_spec",
        lambda name: fake_spec if name == "pytriton" else None,
    )

    with pytest.raises(RuntimeError) as raised:
        find_tritonserver()
    message = str(raised.value)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert str(dist / "python_backend_stubs" / version / "triton_python_backend_stub") in message
    assert "stubs available for: 2.7" in message

    monkeypatch.setattr(triton_process.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="nvidia-pytriton"):
        find_tritonserver()
