"""Shared test settings: one cache folder for trained checkpoints and exported repositories
(``CLIPSERVE_TEST_CACHE``, default ``<repo>/.cache``, git-ignored), so a second run reuses the
trained default model instead of training it again."""

import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source_digest(*folders: str) -> str:
    """Hash of the Python/JSON sources under ``folders``: a cached artifact built from them is
    reused only while they are unchanged."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    path = Path(os.environ.get("CLIPSERVE_TEST_CACHE", ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
