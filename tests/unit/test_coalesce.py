"""Coalescing: overlapping calls to one endpoint share Triton requests, each caller gets its own
rows in order, and a bad item fails only its caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.server.coalesce import Coalescer
from clipserve.server.errors import ServingError
from clipserve.server.repository import EndpointSpec, instance_count
from clipserve.server.v1 import clipserve_pb2 as pb

from .test_server_service import (SCALE, Aborted, FakeContext, Harness, image_vector, png,
                                  write_repository)

DIM = 4
BAD = -1.0  # a row whose first value is this makes the fake Triton reject its request


def spec(max_batch_size: int = 8, instances: int = 1, name: str = "s_fp32_image") -> EndpointSpec:
    sidecar = Sidecar(scale="s", precision="fp32", tower="image", embed_dim=DIM,
                      source="test", image_size=2)
    return EndpointSpec(name=name, scale="s", precision=Precision.FP32, tower=Tower.IMAGE,
                        sidecar=sidecar, max_batch_size=max_batch_size, directory=Path("."),
                        instance_count=instances)


class GatedBackend:
    """Records the rows of every request; each request waits until the test opens the gate,
    so the test decides which calls overlap. Embedding row = the input row's first value,
    repeated, so every row can be traced back to its caller."""

    def __init__(self):
        self.requests: list[list[float]] = []
        self.gate = asyncio.Event()
        self.fail_with: Exception | None = None

    async def embed(self, model, input_name, batch, timeout_s):
        self.requests.append([float(x) for x in batch[:, 0]])
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if (batch[:, 0] == BAD).any():
            raise RuntimeError("Triton rejected the batch: INVALID_ARG")
        return np.repeat(batch[:, :1].astype(np.float32), DIM, axis=1)


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0.0] for v in values], np.float32)


async def started(backend: GatedBackend, count: int) -> None:
    """Until the backend has seen ``count`` requests."""
    for _ in range(200):
        if len(backend.requests) >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(backend.requests)} requests, expected {count}")


async def test_overlapping_calls_merge_and_each_caller_gets_its_rows_in_order():
    backend = GatedBackend()
    sent: list[int] = []
    coalescer = Coalescer(backend, on_send=lambda s, n: sent.append(n))
    endpoint = spec(max_batch_size=8)
    first = asyncio.ensure_future(coalescer.embed(endpoint, rows(1), 5.0))
    await started(backend, 1)  # in flight: the next calls wait
    others = [asyncio.ensure_future(coalescer.embed(endpoint, rows(*values), 5.0))
              for values in ((2, 3), (4,), (5, 6, 7))]
    await asyncio.sleep(0.01)
    assert len(backend.requests) == 1  # nothing else went while the first was in flight
    backend.gate.set()
    results = await asyncio.gather(first, *others)
    # The three waiting calls went as one request, in arrival order.
    assert backend.requests == [[1.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]
    assert sent == [1, 6]
    for result, values in zip(results, ((1,), (2, 3), (4,), (5, 6, 7))):
        np.testing.assert_array_equal(result[:, 0], values)
        assert result.shape == (len(values), DIM)


async def test_merged_requests_respect_max_batch_size():
    backend = GatedBackend()
    coalescer = Coalescer(backend)
    endpoint = spec(max_batch_size=4)
    first = asyncio.ensure_future(coalescer.embed(endpoint, rows(0), 5.0))
    await started(backend, 1)
    # 3 + 2 rows exceed 4: a full batch goes at once, the rest when something returns.
    others = [asyncio.ensure_future(coalescer.embed(endpoint, rows(*v), 5.0))
              for v in ((1, 2), (3,), (4, 5), (6,))]
    await asyncio.sleep(0.01)
    backend.gate.set()
    results = await asyncio.gather(first, *others)
    assert all(len(r) <= 4 for r in backend.requests)
    assert sorted(x for r in backend.requests for x in r) == [0, 1, 2, 3, 4, 5, 6]
    assert max(len(r) for r in backend.requests) > 1
    for result, values in zip(results, ((0,), (1, 2), (3,), (4, 5), (6,))):
        np.testing.assert_array_equal(result[:, 0], values)


async def test_a_rejected_merged_request_fails_only_the_caller_with_the_bad_rows():
    backend = GatedBackend()
    coalescer = Coalescer(backend)
    endpoint = spec()
    first = asyncio.ensure_future(coalescer.embed(endpoint, rows(1), 5.0))
    await started(backend, 1)
    good = asyncio.ensure_future(coalescer.embed(endpoint, rows(2, 3), 5.0))
    bad = asyncio.ensure_future(coalescer.embed(endpoint, rows(4, BAD), 5.0))
    also_good = asyncio.ensure_future(coalescer.embed(endpoint, rows(5), 5.0))
    await asyncio.sleep(0.01)
    backend.gate.set()
    results = await asyncio.gather(first, good, bad, also_good, return_exceptions=True)
    assert isinstance(results[2], RuntimeError)
    np.testing.assert_array_equal(results[0][:, 0], [1])
    np.testing.assert_array_equal(results[1][:, 0], [2, 3])
    np.testing.assert_array_equal(results[3][:, 0], [5])
    # The merged request failed, then each of its calls went on its own.
    assert backend.requests[1] == [2.0, 3.0, 4.0, BAD, 5.0]
    assert sorted(map(tuple, backend.requests[2:])) == [(2.0, 3.0), (4.0, BAD), (5.0,)]


async def test_a_backend_outage_fails_every_merged_caller_without_retries():
    backend = GatedBackend()
    coalescer = Coalescer(backend)
    endpoint = spec()
    first = asyncio.ensure_future(coalescer.embed(endpoint, rows(1), 5.0))
    await started(backend, 1)
    waiting = [asyncio.ensure_future(coalescer.embed(endpoint, rows(v), 5.0)) for v in (2, 3)]
    await asyncio.sleep(0.01)
    backend.fail_with = ServingError.unavailable("Triton at fake:0 is unavailable")
    backend.gate.set()
    results = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert all(isinstance(r, ServingError) and r.code is grpc.StatusCode.UNAVAILABLE
               for r in results)
    assert len(backend.requests) == 2  # the merged one was not split and retried


async def test_a_cancelled_waiting_caller_is_dropped_from_its_batch():
    backend = GatedBackend()
    coalescer = Coalescer(backend)
    endpoint = spec()
    first = asyncio.ensure_future(coalescer.embed(endpoint, rows(1), 5.0))
    await started(backend, 1)
    gone = asyncio.ensure_future(coalescer.embed(endpoint, rows(2), 5.0))
    kept = asyncio.ensure_future(coalescer.embed(endpoint, rows(3), 5.0))
    await asyncio.sleep(0.01)
    gone.cancel()
    backend.gate.set()
    await first
    np.testing.assert_array_equal((await kept)[:, 0], [3])
    assert backend.requests == [[1.0], [3.0]]


async def test_one_request_in_flight_per_model_instance_and_off_means_no_waiting():
    backend = GatedBackend()
    coalescer = Coalescer(backend)
    endpoint = spec(instances=2)
    calls = [asyncio.ensure_future(coalescer.embed(endpoint, rows(v), 5.0)) for v in (1, 2, 3)]
    await started(backend, 2)
    await asyncio.sleep(0.01)
    assert backend.requests == [[1.0], [2.0]]  # two instances: two in flight, the third waits
    backend.gate.set()
    await asyncio.gather(*calls)

    backend = GatedBackend()
    coalescer = Coalescer(backend, enabled=False)
    calls = [asyncio.ensure_future(coalescer.embed(spec(), rows(v), 5.0)) for v in (1, 2, 3)]
    await started(backend, 3)
    backend.gate.set()
    await asyncio.gather(*calls)
    assert backend.requests == [[1.0], [2.0], [3.0]]


def test_instance_count_is_read_from_config_pbtxt():
    assert instance_count('name: "m"\nmax_batch_size: 8\n') == 1
    assert instance_count("instance_group [ { count: 3 kind: KIND_CPU } ]") == 3
    assert instance_count("instance_group [\n  { count: 2 kind: KIND_GPU gpus: [0] },\n"
                          "  { kind: KIND_GPU gpus: [1, 2] }\n]") == 4


# -- through the servicer --------------------------------------------------------------------

@pytest.fixture
def h(tmp_path):
    harness = Harness(write_repository(tmp_path / "repo"))
    yield harness
    harness.decoder.close()


async def test_servicer_merges_overlapping_calls_and_an_undecodable_image_fails_only_its_call(h):
    gate = asyncio.Event()
    sizes: list[int] = []
    original = h.backend.embed

    image_model = h.catalog.get(SCALE, Precision.FP32, Tower.IMAGE).triton_model

    async def gated(model, input_name, batch, timeout_s):
        if model != image_model:  # live scoring's label prefetch embeds its prompts too
            return await original(model, input_name, batch, timeout_s)
        sizes.append(len(batch))
        await gate.wait()
        return await original(model, input_name, batch, timeout_s)

    h.backend.embed = gated
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    first = asyncio.ensure_future(h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[png(colors[0])]), FakeContext()))
    while not sizes:
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[png(colors[1])]), FakeContext()))
    broken = asyncio.ensure_future(h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[b"\x89PNG not really"]), FakeContext()))
    third = asyncio.ensure_future(h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[png(colors[2])]), FakeContext()))
    lanes = h.service.embedder.coalescer._lanes
    for _ in range(1000):  # until both good calls are decoded and waiting behind the first
        if broken.done() and sum(len(lane.waiting) for lane in lanes.values()) == 2:
            break
        await asyncio.sleep(0.002)
    gate.set()
    results = await asyncio.gather(first, second, broken, third, return_exceptions=True)
    assert isinstance(results[2], Aborted)
    assert results[2].code is grpc.StatusCode.INVALID_ARGUMENT
    assert sizes == [1, 2]  # the two good calls that overlapped the first went together
    for result, color in zip((results[0], results[1], results[3]), colors):
        expected = image_vector(np.full((2, 2, 3), color, np.float32) / 255.0)
        got = np.array(result.embeddings[0].values)
        # Each caller's own image: its colour's channel dominates its vector.
        assert int(np.argmax(got[:3])) == int(np.argmax(expected[:3]))
    assert h.registry.get_sample_value("clipserve_batch_size_count", {
        "tower": "image", "scale": "tiny", "precision": "fp32"}) == 2
