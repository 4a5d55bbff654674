"""Graceful shutdown over real sockets: in-flight calls finish, new ones are refused.

The backend is the unit tests' fake (slowed down), so a call is reliably in flight when the
gateway is told to stop; no tritonserver is needed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.endpoints import Tower
from clipserve.server import app
from clipserve.server.app import Gateway
from clipserve.server.config import ServerConfig
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc
from tests.unit.test_server_service import FakeBackend, FakeTokenizer, write_repository

pytestmark = pytest.mark.integration


def test_stop_drains_in_flight_calls_and_refuses_new_ones(tmp_path, monkeypatch):
    repo = write_repository(tmp_path / "repo")
    monkeypatch.setattr(app, "load_tokenizers", lambda catalog: {
        s.name: FakeTokenizer() for s in catalog if s.tower is Tower.TEXT})
    backend = FakeBackend()
    backend.ready = {p.name for p in repo.iterdir() if p.is_dir()}
    backend.delay_s = 1.0
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = Gateway(ServerConfig(repository=repo, host="127.0.0.1", port=0, metrics_port=0,
                                   triton_url="unused:1", health_poll_s=0.1), backend=backend)
    asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    embed = pb_grpc.EmbeddingServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        in_flight = embed.EmbedTexts.future(pb.EmbedTextsRequest(texts=["x"]), timeout=10)
        time.sleep(0.3)  # the call is now waiting on the slow backend
        stopping = asyncio.run_coroutine_threadsafe(gateway.stop(5.0), loop)
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as refused:
            embed.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(in_flight.result().embeddings) == 1  # finished within the grace period
        stopping.result(10)
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(gateway.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
