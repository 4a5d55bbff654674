"""Warm-up is part of readiness (issue 10, issue 15): an endpoint is routable, and the gateway
SERVING, only once it has answered a warm-up request. HealthMonitor against a fake backend
whose warm-up can be held open, so the order is observed, not timed."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from clipserve.endpoints import Precision, Tower, endpoint_name
from clipserve.server.errors import ServingError
from clipserve.server.health import HealthMonitor, catalog_warmups
from clipserve.server.metrics import ServerMetrics
from clipserve.server.repository import Catalog
from tests.unit.test_server_service import CONTEXT, SCALE, SIZE, write_repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GatedBackend:
    """Every model READY; embed() waits for ``release`` and can be made to fail."""

    def __init__(self, models):
        self.models = frozenset(models)
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str, tuple, np.dtype]] = []
        self.failing: set[str] = set()
        self.up = True

    async def embed(self, model, input_name, batch, timeout_s):
        self.calls.append((model, input_name, batch.shape, batch.dtype))
        await self.release.wait()
        if model in self.failing:
            raise ServingError.unavailable(f"endpoint {model} is not ready in Triton")
        return np.zeros((len(batch), 8), np.float32)

    async def server_ready(self, timeout_s):
        return self.up

    async def ready_models(self, timeout_s):
        return self.models if self.up else frozenset()

    async def close(self):
        pass


@pytest.fixture
def parts(tmp_path):
    catalog = Catalog.from_repository(write_repository(tmp_path / "repo"))
    backend = GatedBackend({s.name for s in catalog} | {"not_an_endpoint"})
    health = health_aio.HealthServicer()
    monitor = HealthMonitor(backend, health, ["clipserve.v1.EmbeddingService"],
                            ServerMetrics(CollectorRegistry(), catalog.scales), 0.1,
                            warmups=catalog_warmups(catalog))
    return catalog, backend, health, monitor


async def status(health, service=""):
    return (await health.Check(health_pb2.HealthCheckRequest(service=service), None)).status


async def test_not_serving_and_not_routable_until_every_endpoint_answered_its_warmup(parts):
    catalog, backend, health, monitor = parts
    await health.set("", NOT_SERVING)
    poll = asyncio.create_task(monitor.poll_once())
    while len(backend.calls) < len(catalog):  # every endpoint's warm-up is in flight ...
        await asyncio.sleep(0.01)
    assert not poll.done()
    # ... and until they answer, nothing is routable and health says NOT_SERVING.
    assert not monitor.state.ready_models and not monitor.state.serving
    assert await status(health) == NOT_SERVING
    backend.release.set()
    state = await poll
    assert state.serving and await status(health) == SERVING
    assert await status(health, "clipserve.v1.EmbeddingService") == SERVING
    assert state.ready_models == backend.models
    # One request per endpoint, of its own input, shape and dtype; none for foreign models.
    image = endpoint_name(SCALE, Precision.FP32, Tower.IMAGE)
    text = endpoint_name(SCALE, Precision.FP32, Tower.TEXT)
    seen = {model: rest for model, *rest in backend.calls}
    assert sorted(seen) == sorted(s.name for s in catalog)
    assert seen[image] == ["pixels", (1, SIZE, SIZE, 3), np.uint8]
    assert seen[text] == ["input_ids", (1, CONTEXT), np.int32]
    # Warm endpoints are not warmed again while they stay READY.
    await monitor.poll_once()
    assert len(backend.calls) == len(catalog)


async def test_a_failed_warmup_keeps_that_endpoint_out_and_is_retried(parts):
    catalog, backend, health, monitor = parts
    broken = endpoint_name(SCALE, Precision.INT8, Tower.IMAGE)
    backend.failing.add(broken)
    backend.release.set()
    state = await monitor.poll_once()
    assert not state.serving and await status(health) == NOT_SERVING
    assert broken not in state.ready_models
    assert endpoint_name(SCALE, Precision.FP32, Tower.IMAGE) in state.ready_models
    backend.failing.clear()
    state = await monitor.poll_once()
    assert state.serving and broken in state.ready_models
    assert [m for m, *_ in backend.calls].count(broken) == 2


async def test_endpoints_warm_up_again_after_triton_comes_back(parts):
    catalog, backend, health, monitor = parts
    backend.release.set()
    assert (await monitor.poll_once()).serving
    backend.up = False
    state = await monitor.poll_once()
    assert not state.serving and not state.ready_models
    backend.up = True
    assert (await monitor.poll_once()).serving
    assert len(backend.calls) == 2 * len(catalog)


async def test_without_warmups_a_ready_model_is_routable_at_once(parts):
    catalog, backend, health, _ = parts
    monitor = HealthMonitor(backend, health, [], ServerMetrics(CollectorRegistry(), ()), 0.1)
    state = await monitor.poll_once()
    assert state.serving and state.ready_models == backend.models and not backend.calls


async def test_the_request_path_is_warmed_through_the_real_decoder_and_tokenizers(tmp_path):
    from clipserve.server.app import warm_request_path
    from clipserve.server.images import ImageDecoder

    catalog = Catalog.from_repository(write_repository(tmp_path / "repo"))
    decoded, encoded = [], []

    class Recording(ImageDecoder):
        async def decode(self, images, size, waits=None):
            out = await super().decode(images, size, waits)
            decoded.append((images[0][:4], out.shape))
            return out

    class Tokenizer:
        def encode(self, texts):
            encoded.append(tuple(texts))

    decoder = Recording(1, 2, 1 << 20, 1 << 20)
    try:
        await warm_request_path(decoder, catalog, {"t": Tokenizer()})
    finally:
        decoder.close()
    # A PNG and a JPEG, each decoded and resized to the catalog's image size.
    assert decoded == [(b"\x89PNG", (1, SIZE, SIZE, 3)), (b"\xff\xd8\xff\xe0", (1, SIZE, SIZE, 3))]
    assert len(encoded) == 1
