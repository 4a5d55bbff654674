"""The real gateway in front of the real tritonserver, on 127.0.0.1 with ephemeral ports.

Uses the session fixtures ``repository`` (an exported repository) and ``triton`` (a started
TritonProcess over it) from conftest.py. The gateway runs in-process on its own event loop in a
thread; the tests are plain synchronous gRPC clients, as a user's would be.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import threading
import time
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from PIL import Image

from clipserve.endpoints import Precision, Tower
from clipserve.server.app import Gateway
from clipserve.server.config import ServerConfig
from clipserve.server.images import preprocess
from clipserve.server.repository import Catalog
from clipserve.server.triton_process import TritonProcess
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc
from clipserve.tokenizer import ClipTokenizer

pytestmark = pytest.mark.integration

COSINE_MIN = 0.999  # same graph, same inputs: only float summation order differs
CALL_TIMEOUT_S = 20.0


class GatewayThread:
    """A Gateway on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway(config)
        self._run(self.gateway.start(), 60)
        self.address = f"127.0.0.1:{self.gateway.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.embed = pb_grpc.EmbeddingServiceStub(self.channel)
        self.classify = pb_grpc.ClassificationServiceStub(self.channel)
        self.models = pb_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _run(self, coro, timeout):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self):
        self.channel.close()
        self._run(self.gateway.stop(1.0), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def config_for(repository: Path, triton_url: str, **overrides) -> ServerConfig:
    return ServerConfig(repository=repository, host="127.0.0.1", port=0, metrics_port=0,
                        triton_url=triton_url, health_poll_s=0.2, routing_poll_s=0.2,
                        **overrides)


@pytest.fixture(scope="module")
def catalog(repository) -> Catalog:
    return Catalog.from_repository(repository)


@pytest.fixture(scope="module")
def gw(repository, triton):
    gateway = GatewayThread(config_for(repository, triton.grpc_url))
    yield gateway
    gateway.close()


def png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def vectors(response) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def with_metadata(stub_method, request, metadata=()):
    """Call a unary method; returns (response, initial metadata as a dict)."""
    response, call = stub_method.with_call(request, metadata=tuple(metadata),
                                           timeout=CALL_TIMEOUT_S)
    return response, dict(call.initial_metadata())


def status_of(stub_method, request, metadata=()) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub_method(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT_S)
    return info.value.code(), info.value.details()


# -- embeddings equal onnxruntime on the same model.onnx -------------------------------------

def test_embeddings_equal_onnxruntime_at_every_precision(gw, catalog, repository):
    images = [png(i) for i in range(3)]
    texts = ["a photo of the digit 7", "zero", "a very long text " * 20]
    for precision in catalog.precisions():
        for tower in Tower:
            spec = catalog.get(catalog.scales[0], precision, tower)
            session = ort.InferenceSession(str(spec.directory / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
            md = (("x-clip-scale", spec.scale), ("x-clip-precision", precision.value))
            if tower is Tower.IMAGE:
                size = spec.sidecar.image_size
                pixels = np.stack([preprocess(d, size, max_bytes=1 << 24, max_pixels=1 << 26)
                                   for d in images])
                expected = session.run(["embedding"], {"pixels": pixels})[0]
                response, initial = with_metadata(gw.embed.EmbedImages,
                                                  pb.EmbedImagesRequest(images=images), md)
            else:
                tokenizer = ClipTokenizer.from_file(spec.tokenizer_path,
                                                    spec.sidecar.context_length)
                ids, truncated = tokenizer.encode(texts)
                expected = session.run(["embedding"], {"input_ids": ids})[0]
                response, initial = with_metadata(gw.embed.EmbedTexts,
                                                  pb.EmbedTextsRequest(texts=texts), md)
                assert [e.truncated for e in response.embeddings] == truncated
                assert truncated[-1]
            assert initial["x-clip-endpoint"] == spec.name == response.endpoint.name
            got = vectors(response)
            assert got.shape == expected.shape
            assert cosines(got, expected).min() >= COSINE_MIN, spec.name


# -- routing ---------------------------------------------------------------------------------

def test_precision_header_selects_the_endpoint(gw, catalog):
    for precision in catalog.precisions():
        response, initial = with_metadata(gw.embed.EmbedTexts, pb.EmbedTextsRequest(texts=["x"]),
                                          (("x-clip-precision", precision.value),))
        assert response.endpoint.precision == pb.Precision.Value(f"PRECISION_{precision.name}")
        assert initial["x-clip-endpoint"].split("_")[1] == precision.value


def test_ab_split_over_1000_keys_is_proportional_sticky_and_reloads(repository, triton,
                                                                     catalog, tmp_path):
    if Precision.INT8 not in catalog.precisions():
        pytest.skip("needs fp32 and int8 endpoints")
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"weights": {"fp32": 90, "int8": 10}}))
    gateway = GatewayThread(config_for(repository, triton.grpc_url, routing_file=routing))
    try:
        def arm(key: str) -> str:
            _, initial = with_metadata(gateway.embed.EmbedTexts, pb.EmbedTextsRequest(texts=["x"]),
                                       (("x-clip-routing-key", key),))
            return initial["x-clip-endpoint"]

        keys = [f"user-{i}" for i in range(1000)]
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(arm, keys))
            again = list(pool.map(arm, keys[:200]))
        counts = Counter(name.split("_")[1] for name in first)
        # Binomial(1000, 0.1): 4 standard deviations is +-38.
        assert abs(counts["int8"] - 100) <= 38, counts
        assert counts["fp32"] + counts["int8"] == 1000
        assert again == first[:200]  # sticky

        routing.write_text(json.dumps({"weights": {"int8": 1}}))
        deadline = time.monotonic() + 10
        while arm("user-0").split("_")[1] != "int8":
            assert time.monotonic() < deadline, "routing file change not picked up"
            time.sleep(0.1)
        assert {arm(k).split("_")[1] for k in keys[:50]} == {"int8"}
    finally:
        gateway.close()


# -- errors ----------------------------------------------------------------------------------

def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: only the header is read
    before the pixel-count guard, so no test allocates the image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def bomb() -> bytes:
    return png_header(10_000, 5_000)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)).save(
        buf, format="JPEG", quality=90)
    return buf.getvalue()[:20_000]


@pytest.mark.parametrize("images, metadata, fragment", [
    ([], (), "images is empty"),
    ([b"x"] * 65, (), "65 images in one call; at most 64"),
    ([b"\x00not an image"], (), "image 0 is not a decodable image"),
    (["GIF"], (), "image 0 is GIF, which is not supported"),
    (["BOMB"], (), "image 0 is 10000x5000 = 50000000 pixels; at most 40000000"),
    (["TRUNCATED_JPEG"], (), "image 0 is corrupt"),  # a 640x480 photo: the reduced decode
    (["PNG"], (("x-clip-precision", "fp8"),), "valid precisions: fp32, fp16, int8, int4"),
    (["PNG"], (("x-clip-scale", "enormous"),), "valid scales:"),
])
def test_bad_input_is_invalid_argument(gw, images, metadata, fragment):
    data = [{"GIF": gif(), "BOMB": bomb(), "PNG": png(0),
             "TRUNCATED_JPEG": truncated_jpeg()}.get(i, i) for i in images]
    code, details = status_of(gw.embed.EmbedImages, pb.EmbedImagesRequest(images=data), metadata)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert fragment in details


def test_valid_but_absent_precision_is_not_found(repository, triton, catalog, tmp_path):
    # A gateway whose repository holds only the fp32 endpoints, in front of the full Triton.
    partial = tmp_path / "partial"
    for spec in catalog:
        if spec.precision is Precision.FP32:
            shutil.copytree(spec.directory, partial / spec.name, ignore=shutil.ignore_patterns(
                "*.onnx", "*.onnx.data"))
    gateway = GatewayThread(config_for(partial, triton.grpc_url))
    try:
        code, details = status_of(gateway.embed.EmbedTexts, pb.EmbedTextsRequest(texts=["x"]),
                                  (("x-clip-precision", "int8"),))
        assert code is grpc.StatusCode.NOT_FOUND
        assert "_int8_text" in details and "precisions here: fp32" in details
    finally:
        gateway.close()


# -- the other RPCs --------------------------------------------------------------------------

def test_classify_returns_calibrated_probabilities_and_ood(gw, catalog):
    spec = catalog.get(catalog.scales[0], catalog.precisions()[0], Tower.IMAGE)
    response, initial = with_metadata(gw.classify.Classify,
                                      pb.ClassifyRequest(images=[png(1), png(2)]))
    assert initial["x-clip-endpoint"] == response.endpoint.name
    assert response.text_endpoint.tower == pb.TOWER_TEXT
    assert list(response.labels) == list(spec.sidecar.labels)
    assert response.temperature == pytest.approx(spec.sidecar.temperature)
    for result in response.results:
        assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert result.top_label == response.labels[result.top_index]
        assert result.out_of_distribution == (result.ood_score < response.ood_threshold)


def test_list_models_lists_every_endpoint_ready(gw, catalog):
    response = gw.models.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
    assert {e.endpoint.name for e in response.endpoints} == {s.name for s in catalog}
    assert all(e.ready for e in response.endpoints)
    assert all(e.description for e in response.endpoints)


def test_stream_embeds_many_items_like_the_unary_calls(gw):
    images = [png(i) for i in range(6)]
    texts = [f"text number {i}" for i in range(6)]
    requests = [pb.EmbedStreamRequest(id=f"i{i}", image=d) for i, d in enumerate(images)]
    requests += [pb.EmbedStreamRequest(id=f"t{i}", text=t) for i, t in enumerate(texts)]
    requests.append(pb.EmbedStreamRequest(id="bad", image=b"junk"))
    responses = {r.id: r for r in gw.embed.EmbedStream(iter(requests), timeout=CALL_TIMEOUT_S)}
    assert set(responses) == {r.id for r in requests}
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    unary_images = vectors(gw.embed.EmbedImages(pb.EmbedImagesRequest(images=images),
                                                timeout=CALL_TIMEOUT_S))
    unary_texts = vectors(gw.embed.EmbedTexts(pb.EmbedTextsRequest(texts=texts),
                                              timeout=CALL_TIMEOUT_S))
    streamed_images = np.array([responses[f"i{i}"].embedding.values for i in range(6)])
    streamed_texts = np.array([responses[f"t{i}"].embedding.values for i in range(6)])
    assert cosines(streamed_images, unary_images).min() >= COSINE_MIN
    assert cosines(streamed_texts, unary_texts).min() >= COSINE_MIN


def test_packed_float32_embeddings_equal_the_repeated_floats(gw, catalog):
    from clipserve.client import Client

    images = [png(i) for i in range(4)]
    texts = ["a photo of the digit 3", "nine", "a very long text " * 20]
    md = (("x-clip-precision", "fp32"),)
    plain_images = gw.embed.EmbedImages(pb.EmbedImagesRequest(images=images), metadata=md,
                                        timeout=CALL_TIMEOUT_S)
    packed_images = gw.embed.EmbedImages(pb.EmbedImagesRequest(images=images, pack_float32=True),
                                         metadata=md, timeout=CALL_TIMEOUT_S)
    dim = packed_images.endpoint.embed_dim
    assert not packed_images.embeddings and len(packed_images.embeddings_f32) == 4 * dim * 4
    # Triton's batches differ between the two calls only in timing: the same model on the same
    # pixels, so the floats agree to summation order.
    got = np.frombuffer(packed_images.embeddings_f32, "<f4").reshape(4, dim)
    np.testing.assert_allclose(got, vectors(plain_images), atol=1e-6)
    plain_texts = gw.embed.EmbedTexts(pb.EmbedTextsRequest(texts=texts), metadata=md,
                                      timeout=CALL_TIMEOUT_S)
    packed_texts = gw.embed.EmbedTexts(pb.EmbedTextsRequest(texts=texts, pack_float32=True),
                                       metadata=md, timeout=CALL_TIMEOUT_S)
    np.testing.assert_allclose(
        np.frombuffer(packed_texts.embeddings_f32, "<f4").reshape(len(texts), dim),
        vectors(plain_texts), atol=1e-6)
    assert [e.truncated for e in packed_texts.embeddings] == [False, False, True]
    # The client asks for packed floats by default; without, it reads the repeated floats.
    with Client(gw.address) as packed, Client(gw.address, pack_float32=False) as unpacked:
        a = packed.embed_images(images, precision="fp32")
        b = unpacked.embed_images(images, precision="fp32")
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
        np.testing.assert_allclose(a.vectors, vectors(plain_images), atol=1e-6)
        t = packed.embed_texts(texts, precision="fp32")
        assert t.truncated == [False, False, True] and t.vectors.shape == (3, dim)


def test_reflection_lists_the_services(gw):
    services = set(ProtoReflectionDescriptorDatabase(gw.channel).get_services())
    assert {"clipserve.v1.EmbeddingService", "clipserve.v1.ClassificationService",
            "clipserve.v1.ModelService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint_counts_calls(gw):
    gw.models.ListModels(pb.ListModelsRequest())  # no deadline: the server's own applies
    url = f"http://127.0.0.1:{gw.gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'clipserve_requests_total{code="OK",method="ListModels"' in text
    assert "clipserve_backend_ready 1.0" in text


# -- Triton going away and coming back ---------------------------------------------------------

def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_health_and_calls_follow_triton_down_and_back(repository):
    triton = TritonProcess(repository)
    triton.start(120)
    port = int(triton.grpc_url.rsplit(":", 1)[1])
    gateway = GatewayThread(config_for(repository, triton.grpc_url))
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert gateway.health_status() == serving
        assert gateway.health_status("clipserve.v1.EmbeddingService") == serving
        gateway.embed.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), timeout=CALL_TIMEOUT_S)

        triton.kill()
        wait_for(lambda: gateway.health_status() == not_serving, 10, "NOT_SERVING")
        started = time.monotonic()
        code, _ = status_of(gateway.embed.EmbedTexts, pb.EmbedTextsRequest(texts=["x"]))
        assert code is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2.0, "UNAVAILABLE must come fast, not at the deadline"

        triton = TritonProcess(repository, grpc_port=port)
        triton.start(120)
        wait_for(lambda: gateway.health_status() == serving, 15, "SERVING again")
        gateway.embed.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), timeout=CALL_TIMEOUT_S)
    finally:
        gateway.close()
        triton.stop()
