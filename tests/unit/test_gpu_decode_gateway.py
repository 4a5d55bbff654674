"""The gateway with an image endpoint whose sidecar says GPU decode: calls send the checked,
zero-padded encoded files to its ensemble (never decoding them), bad images still fail with
INVALID_ARGUMENT before the backend, and CPU endpoints beside it keep sending pixels."""

from __future__ import annotations

import dataclasses
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.endpoints import (ENCODED_INPUT, Precision, Sidecar, Tower, endpoint_name,
                                 gpu_decode_model_names)
from clipserve.server.health import catalog_warmups
from clipserve.server.images import ImageDecoder
from clipserve.server.repository import read_endpoint
from clipserve.server.routing import RoutingPolicy
from clipserve.server.v1 import clipserve_pb2 as pb

from .test_server_service import (SIZE, FakeBackend, FakeContext, Harness, bomb, fails, gif,
                                  png, text_vector, write_repository)
from .test_server_service import name as endpoint

GPU = endpoint(Precision.INT8, Tower.IMAGE)
DALI, ENSEMBLE = gpu_decode_model_names(GPU)
INT8 = [("x-clip-precision", "int8")]


class RecordingBackend(FakeBackend):
    """Also keeps each batch it was sent."""

    def __init__(self):
        super().__init__()
        self.batches: list[np.ndarray] = []

    async def embed(self, model, input_name, batch, timeout_s):
        self.batches.append(batch.copy())
        vectors = await super().embed(model, input_name, batch, timeout_s)
        if input_name == ENCODED_INPUT:  # a vector of the file, whatever its padding
            vectors = np.stack([text_vector(np.trim_zeros(row, "b")) for row in batch])
        return vectors


def with_gpu_decode(root, name=GPU):
    """Mark one image endpoint of a test repository as exported with --gpu-decode."""
    sidecar = Sidecar.read(root / name)
    dataclasses.replace(sidecar, gpu_decode={"model": gpu_decode_model_names(name)[1],
                                             "input": ENCODED_INPUT,
                                             "decoder": "dali"}).write(root / name)
    return root


@pytest.fixture
def h(tmp_path):
    root = with_gpu_decode(write_repository(tmp_path / "repo"))
    harness = Harness(root, max_image_pixels=1_000_000)
    harness.backend = RecordingBackend()
    harness.service.embedder.coalescer._backend = harness.backend
    harness.set_ready([s.name for s in harness.catalog] + [DALI, ENSEMBLE])

    async def never(*args, **kwargs):
        raise AssertionError("a GPU-decode endpoint's images were decoded on the CPU")
    harness.decode_guard = never
    yield harness
    harness.decoder.close()


def jpeg(color=(200, 20, 20), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def extended_webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (1, 2, 3, 100)).save(buf, format="WEBP")
    data = buf.getvalue()
    assert data[12:16] == b"VP8X"  # alpha makes Pillow write the extended format
    return data


def assert_padded(batch: np.ndarray, files: list[bytes]) -> None:
    assert batch.dtype == np.uint8 and batch.shape == (len(files), max(map(len, files)))
    for row, data in zip(batch, files):
        assert row[:len(data)].tobytes() == data and not row[len(data):].any()


async def test_embed_images_forwards_the_encoded_files_to_the_ensemble(h, monkeypatch):
    monkeypatch.setattr(ImageDecoder, "decode", h.decode_guard)
    files = [jpeg(), png(), jpeg((0, 0, 255), (64, 64))]
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=files),
                                           FakeContext(INT8))
    assert response.endpoint.name == GPU  # clients still see the endpoint, not the ensemble
    assert len(response.embeddings) == 3
    (model, input_name, shape, _), = h.backend.calls
    assert (model, input_name) == (ENSEMBLE, ENCODED_INPUT)
    assert_padded(h.backend.batches[0], files)


async def test_a_large_file_does_not_pad_the_small_ones_to_its_size(h):
    small = [jpeg(size=(20, 20)) for _ in range(3)]
    large = jpeg((0, 90, 0), (900, 900)) + b"\x00" * 200_000  # trailing bytes: a 200 KB file
    files = [small[0], large, *small[1:]]
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=files),
                                           FakeContext(INT8))
    # Groups of consecutive files, each padded to at most twice its bytes + 64 KiB: the first
    # small file rides with the large one (one copy of waste), the other two go apart.
    narrow, wide = sorted(h.backend.batches, key=lambda b: b.shape[1])
    assert_padded(wide, files[:2])
    assert_padded(narrow, small[1:])
    assert narrow.nbytes + wide.nbytes <= 2 * sum(map(len, files)) + 2 * 64 * 1024
    assert narrow.nbytes + wide.nbytes < len(files) * len(large) * 0.6  # vs padding all four
    # Each image's embedding is the one it gets alone: order kept across the groups.
    for data, got in zip(files, response.embeddings):
        h.backend.batches.clear()
        alone = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[data]),
                                            FakeContext(INT8))
        assert list(alone.embeddings[0].values) == list(got.values)


async def test_cpu_endpoints_beside_it_still_get_pixels(h):
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[jpeg()]), FakeContext())
    (model, input_name, shape, _), = h.backend.calls
    assert (model, input_name, shape) == (endpoint(Precision.FP32, Tower.IMAGE), "pixels",
                                          (1, SIZE, SIZE, 3))


async def test_classify_sends_bytes_for_images_and_ids_for_labels(h, monkeypatch):
    monkeypatch.setattr(ImageDecoder, "decode", h.decode_guard)
    files = [jpeg(), png()]
    response = await h.service.Classify(
        pb.ClassifyRequest(images=files, labels=["cat", "dog"]), FakeContext(INT8))
    assert len(response.results) == 2
    sent = {model: batch for (model, *_), batch in zip(h.backend.calls, h.backend.batches)}
    assert set(sent) == {ENSEMBLE, endpoint(Precision.INT8, Tower.TEXT)}
    assert_padded(sent[ENSEMBLE], files)


async def test_stream_items_are_forwarded_as_bytes(h, monkeypatch):
    monkeypatch.setattr(ImageDecoder, "decode_one", h.decode_guard)
    data = jpeg()

    async def requests():
        yield pb.EmbedStreamRequest(id="a", image=data)
    responses = [r async for r in h.service.EmbedStream(requests(), FakeContext(INT8))]
    assert not responses[0].HasField("error") and len(responses[0].embedding.values) > 0
    assert h.backend.calls[0][:2] == (ENSEMBLE, ENCODED_INPUT)
    assert_padded(h.backend.batches[0], [data])


@pytest.mark.parametrize("bad, fragment", [
    (b"\xff\xd8\xff not a jpeg", "image 1 is not a decodable image"),
    (gif(), "image 1 is GIF, which is not supported"),
    (bomb(), "image 1 is 5000x5000 = 25000000 pixels"),
    (b"", "image 1 is empty"),
    (extended_webp(), "image 1 is an extended WebP"),
], ids=["corrupt", "gif", "bomb", "empty", "extended-webp"])
async def test_bad_images_are_refused_before_the_backend(h, bad, fragment):
    details = await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[jpeg(), bad]),
                                                FakeContext(INT8)),
                          grpc.StatusCode.INVALID_ARGUMENT)
    assert fragment in details
    assert not h.backend.calls
    assert h.count("EmbedImages", "INVALID_ARGUMENT", precision="int8") == 1


async def test_oversized_files_are_refused_before_the_backend(tmp_path):
    root = with_gpu_decode(write_repository(tmp_path / "repo"))
    h = Harness(root, max_image_bytes=1000)
    h.set_ready([s.name for s in h.catalog] + [DALI, ENSEMBLE])
    try:
        big = jpeg(size=(300, 300))
        assert len(big) > 1000
        details = await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[big]),
                                                    FakeContext(INT8)),
                              grpc.StatusCode.INVALID_ARGUMENT)
        assert f"image 0 is {len(big)} bytes; at most 1000" in details
        assert not h.backend.calls
    finally:
        h.decoder.close()


async def test_unavailable_while_the_ensemble_is_not_ready(h):
    h.set_ready([s.name for s in h.catalog])  # the tower is READY, its ensemble not yet
    await fails(h.service.EmbedImages(pb.EmbedImagesRequest(images=[jpeg()]), FakeContext(INT8)),
                grpc.StatusCode.UNAVAILABLE)
    assert not h.backend.calls
    listed = await h.service.ListModels(pb.ListModelsRequest(), FakeContext())
    ready = {e.endpoint.name: e.ready for e in listed.endpoints}
    assert ready[GPU] is False and ready[endpoint(Precision.FP32, Tower.IMAGE)] is True


def test_the_ensemble_warms_up_with_a_real_jpeg_and_the_tower_with_pixels(h):
    warmups = catalog_warmups(h.catalog)
    ensemble = warmups(ENSEMBLE)
    assert ensemble.input_name == ENCODED_INPUT and ensemble.batch.dtype == np.uint8
    with Image.open(io.BytesIO(ensemble.batch[0].tobytes())) as img:
        assert img.format == "JPEG"
        img.load()  # decodable, trailing zeros and all
    tower = warmups(GPU)
    assert (tower.input_name, tower.batch.shape) == ("pixels", (1, SIZE, SIZE, 3))
    assert warmups(DALI) is None


def test_gpu_decode_on_a_text_endpoint_is_refused(tmp_path):
    root = write_repository(tmp_path / "repo")
    text = endpoint(Precision.FP32, Tower.TEXT)
    with_gpu_decode(root, text)
    with pytest.raises(ValueError, match="gpu_decode must be an image endpoint"):
        read_endpoint(root / text)


async def test_the_router_skips_an_arm_whose_ensemble_is_not_ready(h):
    h.policy = RoutingPolicy.from_json('{"weights": {"fp32": 50, "int8": 50}}', "tiny")
    h.set_ready([s.name for s in h.catalog])  # int8's tower READY, its ensemble not
    for i in range(20):  # half of these users' arm is int8
        ctx = FakeContext([("x-clip-routing-key", f"user-{i}")])
        await h.service.EmbedImages(pb.EmbedImagesRequest(images=[jpeg()]), ctx)
    images = {model for model, *_ in h.backend.calls if "image" in model}
    assert images == {endpoint(Precision.FP32, Tower.IMAGE)}


def test_the_shadow_mirrors_only_between_endpoints_of_the_same_input_kind(h):
    shadow = h.service.live.shadow
    shadow.fraction = 1.0
    key = None
    gpu, cpu = (h.catalog.by_name(endpoint(p, Tower.IMAGE)) for p in (Precision.INT8,
                                                                        Precision.FP32))
    assert shadow.reference is Precision.FP32
    encoded = [np.zeros((1, 10), np.uint8)]
    assert not shadow.submit(gpu, encoded, np.zeros((1, 8), np.float32), key)
    assert shadow.submit(cpu, np.zeros((1, SIZE, SIZE, 3), np.uint8),
                         np.zeros((1, 8), np.float32), key)
