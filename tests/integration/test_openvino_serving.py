"""bf16 end to end: `clipserve export` of digits-s at fp32,bf16 with --runtime openvino, the
real tritonserver loading the endpoints with OpenVINO inside its Python backend, and the real
gateway routing x-clip-precision: bf16 to them, with bf16-labelled metrics."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.server.images import preprocess
from clipserve.server.repository import Catalog
from clipserve.server.triton_process import TritonProcess
from clipserve.server.v1 import clipserve_pb2 as pb
from tests.conftest import source_digest
from tests.integration.test_gateway import (GatewayThread, config_for, cosines, png, vectors,
                                            with_metadata)

pytestmark = pytest.mark.integration
pytest.importorskip("openvino")

# bf16 against the same FP32 graph under onnxruntime: the fidelity target (measured
# on random-init digits-s >= 0.99988; trained models are smoother).
BF16_MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def ov_repository(cache_dir) -> Path:
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export

    path = cache_dir / f"test-openvino-repository-{source_digest('export', 'clipserve')}"
    if not (path / "report.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        building = path.with_name(path.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        # allow_emulated_bf16: this test checks serving, so it runs on CPUs without bf16 too
        export(ExportConfig(models="digits-s", precisions=("fp32", "bf16"), runtime="openvino",
                            allow_emulated_bf16=True, repository=str(building),
                            cache_dir=str(cache_dir), throughput_seconds=0.2))
        building.rename(path)
    return path


@pytest.fixture(scope="module")
def served(ov_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-ov") / "triton.log"
    triton = TritonProcess(ov_repository, log_path=log)
    triton.start(timeout_s=300)
    gateway = GatewayThread(config_for(ov_repository, triton.grpc_url))
    yield gateway, triton, log
    gateway.close()
    triton.stop()


def test_export_writes_openvino_configs_and_records_why(ov_repository):
    for tower in Tower:
        bf16 = ov_repository / f"digits-s_bf16_{tower.value}"
        config = (bf16 / "config.pbtxt").read_text()
        assert 'key: "runtime" value: { string_value: "openvino" }' in config
        assert 'key: "openvino_precision_hint" value: { string_value: "bf16" }' in config
        fp32 = (ov_repository / f"digits-s_fp32_{tower.value}" / "config.pbtxt").read_text()
        assert 'key: "openvino_precision_hint" value: { string_value: "f32" }' in fp32
        quantization = Sidecar.read(bf16).quantization
        assert quantization["method"] == "bf16-runtime"
        assert quantization["runtime"]["chosen"] == "openvino"
        # the bf16 endpoint ships the FP32 graph itself
        assert (bf16 / "1" / "model.onnx").read_bytes() == (
            ov_repository / f"digits-s_fp32_{tower.value}" / "1" / "model.onnx").read_bytes()
    assert "CPU: " in (ov_repository / "report.md").read_text()


def test_bf16_is_routed_served_by_openvino_and_counted(served, ov_repository):
    import onnxruntime as ort

    gateway, _, log = served
    catalog = Catalog.from_repository(ov_repository)
    assert catalog.precisions() == [Precision.FP32, Precision.BF16]
    spec = catalog.get("digits-s", Precision.BF16, Tower.IMAGE)
    images = [png(i) for i in range(4)]
    pixels = np.stack([preprocess(d, spec.sidecar.image_size, max_bytes=1 << 24,
                                  max_pixels=1 << 26) for d in images])
    fp32_ort = ort.InferenceSession(str(spec.directory / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"]).run(
        ["embedding"], {"pixels": pixels})[0]

    got = {}
    for precision in (Precision.BF16, Precision.FP32):
        response, initial = with_metadata(gateway.embed.EmbedImages,
                                          pb.EmbedImagesRequest(images=images),
                                          (("x-clip-precision", precision.value),))
        assert initial["x-clip-endpoint"] == f"digits-s_{precision.value}_image"
        assert response.endpoint.precision == pb.Precision.Value(f"PRECISION_{precision.name}")
        got[precision] = vectors(response)
    assert cosines(got[Precision.BF16], fp32_ort).min() >= BF16_MIN_COSINE
    # bf16 arithmetic really ran (a silent fall back to onnxruntime would equal FP32 exactly)
    assert np.abs(got[Precision.BF16] - fp32_ort).max() > 1e-5
    assert cosines(got[Precision.FP32], fp32_ort).min() >= 0.99999  # hint f32: still FP32
    response, _ = with_metadata(gateway.embed.EmbedTexts, pb.EmbedTextsRequest(texts=["seven"]),
                                (("x-clip-precision", "bf16"),))
    assert response.endpoint.name == "digits-s_bf16_text"

    text = urllib.request.urlopen(
        f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics", timeout=5).read().decode()
    items = [line for line in text.splitlines()
             if line.startswith("clipserve_items_total{") and 'precision="bf16"' in line]
    assert any('tower="image"' in line and float(line.split()[-1]) >= 4 for line in items), items
    assert "falling back to onnxruntime" not in log.read_text(errors="replace")
