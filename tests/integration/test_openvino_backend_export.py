"""`clipserve export --backend openvino` end to end (the export is real; NVIDIA's Triton image
with its OpenVINO backend is not on this machine, so serving is checked the way the backend
loads a model: its config parsed as Triton's ModelConfig, only parameters it accepts, the
exported model.onnx read, batched to max_batch_size and compiled by OpenVINO)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from clipserve.endpoints import Sidecar, Tower
from clipserve.export import openvino_backend
from tests.conftest import source_digest

pytestmark = pytest.mark.integration
ov = pytest.importorskip("openvino")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def ovb_repository(cache_dir) -> Path:
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export

    path = cache_dir / f"test-openvino-backend-repository-{source_digest('export', 'clipserve')}"
    if not (path / "report.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        building = path.with_name(path.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        export(ExportConfig(models="digits-s", precisions=("fp32", "int8", "bf16"),
                            backend="openvino", allow_emulated_bf16=True,
                            repository=str(building), cache_dir=str(cache_dir),
                            throughput_seconds=0.2))
        building.rename(path)
    return path


def test_every_endpoint_is_an_openvino_backend_model_that_loads(ovb_repository):
    endpoints = sorted(p for p in ovb_repository.iterdir() if (p / "config.pbtxt").is_file())
    assert {p.name for p in endpoints} == {f"digits-s_{p}_{t.value}" for p in
                                           ("fp32", "int8", "bf16") for t in Tower}
    core = ov.Core()
    for endpoint in endpoints:
        config = text_format.Parse((endpoint / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.backend == "openvino" and config.default_model_filename == "model.onnx"
        assert sorted(p.name for p in (endpoint / "1").iterdir()) == ["model.onnx"]
        values = {k: v.string_value for k, v in config.parameters.items()}
        assert set(values) <= openvino_backend.ACCEPTED_KEYS
        sidecar = Sidecar.read(endpoint)
        assert ("HINT_BF16" in values) is (sidecar.precision == "bf16")
        runtime = sidecar.quantization["runtime"]
        assert runtime["chosen"] == "openvino" and runtime["computes"]
        (inp,) = config.input
        model = core.read_model(str(endpoint / "1" / "model.onnx"))
        ppp = ov.preprocess.PrePostProcessor(model)
        element = ov.Type.u8 if inp.data_type == model_config_pb2.TYPE_UINT8 else ov.Type.i32
        ppp.input(inp.name).tensor().set_element_type(element).set_layout(ov.Layout("N..."))
        model = ppp.build()
        ov.set_batch(model, config.max_batch_size)  # what the backend does with max_batch_size
        compiled = core.compile_model(model, "CPU", {
            "NUM_STREAMS": values["NUM_STREAMS"], "PERFORMANCE_HINT": values["PERFORMANCE_HINT"],
            **({"INFERENCE_PRECISION_HINT": "bf16"} if "HINT_BF16" in values else {})})
        shape = [config.max_batch_size, *inp.dims]
        feed = (np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
                if element == ov.Type.u8 else np.zeros(shape, np.int32))
        out = compiled.create_infer_request().infer({inp.name: feed})[compiled.output(0)]
        assert out.shape == (config.max_batch_size, sidecar.embed_dim)
        assert np.isfinite(out).all(), endpoint.name
    assert "CPU: " in (ovb_repository / "report.md").read_text()
