"""Endpoints added to and removed from a served repository (issue 15): the export's atomic
write into an existing repository, the catalog following the directory, and health while a
new endpoint loads. No network; a fake backend."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import pytest
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.export import repository
from clipserve.server.errors import ServingError
from clipserve.server.health import HealthMonitor, catalog_warmups
from clipserve.server.metrics import ServerMetrics
from clipserve.server.repository import Catalog
from tests.unit.test_health_warmup import GatedBackend
from tests.unit.test_runtime_served import tiny_onnx
from tests.unit.test_server_service import SCALE, write_repository


def snapshot(directory):
    """Every file under ``directory`` -> (inode, mtime_ns, bytes): a rewrite changes it."""
    return {p.relative_to(directory): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def image_sidecar(precision: str) -> Sidecar:
    return Sidecar(scale="s", precision=precision, tower="image", embed_dim=4, source="x",
                   image_size=8)


def test_write_endpoint_adds_to_a_served_repository_without_touching_the_others(tmp_path):
    repo, onnx_path = tmp_path / "repo", tiny_onnx(tmp_path / "t.onnx")
    fp32 = repository.write_endpoint(repo, onnx_path, image_sidecar("fp32"))
    before = snapshot(fp32)
    written = []
    int4 = repository.write_endpoint(repo, onnx_path, image_sidecar("int4"),
                                     finish=lambda d: written.append(d.parent))
    assert snapshot(fp32) == before  # same inodes, times and bytes: not rewritten
    assert sorted(p.name for p in repo.iterdir()) == ["s_fp32_image", "s_int4_image"]
    assert (int4 / "config.pbtxt").is_file() and (int4 / "1" / "model.onnx").is_file()
    # model.py ships compiled (hash-checked), so Triton's stub writes nothing into the model
    # on its first load, which a polling Triton would answer with a reload.
    pyc = importlib.util.cache_from_source(str(int4 / "1" / "model.py"))
    assert Path(pyc).read_bytes()[4:8] == (3).to_bytes(4, "little")  # flags: checked hash
    # Built outside the repository (Triton would take a directory inside it for a model), and
    # nothing is left beside it.
    assert written == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "t.onnx"]


def test_write_endpoint_replaces_by_rename_and_a_failed_write_leaves_the_old_one(tmp_path):
    repo, onnx_path = tmp_path / "repo", tiny_onnx(tmp_path / "t.onnx")
    endpoint = repository.write_endpoint(repo, onnx_path, image_sidecar("int8"))
    before = snapshot(endpoint)

    def fail(directory):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        repository.write_endpoint(repo, onnx_path, image_sidecar("int8"), finish=fail)
    assert snapshot(endpoint) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "t.onnx"]
    repository.write_endpoint(repo, onnx_path, image_sidecar("int8"),
                              finish=lambda d: (d / "extra.txt").write_text("new"))
    assert (endpoint / "extra.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "t.onnx"]


def test_catalog_refresh_follows_the_directory(tmp_path):
    full = write_repository(tmp_path / "full", (Precision.FP32, Precision.INT8, Precision.INT4))
    live = write_repository(tmp_path / "live", (Precision.FP32,))
    catalog = Catalog.from_repository(live)
    fp32 = catalog.by_name(endpoint_name(SCALE, Precision.FP32, Tower.IMAGE))
    assert catalog.refresh() == ([], [])
    for tower in Tower:
        name = endpoint_name(SCALE, Precision.INT4, tower)
        shutil.copytree(full / name, live / name)
    (live / "half_written").mkdir()  # no sidecar: not an endpoint, skipped
    broken = live / endpoint_name(SCALE, Precision.INT8, Tower.IMAGE)
    shutil.copytree(full / broken.name, broken)
    (broken / "config.pbtxt").unlink()  # unreadable: logged, not added, retried later
    added, removed = catalog.refresh()
    assert sorted(s.name for s in added) == sorted(
        endpoint_name(SCALE, Precision.INT4, t) for t in Tower)
    assert removed == [] and catalog.precisions() == [Precision.FP32, Precision.INT4]
    assert catalog.by_name(fp32.name) is fp32  # held endpoints are not re-read
    shutil.copy(full / broken.name / "config.pbtxt", broken)
    assert [s.name for s in catalog.refresh()[0]] == [broken.name]

    for tower in Tower:
        shutil.rmtree(live / endpoint_name(SCALE, Precision.INT4, tower))
    added, removed = catalog.refresh()
    assert added == [] and len(removed) == 2
    with pytest.raises(ServingError) as info:
        catalog.get(SCALE, Precision.INT4, Tower.IMAGE)
    assert info.value.code.name == "NOT_FOUND" and "fp32, int8" in str(info.value)


def test_catalog_refresh_never_empties_the_catalog(tmp_path):
    live = write_repository(tmp_path / "live", (Precision.FP32,))
    catalog = Catalog.from_repository(live)
    for child in live.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
    assert catalog.refresh() == ([], [])
    assert len(catalog) == 2


async def test_an_endpoint_added_while_serving_warms_up_without_leaving_serving(tmp_path):
    full = write_repository(tmp_path / "full", (Precision.FP32, Precision.INT4))
    live = write_repository(tmp_path / "live", (Precision.FP32,))
    catalog = Catalog.from_repository(live)
    backend = GatedBackend({s.name for s in catalog})
    backend.release.set()
    seen = []
    monitor = HealthMonitor(backend, health_aio.HealthServicer(), [],
                            ServerMetrics(CollectorRegistry(), catalog.scales), 0.1,
                            warmups=catalog_warmups(catalog),
                            on_models=lambda models: (seen.append(models), catalog.refresh()))
    assert (await monitor.poll_once()).serving
    new = endpoint_name(SCALE, Precision.INT4, Tower.IMAGE)
    shutil.copytree(full / new, live / new)
    backend.models |= {new}
    backend.release.clear()  # its warm-up is held: not routable yet, and still SERVING ...
    poll = asyncio.create_task(monitor.poll_once())
    while len(backend.calls) < 3:
        await asyncio.sleep(0.01)
    assert seen[-1] == backend.models and catalog.by_name(new) is not None
    backend.release.set()
    state = await poll
    assert state.serving and new in state.ready_models
    # ... and Triton not ready while it loads another (--strict-readiness) changes nothing.
    original = backend.server_ready

    async def loading(timeout_s):
        return False
    backend.server_ready = loading
    assert (await monitor.poll_once()).serving
    backend.server_ready = original
    # An endpoint warmed before that leaves READY while still in the catalog does count.
    backend.models -= {new}
    assert not (await monitor.poll_once()).serving
    # Removed from the repository (and so from the catalog): it no longer counts.
    shutil.rmtree(live / new)
    backend.models |= {"ignored"}  # any change of the set makes the monitor refresh
    assert (await monitor.poll_once()).serving
    assert catalog.by_name(new) is None


def test_repository_poll_setting_is_validated_and_defaults_to_polling():
    from clipserve.server.config import ServerConfig

    assert ServerConfig().triton_repository_poll_s > 0  # a live add works out of the box
    assert ServerConfig(triton_repository_poll_s=0).triton_repository_poll_s == 0
    with pytest.raises(ValueError, match="triton_repository_poll_s"):
        ServerConfig(triton_repository_poll_s=-1)


def test_a_repository_on_its_own_mount_is_staged_inside_and_left_clean(tmp_path, monkeypatch):
    repo, onnx_path = tmp_path / "repo", tiny_onnx(tmp_path / "t.onnx")
    repo.mkdir()
    monkeypatch.setattr(repository, "_staging_parent", lambda path: path.resolve())
    seen = []
    endpoint = repository.write_endpoint(
        repo, onnx_path, image_sidecar("int4"),
        finish=lambda d: seen.append((d.parent, d.name.startswith("."),
                                      (d / "config.pbtxt").exists())))
    # Hidden, and without config.pbtxt until just before the rename (Triton skips it).
    assert seen == [(repo.resolve(), True, False)]
    assert [p.name for p in repo.iterdir()] == [endpoint.name]
