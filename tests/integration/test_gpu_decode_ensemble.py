"""The GPU-decode ensemble config, loaded by a real tritonserver (the CPU one), with the DALI
step stood in for.

This machine's tritonserver has no DALI backend and no GPU, so ``E_dali`` is replaced by a
python-backend model with the same name, inputs and outputs that decodes with Pillow; the
ensemble's config.pbtxt is exactly what the export writes. What this checks: Triton accepts
the ensemble (names, shapes, ragged encoded input), requests of padded bytes of different
lengths flow through it, and the gateway's servicer, given an endpoint whose sidecar says
gpu_decode, gets the same embeddings from it as from the CPU path. What it cannot check:
the DALI pipeline itself (scripts/gpu_decode_check.py, on a GPU).
"""

from __future__ import annotations

import asyncio
import io
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from prometheus_client import CollectorRegistry

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name, gpu_decode_model_names
from clipserve.export import gpu_decode, repository
from clipserve.server.config import ServerConfig
from clipserve.server.health import BackendState
from clipserve.server.images import ImageDecoder, pack_encoded, preprocess
from clipserve.server.metrics import ServerMetrics
from clipserve.server.repository import Catalog
from clipserve.server.routing import RoutingPolicy
from clipserve.server.service import ClipService
from clipserve.server.triton_client import TritonBackend
from clipserve.server.v1 import clipserve_pb2 as pb

pytestmark = pytest.mark.integration

S = 8
DIM = S * S * 3  # the stand-in tower's embedding is its pixels, flattened: any pixel shows
ENDPOINT = endpoint_name("tiny", Precision.FP32, Tower.IMAGE)
DALI, ENSEMBLE = gpu_decode_model_names(ENDPOINT)
# The stand-in decodes at full scale: compare with the CPU path's exact (not reduced) decode.
EXACT = dict(max_bytes=1 << 20, max_pixels=1 << 20, reduced_jpeg=False)

# E_dali's stand-in: decode each zero-padded file with Pillow, shortest side to S (bicubic),
# centre crop, RGB. Imports nothing from clipserve (it runs in Triton's python stub).
_STAND_IN = '''
import io
import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

S = %d


def crop(data):
    img = Image.open(io.BytesIO(bytes(data)))
    w, h = img.size
    short, long = min(w, h), max(w, h)
    size = (S, int(S * long / short)) if w <= h else (int(S * long / short), S)
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - S) / 2.0)), int(round((size[1] - S) / 2.0))
    return np.asarray(img.crop((left, top, left + S, top + S)).convert("RGB"), np.uint8)


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "encoded").as_numpy()
            pixels = np.stack([crop(row) for row in batch])
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("pixels", pixels)]))
        return out
''' % S


def _flatten_tower(path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["f"], ["embedding"], axis=1)],
        "flatten", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", S, S, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", DIM])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from clipserve.server.triton_process import TritonProcess

    root = tmp_path_factory.mktemp("gpu-decode-repo")
    onnx_path = root.parent / "tower.onnx"
    _flatten_tower(onnx_path)
    sidecar = Sidecar(scale="tiny", precision="fp32", tower="image", embed_dim=DIM,
                      source="tiny::test", image_size=S,
                      gpu_decode=gpu_decode.sidecar_field(ENDPOINT))
    repository.write_endpoint(root, onnx_path, sidecar, backend="python",
                              policy=repository.ServingPolicy(model_warmup="none"))
    gpu_decode.write(root, ENDPOINT, sidecar, max_queue_delay_us=1000)
    # Swap the DALI model for the stand-in: same name, inputs and outputs.
    config = (root / DALI / "config.pbtxt").read_text()
    (root / DALI / "config.pbtxt").write_text(
        config.replace('backend: "dali"', 'backend: "python"').replace("KIND_GPU", "KIND_CPU"))
    (root / DALI / "1" / "dali.py").unlink()
    (root / DALI / "1" / "model.py").write_text(_STAND_IN)
    # The tower runs on the CPU here: KIND_CPU is already the python backend's.
    process = TritonProcess(root, log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    process.start(timeout_s=240)
    yield root, process
    process.stop()


def files() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for (w, h), fmt in (((40, 30), "JPEG"), ((17, 33), "PNG"), ((64, 64), "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, fmt)
        out.append(buf.getvalue())
    return out


async def test_the_ensemble_loads_and_matches_the_cpu_path(served):
    root, process = served
    backend = TritonBackend(process.grpc_url)
    try:
        assert {ENDPOINT, DALI, ENSEMBLE} <= await backend.ready_models(5.0)
        images = files()
        pixels = np.stack([preprocess(d, S, **EXACT)
                           for d in images])
        cpu = await backend.embed(ENDPOINT, "pixels", pixels, 30.0)
        together = await backend.embed(ENSEMBLE, "encoded", pack_encoded(images), 30.0)
        np.testing.assert_array_equal(together, cpu)
        # One at a time: requests of different lengths (ragged), concurrently batched.
        alone = await asyncio.gather(*(backend.embed(ENSEMBLE, "encoded", pack_encoded([d]), 30.0)
                                       for d in images))
        np.testing.assert_array_equal(np.concatenate(alone), cpu)
    finally:
        await backend.close()


async def test_the_servicer_embeds_through_the_ensemble(served):
    root, process = served
    catalog = Catalog.from_repository(root)
    assert [s.triton_model for s in catalog] == [ENSEMBLE]
    backend = TritonBackend(process.grpc_url)
    config = ServerConfig(repository=root)
    decoder = ImageDecoder(1, 4, config.max_image_bytes, config.max_image_pixels)
    service = ClipService(
        config=config, catalog=catalog, backend=backend, decoder=decoder, tokenizers={},
        metrics=ServerMetrics(CollectorRegistry(), catalog.scales),
        routing=lambda: RoutingPolicy.single("tiny"),
        state=lambda: BackendState(True, frozenset({ENDPOINT, DALI, ENSEMBLE})),
        rng=random.Random(0))
    from tests.unit.test_server_service import FakeContext
    try:
        images = files()
        response = await service.EmbedImages(pb.EmbedImagesRequest(images=images),
                                             FakeContext())
        got = np.array([e.values for e in response.embeddings], np.float32)
        want = np.stack([preprocess(d, S, **EXACT)
                         .reshape(-1).astype(np.float32) for d in images])
        np.testing.assert_array_equal(got, want)
    finally:
        decoder.close()
        await backend.close()


def test_the_real_gateway_warms_the_ensemble_and_serves_http_through_it(served):
    import base64

    import httpx

    from tests.integration.test_gateway import CALL_TIMEOUT_S, GatewayThread, config_for, wait_for

    root, process = served
    gateway = GatewayThread(config_for(root, process.grpc_url, http_port=0))
    try:
        # SERVING only once the ensemble answered its warm-up (a real JPEG through it).
        wait_for(lambda: gateway.health_status() == 1, 30, "SERVING")
        base = f"http://127.0.0.1:{gateway.gateway.http_port}/v1/embeddings"
        images = files()
        uris = ["data:image/png;base64," + base64.b64encode(d).decode() for d in images]
        r = httpx.post(base, json={"input": uris}, timeout=CALL_TIMEOUT_S)
        assert r.status_code == 200, r.text
        assert r.headers["x-clip-endpoint"] == ENDPOINT
        got = np.array([row["embedding"] for row in r.json()["data"]], np.float32)
        want = np.stack([preprocess(d, S, **EXACT).reshape(-1).astype(np.float32)
                         for d in images])
        np.testing.assert_array_equal(got, want)
        gif = io.BytesIO()
        Image.new("RGB", (8, 8)).save(gif, "GIF")
        bad = "data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode()
        r = httpx.post(base, json={"input": [uris[0], bad]}, timeout=CALL_TIMEOUT_S)
        assert r.status_code == 400 and "input[1] (image) is GIF" in r.text, r.text
    finally:
        gateway.close()
