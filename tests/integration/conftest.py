"""Session fixtures for integration tests: a model repository exported by the real export
stage (digits-s at every precision, cached by a hash of the sources that produce it) and a
real tritonserver serving it on 127.0.0.1."""

import shutil
from pathlib import Path

import pytest

from tests.conftest import source_digest

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def cached_export(cache_dir: Path, name: str, **config) -> Path:
    """``clipserve export`` with ``config`` into ``cache_dir/<name>-<digest of the export
    code>``, reused while that code is unchanged; built under ``.partial`` and renamed, so a
    killed run leaves no half-written repository behind."""
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export

    path = cache_dir / f"{name}-{source_digest('export', 'clipserve')}"
    if not (path / "report.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        building = path.with_name(path.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        export(ExportConfig(repository=str(building), cache_dir=str(cache_dir),
                            throughput_seconds=0.3, **config))
        building.rename(path)
    return path


@pytest.fixture(scope="session")
def repository(cache_dir) -> Path:
    """An exported repository: digits-s x fp32/fp16/int8/int4 x image/text."""
    return cached_export(cache_dir, "test-repository", models="digits-s", precisions=PRECISIONS)


@pytest.fixture(scope="session")
def triton(repository, tmp_path_factory):
    """A started tritonserver over ``repository``; stopped at the end of the session."""
    from clipserve.server.triton_process import TritonProcess

    process = TritonProcess(repository, log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    process.start(timeout_s=300)
    yield process
    process.stop()
