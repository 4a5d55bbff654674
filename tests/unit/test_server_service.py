"""The servicer against a fake backend, no sockets: responses, routing, and every error status."""

from __future__ import annotations

import asyncio
import io
import random
import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from PIL import Image
from prometheus_client import CollectorRegistry

from clipserve.calibration import softmax
from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.server.config import ServerConfig
from clipserve.server.errors import ServingError
from clipserve.server.health import BackendState, HealthMonitor
from clipserve.server.images import ImageDecoder
from clipserve.server.metrics import ServerMetrics
from clipserve.server.repository import Catalog
from clipserve.server.routing import (HEADER_ENDPOINT, HEADER_PRECISION, HEADER_ROUTING_KEY,
                                      HEADER_SCALE, RoutingPolicy)
from clipserve.server.service import PRECISION_DESCRIPTIONS, ClipService, precision_to_pb
from clipserve.server.v1 import clipserve_pb2 as pb

SCALE = "tiny"
DIM = 8
SIZE = 16
CONTEXT = 6
MAX_BATCH = 3  # config.pbtxt max_batch_size: calls with more items are chunked
PRECISIONS = (Precision.FP32, Precision.INT8)
LABELS = ["zero", "one", "two"]
TEMPERATURE = 0.05
THRESHOLD = 0.6


# -- fakes -----------------------------------------------------------------------------------

def write_repository(root: Path, precisions=PRECISIONS, text_precisions=None) -> Path:
    text_precisions = precisions if text_precisions is None else text_precisions
    for precision in precisions:
        for tower in Tower:
            if tower is Tower.TEXT and precision not in text_precisions:
                continue
            d = root / endpoint_name(SCALE, precision, tower)
            d.mkdir(parents=True)
            image = tower is Tower.IMAGE
            Sidecar(scale=SCALE, precision=precision.value, tower=tower.value, embed_dim=DIM,
                    source="tiny::test", image_size=SIZE if image else None,
                    context_length=None if image else CONTEXT,
                    temperature=TEMPERATURE if image else None,
                    ood_threshold=THRESHOLD if image else None,
                    quantization={"method": "none"} if precision is Precision.FP32
                    else {"method": "dynamic", "per_channel": True},
                    labels=LABELS if image else None,
                    prompts=["a {}", "the {}"] if image else None).write(d)
            (d / "config.pbtxt").write_text(
                f'name: "{d.name}"\nmax_batch_size: {MAX_BATCH}\n'
                "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n")
    (root / "report.json").write_text("{}")
    return root


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class FakeTokenizer:
    """Ids from characters; truncates like CLIP (keeps context_length ids)."""

    def encode(self, texts):
        ids = np.zeros((len(texts), CONTEXT), np.int32)
        truncated = []
        for i, text in enumerate(texts):
            body = [1 + (ord(c) % 50) for c in text][: CONTEXT - 2]
            row = [100] + body + [101]
            ids[i, : len(row)] = row
            truncated.append(len(text) > CONTEXT - 2)
        return ids, truncated


def text_vector(ids_row: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(ids_row.astype(np.int64).sum()) + len(ids_row))
    return unit(rng.normal(size=DIM)).astype(np.float32)


def image_vector(pixels: np.ndarray) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[:3] = pixels.reshape(-1, 3).mean(axis=0) + 1.0
    return unit(v)


class FakeBackend:
    """Deterministic embeddings; records calls; can be taken down."""

    def __init__(self):
        self.calls: list[tuple[str, str, tuple, float]] = []
        self.down = False
        self.ready = None  # None: every model ready
        self.delay_s = 0.0

    async def embed(self, model, input_name, batch, timeout_s):
        self.calls.append((model, input_name, batch.shape, timeout_s))
        if self.down:
            raise ServingError.unavailable("Triton at fake:0 is unavailable")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        rows = [image_vector(x) if input_name == "pixels" else text_vector(x) for x in batch]
        return np.stack(rows)

    async def server_ready(self, timeout_s):
        return not self.down

    async def ready_models(self, timeout_s):
        return frozenset() if self.down else frozenset(self.ready or ())

    async def close(self):
        pass


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The parts of grpc.aio.ServicerContext the servicer uses."""

    def __init__(self, metadata=(), time_remaining=None):
        self._metadata = tuple(metadata)
        self._time_remaining = time_remaining
        self.initial_metadata = None

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return self._time_remaining

    async def send_initial_metadata(self, metadata):
        assert self.initial_metadata is None, "initial metadata sent twice"
        self.initial_metadata = tuple(metadata)

    async def abort(self, code, details=""):
        raise Aborted(code, details)


class Harness:
    def __init__(self, root: Path, **config):
        self.catalog = Catalog.from_repository(root)
        self.backend = FakeBackend()
        self.registry = CollectorRegistry()
        self.metrics = ServerMetrics(self.registry, self.catalog.scales)
        self.config = ServerConfig(repository=root, **{"max_batch_items": 5,
                                                       "request_timeout_s": 5.0, **config})
        self.decoder = ImageDecoder(2, 4, self.config.max_image_bytes,
                                    self.config.max_image_pixels)
        self.policy = RoutingPolicy.single(SCALE)
        self.state = BackendState(True, frozenset(s.name for s in self.catalog))
        self.tokenizers = {s.name: FakeTokenizer() for s in self.catalog if s.tower is Tower.TEXT}
        self.service = ClipService(
            config=self.config, catalog=self.catalog, backend=self.backend, decoder=self.decoder,
            tokenizers=self.tokenizers, metrics=self.metrics, routing=lambda: self.policy,
            state=lambda: self.state, rng=random.Random(0))

    def set_ready(self, names):
        self.state = BackendState(True, frozenset(names))

    def count(self, method: str, code: str, precision: str = "fp32", scale: str = SCALE):
        return self.registry.get_sample_value(
            "clipserve_requests_total",
            {"method": method, "scale": scale, "precision": precision, "code": code,
             "protocol": "grpc"}) or 0


@pytest.fixture
def repo(tmp_path) -> Path:
    return write_repository(tmp_path / "repo")


@pytest.fixture
def h(repo):
    harness = Harness(repo)
    yield harness
    harness.decoder.close()


def png(color=(10, 200, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


async def fails(coro, code: grpc.StatusCode) -> str:
    with pytest.raises(Aborted) as info:
        await coro
    assert info.value.code is code, info.value.details
    return info.value.details


def name(precision: Precision, tower: Tower) -> str:
    return endpoint_name(SCALE, precision, tower)


def endpoints_announced(ctx: FakeContext) -> list[str]:
    """x-clip-endpoint values of the initial metadata (which also carries x-clip-request-id)."""
    return [v for k, v in ctx.initial_metadata if k == HEADER_ENDPOINT]


# -- EmbedImages / EmbedTexts ----------------------------------------------------------------

async def test_embed_images_returns_normalised_vectors_and_names_the_endpoint(h):
    ctx = FakeContext()
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), png((0, 0, 0))]),
                                           ctx)
    assert endpoints_announced(ctx) == [name(Precision.FP32, Tower.IMAGE)]
    assert response.endpoint.name == name(Precision.FP32, Tower.IMAGE)
    assert response.endpoint.precision == pb.PRECISION_FP32
    assert response.endpoint.tower == pb.TOWER_IMAGE
    assert response.endpoint.embed_dim == DIM
    vectors = np.array([e.values for e in response.embeddings])
    assert vectors.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    # The backend saw uint8 NHWC pixels of the sidecar's size.
    assert h.backend.calls[0][1:3] == ("pixels", (2, SIZE, SIZE, 3))
    np.testing.assert_allclose(vectors[0], image_vector(
        np.broadcast_to(np.array([10, 200, 30], np.uint8), (SIZE, SIZE, 3))), atol=1e-6)
    assert h.count("EmbedImages", "OK") == 1


async def test_large_batches_are_chunked_to_max_batch_size_in_order(h):
    colors = [(i * 40, 0, 0) for i in range(5)]
    response = await h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[png(c) for c in colors]), FakeContext())
    assert sorted(c[2][0] for c in h.backend.calls) == [2, 3]
    firsts = [e.values[0] for e in response.embeddings]
    assert firsts == sorted(firsts)  # brighter red first component grows: order kept


async def test_embed_texts_tokenizes_and_reports_truncation(h):
    ctx = FakeContext([(HEADER_PRECISION, "int8")])
    response = await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["a cat", "ab"]), ctx)
    assert response.endpoint.name == name(Precision.INT8, Tower.TEXT)
    assert endpoints_announced(ctx) == [name(Precision.INT8, Tower.TEXT)]
    assert [e.truncated for e in response.embeddings] == [True, False]
    model, input_name, shape, _ = h.backend.calls[0]
    assert (model, input_name, shape) == (name(Precision.INT8, Tower.TEXT), "input_ids",
                                          (2, CONTEXT))
    assert h.count("EmbedTexts", "OK", precision="int8") == 1


async def test_packed_float32_images_equal_the_repeated_floats(h):
    images = [png(), png((0, 0, 0)), png((90, 90, 200))]
    plain = await h.service.EmbedImages(pb.EmbedImagesRequest(images=images), FakeContext())
    packed = await h.service.EmbedImages(pb.EmbedImagesRequest(images=images, pack_float32=True),
                                         FakeContext())
    expected = np.array([e.values for e in plain.embeddings], np.float32)
    assert expected.shape == (3, DIM) and not plain.embeddings_f32
    assert len(packed.embeddings) == 0 and len(packed.embeddings_f32) == 3 * DIM * 4
    got = np.frombuffer(packed.embeddings_f32, "<f4").reshape(3, packed.endpoint.embed_dim)
    np.testing.assert_array_equal(got, expected)  # bit for bit, request order
    assert packed.request_id and packed.endpoint == plain.endpoint
    # Other formats are packed per row already: the flag changes nothing there.
    f16 = await h.service.EmbedImages(pb.EmbedImagesRequest(
        images=images, format=pb.EMBEDDING_FORMAT_FLOAT16, pack_float32=True), FakeContext())
    assert not f16.embeddings_f32 and len(f16.embeddings) == 3
    assert all(len(e.packed) == 2 * DIM for e in f16.embeddings)


async def test_packed_float32_texts_keep_per_text_metadata(h):
    texts = ["a cat", "ab", "a dog"]
    plain = await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=texts), FakeContext())
    packed = await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=texts, pack_float32=True),
                                        FakeContext())
    got = np.frombuffer(packed.embeddings_f32, "<f4").reshape(len(texts), DIM)
    np.testing.assert_array_equal(got, np.array([e.values for e in plain.embeddings],
                                                np.float32))
    assert [(e.truncated, e.tokens) for e in packed.embeddings] == [
        (e.truncated, e.tokens) for e in plain.embeddings]
    assert [e.truncated for e in packed.embeddings] == [True, False, True]
    assert all(len(e.values) == 0 for e in packed.embeddings)


async def test_remaining_deadline_is_passed_to_the_backend(h):
    await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), FakeContext(time_remaining=0.8))
    assert 0 < h.backend.calls[-1][3] <= 0.8
    await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), FakeContext())
    assert 0.8 < h.backend.calls[-1][3] <= h.config.request_timeout_s


async def test_slow_backend_is_deadline_exceeded(h):
    h.backend.delay_s = 1.0
    await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]),
                                     FakeContext(time_remaining=0.05)),
                grpc.StatusCode.DEADLINE_EXCEEDED)
    assert h.count("EmbedTexts", "DEADLINE_EXCEEDED") == 1


async def test_a_deadline_during_the_header_send_lets_the_send_finish_then_fails(h):
    # gRPC allows one pending batch per call: cancelled mid-send, the error status would fail
    # (TOO_MANY_OPERATIONS). The send must complete; the deadline then answers the call.
    class SlowSend(FakeContext):
        finished = False

        async def send_initial_metadata(self, metadata):
            await asyncio.sleep(0.1)
            await super().send_initial_metadata(metadata)
            self.finished = True

    ctx = SlowSend(time_remaining=0.03)
    await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), ctx),
                grpc.StatusCode.DEADLINE_EXCEEDED)
    assert ctx.finished and endpoints_announced(ctx) == [name(Precision.FP32, Tower.TEXT)]
    assert h.backend.calls == []  # the deadline struck before the backend call
    assert h.count("EmbedTexts", "DEADLINE_EXCEEDED") == 1
    # A deadline that leaves time for the send and the call still succeeds.
    fast = SlowSend(time_remaining=2.0)
    await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), fast)
    assert fast.finished and h.count("EmbedTexts", "OK") == 1


# -- routing through the servicer ------------------------------------------------------------

async def test_headers_select_the_endpoint(h):
    ctx = FakeContext([(HEADER_SCALE, SCALE), (HEADER_PRECISION, "INT8")])
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), ctx)
    assert response.endpoint.precision == pb.PRECISION_INT8
    assert endpoints_announced(ctx) == [name(Precision.INT8, Tower.IMAGE)]


async def test_ab_split_is_sticky_per_routing_key(h):
    h.policy = RoutingPolicy.from_json('{"weights": {"fp32": 50, "int8": 50}}', SCALE)
    seen = {}
    for i in range(40):
        for _ in range(2):
            ctx = FakeContext([(HEADER_ROUTING_KEY, f"user-{i}")])
            response = await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), ctx)
            seen.setdefault(i, set()).add(response.endpoint.name)
    assert all(len(names) == 1 for names in seen.values())
    assert {n for names in seen.values() for n in names} == {
        name(Precision.FP32, Tower.TEXT), name(Precision.INT8, Tower.TEXT)}


async def test_ab_skips_an_arm_that_is_not_ready(h):
    h.policy = RoutingPolicy.from_json('{"weights": {"fp32": 50, "int8": 50}}', SCALE)
    h.set_ready([name(Precision.FP32, Tower.TEXT)])
    for i in range(20):
        ctx = FakeContext([(HEADER_ROUTING_KEY, str(i))])
        response = await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), ctx)
        assert response.endpoint.precision == pb.PRECISION_FP32


# -- error statuses --------------------------------------------------------------------------

@pytest.mark.parametrize("images, fragment", [
    ([], "images is empty"),
    ([b"x"] * 6, "6 images in one call; at most 5"),
])
async def test_bad_batch_sizes_are_invalid_argument(h, images, fragment):
    details = await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=images),
                                                FakeContext()),
                          grpc.StatusCode.INVALID_ARGUMENT)
    assert fragment in details
    assert h.count("EmbedImages", "INVALID_ARGUMENT", precision="none", scale="none") == 1


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
    return png_header(5000, 5000)


@pytest.mark.parametrize("bad, fragment", [
    (b"\x89PNG but not really", "image 1 is not a decodable image"),
    (gif(), "image 1 is GIF, which is not supported"),
    (bomb(), "image 1 is 5000x5000 = 25000000 pixels"),
    (b"", "image 1 is empty"),
])
async def test_bad_images_are_invalid_argument_naming_the_item(repo, bad, fragment):
    h = Harness(repo, max_image_pixels=1_000_000)
    try:
        details = await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), bad]),
                                                    FakeContext()),
                              grpc.StatusCode.INVALID_ARGUMENT)
        assert fragment in details
        assert not h.backend.calls
    finally:
        h.decoder.close()


async def test_too_long_text_is_invalid_argument(repo):
    h = Harness(repo, max_text_chars=10)
    details = await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["ok", "x" * 11]),
                                               FakeContext()),
                          grpc.StatusCode.INVALID_ARGUMENT)
    assert "text 1 is 11 characters; at most 10" in details
    h.decoder.close()


@pytest.mark.parametrize("metadata, fragment", [
    ([(HEADER_PRECISION, "fp8")], "valid precisions: fp32, fp16, int8, int4"),
    ([(HEADER_SCALE, "huge")], "valid scales: tiny"),
])
async def test_unknown_header_values_are_invalid_argument(h, metadata, fragment):
    details = await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]),
                                               FakeContext(metadata)),
                          grpc.StatusCode.INVALID_ARGUMENT)
    assert fragment in details


async def test_valid_but_absent_precision_is_not_found(h):
    details = await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]),
                                               FakeContext([(HEADER_PRECISION, "int4")])),
                          grpc.StatusCode.NOT_FOUND)
    assert "tiny_int4_text" in details and "fp32, int8" in details


async def test_present_but_not_ready_endpoint_is_unavailable(h):
    h.set_ready([name(Precision.FP32, Tower.TEXT)])
    details = await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]),
                                               FakeContext([(HEADER_PRECISION, "int8")])),
                          grpc.StatusCode.UNAVAILABLE)
    assert "tiny_int8_text is not ready" in details


async def test_triton_down_is_unavailable_without_calling_it(h):
    h.state = BackendState(False, frozenset())
    details = await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]),
                                                FakeContext()),
                          grpc.StatusCode.UNAVAILABLE)
    assert "Triton is not ready" in details
    assert not h.backend.calls


async def test_backend_failure_mid_call_keeps_its_status(h):
    h.backend.down = True  # the readiness snapshot is stale: Triton died since the last poll
    await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), FakeContext()),
                grpc.StatusCode.UNAVAILABLE)


async def test_unexpected_errors_are_internal_with_a_generic_message(h, caplog):
    async def broken(*args, **kwargs):
        raise KeyError("secret detail")

    h.backend.embed = broken
    details = await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), FakeContext()),
                          grpc.StatusCode.INTERNAL)
    assert "secret" not in details
    assert "secret detail" in caplog.text


async def test_wrong_embedding_shape_from_backend_is_internal(h):
    async def short(model, input_name, batch, timeout_s):
        return np.zeros((len(batch), DIM - 1), np.float32)

    h.backend.embed = short
    await fails(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), FakeContext()),
                grpc.StatusCode.INTERNAL)


# -- Classify --------------------------------------------------------------------------------

async def test_classify_with_request_labels(h):
    labels = ["red", "green", "blue"]
    ctx = FakeContext()
    response = await h.service.Classify(pb.ClassifyRequest(
        images=[png((250, 0, 0)), png((0, 0, 250))], labels=labels,
        prompt_templates=["a {} image", "{}"]), ctx)
    assert endpoints_announced(ctx) == [name(Precision.FP32, Tower.IMAGE)]
    assert response.endpoint.name == name(Precision.FP32, Tower.IMAGE)
    assert response.text_endpoint.name == name(Precision.FP32, Tower.TEXT)
    assert list(response.labels) == labels
    assert response.temperature == pytest.approx(TEMPERATURE)
    # Reference: label = renormalised mean of its prompts' embeddings; softmax(cos / T).
    tok = FakeTokenizer()
    label_vecs = []
    for label in labels:
        ids, _ = tok.encode([f"a {label} image", label])
        label_vecs.append(unit(np.mean([text_vector(r) for r in ids], axis=0)))
    for color, result in zip([(250, 0, 0), (0, 0, 250)], response.results):
        img = image_vector(np.broadcast_to(np.array(color, np.uint8), (SIZE, SIZE, 3)))
        expected = softmax(np.array(label_vecs) @ img, TEMPERATURE)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        assert result.top_index == int(expected.argmax())
        assert result.top_label == labels[result.top_index]
        assert result.confidence == pytest.approx(expected.max(), abs=1e-6)
        assert result.ood_score == pytest.approx(expected.max(), abs=1e-6)
        assert result.out_of_distribution == (expected.max() < THRESHOLD)
    # 3 labels x 2 templates = 6 prompts, chunked by max_batch_size 3.
    text_calls = [c for c in h.backend.calls if c[1] == "input_ids"]
    assert sorted(c[2][0] for c in text_calls) == [3, 3]


async def test_classify_without_labels_uses_the_endpoint_label_set(h):
    response = await h.service.Classify(pb.ClassifyRequest(images=[png()]), FakeContext())
    assert list(response.labels) == LABELS
    text_calls = [c for c in h.backend.calls if c[1] == "input_ids"]
    assert sum(c[2][0] for c in text_calls) == len(LABELS) * 2  # the sidecar's two prompts


@pytest.mark.parametrize("labels, templates, fragment", [
    (["only"], [], "at least 2"),
    (["a", "b", "a"], [], "label 2 ('a') repeats label 0"),
    (["a", " "], [], "label 1 is empty"),
    (["a", "b"], ["no slot"], "prompt template 0 ('no slot') has no {}"),
    ([str(i) for i in range(30)], ["{}", "a {}"], "60 prompts; at most 50"),
])
async def test_classify_bad_labels_are_invalid_argument(repo, labels, templates, fragment):
    h = Harness(repo, max_labels=50)
    details = await fails(h.service.Classify(pb.ClassifyRequest(
        images=[png()], labels=labels, prompt_templates=templates), FakeContext()),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert fragment in details
    h.decoder.close()


async def test_classify_needs_both_towers(tmp_path):
    root = write_repository(tmp_path / "r", text_precisions=(Precision.FP32,))
    h = Harness(root)
    details = await fails(h.service.Classify(pb.ClassifyRequest(images=[png()]),
                                             FakeContext([(HEADER_PRECISION, "int8")])),
                          grpc.StatusCode.NOT_FOUND)
    assert "tiny_int8_text" in details
    h.decoder.close()


# -- ListModels ------------------------------------------------------------------------------

async def test_list_models_describes_every_endpoint(h):
    h.policy = RoutingPolicy.from_json('{"weights": {"fp32": 3, "int8": 1}}', SCALE)
    h.set_ready([s.name for s in h.catalog if s.precision is Precision.FP32])
    response = await h.service.ListModels(pb.ListModelsRequest(), FakeContext())
    assert list(response.scales) == [SCALE]
    assert list(response.precisions) == [pb.PRECISION_FP32, pb.PRECISION_INT8]
    infos = {i.endpoint.name: i for i in response.endpoints}
    assert set(infos) == {s.name for s in h.catalog}
    image = infos[name(Precision.INT8, Tower.IMAGE)]
    assert not image.ready and infos[name(Precision.FP32, Tower.IMAGE)].ready
    assert image.image_size == SIZE and image.context_length == 0
    assert image.max_batch_size == MAX_BATCH and image.source == "tiny::test"
    assert image.description == PRECISION_DESCRIPTIONS[Precision.INT8] != ""
    assert dict(image.quantization) == {"method": "dynamic", "per_channel": "true"}
    assert list(image.labels) == LABELS
    assert image.routing_weight == pytest.approx(0.25)
    assert infos[name(Precision.FP32, Tower.TEXT)].context_length == CONTEXT


def test_proto_enums_mirror_the_python_enums():
    assert [precision_to_pb(p) for p in Precision] == list(range(len(Precision)))
    assert pb.Precision.Name(0) == "PRECISION_FP32"
    assert [pb.Tower.Name(i) for i in range(len(Tower))] == [f"TOWER_{t.name}" for t in Tower]


# -- EmbedStream -----------------------------------------------------------------------------

async def requests(*items):
    for item in items:
        await asyncio.sleep(0)
        yield item


async def collect(service, request_iter, ctx):
    return [r async for r in service.EmbedStream(request_iter, ctx)]


async def test_stream_answers_every_item_and_reports_bad_ones_in_place(h):
    ctx = FakeContext([(HEADER_PRECISION, "int8")])
    items = [pb.EmbedStreamRequest(id="img", image=png()),
             pb.EmbedStreamRequest(id="txt", text="a long text here"),
             pb.EmbedStreamRequest(id="bad", image=b"junk"),
             pb.EmbedStreamRequest(id="none")]
    responses = {r.id: r for r in await collect(h.service, requests(*items), ctx)}
    assert set(responses) == {"img", "txt", "bad", "none"}
    assert set(endpoints_announced(ctx)) == {
        name(Precision.INT8, Tower.IMAGE), name(Precision.INT8, Tower.TEXT)}
    assert responses["img"].endpoint.name == name(Precision.INT8, Tower.IMAGE)
    assert len(responses["img"].embedding.values) == DIM
    assert responses["txt"].endpoint.name == name(Precision.INT8, Tower.TEXT)
    assert responses["txt"].embedding.truncated
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "item 'bad' is not a decodable image" in responses["bad"].error.message
    assert responses["none"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert h.count("EmbedStream", "OK", precision="int8") == 1


async def test_stream_limits_items_in_flight(repo):
    h = Harness(repo, stream_concurrency=2)
    h.backend.delay_s = 0.01
    in_flight, peak = 0, 0
    original = h.backend.embed

    async def counting(*args):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(*args)
        finally:
            in_flight -= 1

    h.backend.embed = counting
    items = [pb.EmbedStreamRequest(id=str(i), text=f"t{i}") for i in range(10)]
    responses = await collect(h.service, requests(*items), FakeContext())
    assert sorted(int(r.id) for r in responses) == list(range(10))
    assert peak <= 2
    h.decoder.close()


async def test_stream_with_bad_header_fails_the_call(h):
    await fails(collect(h.service, requests(pb.EmbedStreamRequest(id="1", text="x")),
                        FakeContext([(HEADER_PRECISION, "fp8")])),
                grpc.StatusCode.INVALID_ARGUMENT)


# -- health mirroring ------------------------------------------------------------------------

async def test_health_follows_backend_readiness(h):
    health = health_aio.HealthServicer()
    monitor = HealthMonitor(h.backend, health, ["clipserve.v1.EmbeddingService"], h.metrics, 0.1)
    h.backend.ready = {s.name for s in h.catalog}

    async def status(service=""):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), None)
        return response.status

    state = await monitor.poll_once()
    assert state.server_ready and state.is_ready(name(Precision.FP32, Tower.IMAGE))
    assert await status() == health_pb2.HealthCheckResponse.SERVING
    assert h.registry.get_sample_value("clipserve_backend_ready") == 1
    h.backend.down = True
    state = await monitor.poll_once()
    assert not state.server_ready and not state.ready_models
    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status("clipserve.v1.EmbeddingService") == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    h.backend.down = False
    await monitor.poll_once()
    assert await status() == health_pb2.HealthCheckResponse.SERVING
