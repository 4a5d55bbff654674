"""A new precision without a restart (issue 15), on a real tritonserver and the real gateway.

The gateway starts its own tritonserver child (polling the repository, ``triton_repository_poll_s``)
over a copy of the session repository that holds only fp32 and int8. While a client thread calls
continuously (header-less, so the routing file decides), the int4 endpoints are copied in the
way an operator (or ``clipserve export --repository``) does: built beside the repository and
renamed into it. The test waits until an ``x-clip-precision: int4`` call is served, moves 10%
of the traffic there by rewriting the routing file, sees calls land on int4, rewrites a served
endpoint's sidecar (Triton reloads that model; the gateway re-reads it), takes int4 out of
the routing file again, removes its directories, and waits until the gateway answers int4 with
NOT_FOUND. Not one of the client's calls may fail, and health must stay SERVING throughout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.server.v1 import clipserve_pb2 as pb

from .test_gateway import GatewayThread, config_for, png

pytestmark = pytest.mark.integration

SCALE = "digits-s"
SERVED = (Precision.FP32, Precision.INT8)
ADDED = Precision.INT4
WAIT_S = 60.0  # upper bound for each step; each takes a few poll periods


def endpoint_dirs(precision: Precision) -> list[str]:
    return [endpoint_name(SCALE, precision, tower) for tower in Tower]


def publish(source: Path, repository: Path) -> None:
    """Copy an endpoint directory in as an operator would: beside the repository, then rename."""
    staging = repository.parent / f".staging-{source.name}"
    shutil.copytree(source, staging)
    staging.rename(repository / source.name)


def write_routing(path: Path, weights: dict) -> None:
    staging = path.with_name(path.name + ".new")
    staging.write_text(json.dumps({"weights": weights}))
    staging.replace(path)  # atomic, like a ConfigMap update


class Caller(threading.Thread):
    """Calls EmbedImages and EmbedTexts back to back without precision headers; records every
    served endpoint, every failure and every health answer that was not SERVING."""

    def __init__(self, gw: GatewayThread):
        super().__init__(daemon=True)
        self.gw = gw
        self.stop = threading.Event()
        self.served: Counter[str] = Counter()
        self.failures: list[str] = []
        self.not_serving = 0
        self.lock = threading.Lock()

    def run(self):
        image = pb.EmbedImagesRequest(images=[png(0)])
        text = pb.EmbedTextsRequest(texts=["a photo of the digit 3"])
        i = 0
        while not self.stop.is_set():
            method, request = ((self.gw.embed.EmbedImages, image) if i % 2 == 0
                               else (self.gw.embed.EmbedTexts, text))
            i += 1
            try:
                _, call = method.with_call(request, timeout=20)
                name = dict(call.initial_metadata())["x-clip-endpoint"]
                with self.lock:
                    self.served[name] += 1
            except grpc.RpcError as exc:
                with self.lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
            if i % 10 == 0 and self.gw.health_status() != health_pb2.HealthCheckResponse.SERVING:
                self.not_serving += 1

    def count(self, name: str) -> int:
        with self.lock:
            return self.served[name]


def wait_for(predicate, what: str, timeout_s: float = WAIT_S) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def int4_call(gw: GatewayThread) -> grpc.StatusCode:
    request = pb.EmbedImagesRequest(images=[png(1)])
    try:
        _, call = gw.embed.EmbedImages.with_call(
            request, metadata=(("x-clip-precision", ADDED.value),), timeout=20)
    except grpc.RpcError as exc:
        return exc.code()
    assert dict(call.initial_metadata())["x-clip-endpoint"] == endpoint_name(
        SCALE, ADDED, Tower.IMAGE)
    return grpc.StatusCode.OK


def test_add_route_and_remove_a_precision_while_serving(repository, tmp_path):
    live = tmp_path / "repo"
    live.mkdir()
    for precision in SERVED:
        for name in endpoint_dirs(precision):
            shutil.copytree(repository / name, live / name)
    routing = tmp_path / "routing.json"
    write_routing(routing, {"fp32": 100})
    gw = GatewayThread(config_for(live, "", routing_file=routing, triton_repository_poll_s=1))
    caller = Caller(gw)
    try:
        assert int4_call(gw) == grpc.StatusCode.NOT_FOUND  # as for any precision not served
        caller.start()
        wait_for(lambda: caller.count(endpoint_name(SCALE, Precision.FP32, Tower.TEXT)) > 0,
                 "the client's first calls")

        copied = time.monotonic()
        for name in endpoint_dirs(ADDED):
            publish(repository / name, live)
        # Explicit calls before the gateway has it are NOT_FOUND or UNAVAILABLE (not routable
        # yet), never anything else.
        codes = set()

        def int4_served():
            code = int4_call(gw)
            codes.add(code)
            return code == grpc.StatusCode.OK
        wait_for(int4_served, "an x-clip-precision: int4 call served")
        to_first_call = time.monotonic() - copied
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND,
                         grpc.StatusCode.UNAVAILABLE}, codes
        assert caller.count(endpoint_name(SCALE, ADDED, Tower.IMAGE)) == 0  # not in routing yet

        write_routing(routing, {"fp32": 90, "int4": 10})
        for tower in Tower:
            wait_for(lambda: caller.count(endpoint_name(SCALE, ADDED, tower)) >= 3,
                     f"header-less {tower.value} calls routed to int4")

        # A sidecar rewritten in place (`clipserve evaluate --write-sidecars`, then SIGHUP)
        # changes a served model's directory: the polling Triton reloads that model, which
        # must not fail a call either.
        fp32_image = live / endpoint_name(SCALE, Precision.FP32, Tower.IMAGE)
        car = Sidecar.read(fp32_image)
        dataclasses.replace(car, revision=car.revision + 1).write(fp32_image)
        gw.loop.call_soon_threadsafe(gw.gateway.reload)
        wait_for(lambda: gw.gateway.catalog.by_name(fp32_image.name).sidecar.revision
                 == car.revision + 1, "the new sidecar revision read")
        served = caller.count(fp32_image.name)
        time.sleep(3.0)  # three Triton polls: its reload of the model happens meanwhile
        assert caller.count(fp32_image.name) > served

        write_routing(routing, {"fp32": 100})
        wait_for(lambda: all(arm.precision is Precision.FP32
                             for arm in gw.gateway.routing.policy.arms),
                 "the routing file without int4 in force")
        # Drained: no new call goes to int4 now; any still in flight finishes (Triton's
        # unload waits for them), then the directories go.
        drained = {name: caller.count(name) for name in endpoint_dirs(ADDED)}
        # A client still naming int4 explicitly meanwhile: served until Triton unloads it,
        # then UNAVAILABLE (not routable) or NOT_FOUND (gone from the catalog), nothing else.
        explicit = Counter()
        stop_explicit = threading.Event()

        def name_int4():
            while not stop_explicit.is_set():
                explicit[int4_call(gw)] += 1
        naming = threading.Thread(target=name_int4, daemon=True)
        naming.start()
        for name in endpoint_dirs(ADDED):
            aside = tmp_path / f"removed-{name}"
            (live / name).rename(aside)
            shutil.rmtree(aside)
        wait_for(lambda: explicit[grpc.StatusCode.NOT_FOUND] > 0,
                 "int4 gone from the gateway's catalog")
        stop_explicit.set()
        naming.join(30)
        assert set(explicit) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                                 grpc.StatusCode.NOT_FOUND}, explicit
        assert int4_call(gw) == grpc.StatusCode.NOT_FOUND
        assert {name: caller.count(name) for name in endpoint_dirs(ADDED)} == drained
        # The two towers' directories go one after the other, so a repository poll between
        # the two renames sees one int4 endpoint left for a moment (CI saw exactly that).
        wait_for(lambda: gw.gateway.catalog.precisions() == list(SERVED),
                 "both int4 endpoints gone from the gateway's catalog")
        time.sleep(0.5)  # a few more calls after the removal
    finally:
        caller.stop.set()
        caller.join(30)
        gw.close()

    assert caller.failures == []
    assert caller.not_serving == 0
    fp32 = sum(caller.count(n) for n in endpoint_dirs(Precision.FP32))
    print(f"copy to first int4 call {to_first_call:.2f} s; calls: fp32 {fp32}, int4 "
          f"{sum(drained.values())}, failed {len(caller.failures)}; explicit int4 calls "
          f"during removal: {dict((c.name, n) for c, n in explicit.items())}")


def test_export_into_an_existing_repository_adds_without_rewriting_the_others(
        repository, cache_dir, tmp_path):
    """`clipserve export --precisions int4 --repository DIR` on a repository that holds fp32
    and int8: int4 appears, fp32 and int8 are byte- and inode-identical, nothing is staged
    inside the repository or left beside it."""
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export
    from clipserve.server.repository import Catalog

    live = tmp_path / "repo"
    live.mkdir()
    for precision in SERVED:
        for name in endpoint_dirs(precision):
            shutil.copytree(repository / name, live / name)

    def snapshot():
        return {p.relative_to(live): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
                for name in (*endpoint_dirs(Precision.FP32), *endpoint_dirs(Precision.INT8))
                for p in sorted((live / name).rglob("*")) if p.is_file()}
    before = snapshot()
    export(ExportConfig(models=SCALE, precisions=(ADDED.value,), repository=str(live),
                        cache_dir=str(cache_dir), throughput_seconds=0.1), log=lambda line: None)
    assert snapshot() == before
    catalog = Catalog.from_repository(live)
    assert catalog.precisions() == [Precision.FP32, Precision.INT8, ADDED]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert sorted(p.name for p in live.iterdir() if p.is_dir()) == sorted(
        name for p in (*SERVED, ADDED) for name in endpoint_dirs(p))
