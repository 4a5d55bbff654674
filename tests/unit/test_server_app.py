"""Start-up decisions of the gateway that need no socket: default scale and routing."""

from __future__ import annotations

import pytest

from clipserve.endpoints import Precision, Tower
from clipserve.server.app import SERVICE_NAMES, default_policy, resolve_default_scale
from clipserve.server.config import ServerConfig
from clipserve.server.repository import Catalog, read_endpoint

from tests.unit.test_server_service import write_repository


def catalog_of(tmp_path, precisions=(Precision.FP32, Precision.INT8), text_precisions=None):
    return Catalog.from_repository(write_repository(tmp_path / "r", precisions, text_precisions))


def test_single_scale_is_the_default(tmp_path):
    catalog = catalog_of(tmp_path)
    assert resolve_default_scale(ServerConfig(), catalog) == "tiny"
    assert resolve_default_scale(ServerConfig(default_scale="tiny"), catalog) == "tiny"
    with pytest.raises(ValueError, match="not in the repository"):
        resolve_default_scale(ServerConfig(default_scale="big"), catalog)


def test_default_policy_prefers_the_most_precise_complete_pair(tmp_path):
    catalog = catalog_of(tmp_path, (Precision.FP32, Precision.INT8), (Precision.INT8,))
    assert default_policy(catalog, "tiny").shares() == {("tiny", Precision.INT8): 1.0}


def test_catalog_reads_sidecars_and_batch_limits(tmp_path):
    catalog = catalog_of(tmp_path)
    assert len(catalog) == 4 and catalog.scales == ("tiny",)
    spec = catalog.get("tiny", Precision.INT8, Tower.TEXT)
    assert spec.max_batch_size == 3 and spec.input_name == "input_ids"
    assert spec.tokenizer_path.name == "tokenizer.json"


def test_inconsistent_endpoint_directory_is_rejected(tmp_path):
    catalog = catalog_of(tmp_path)
    spec = catalog.get("tiny", Precision.FP32, Tower.IMAGE)
    renamed = spec.directory.rename(spec.directory.with_name("tiny_fp16_image"))
    with pytest.raises(ValueError, match="sidecar describes tiny_fp32_image"):
        read_endpoint(renamed)


def test_empty_repository_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no clipserve endpoint"):
        Catalog.from_repository(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a directory"):
        Catalog.from_repository(tmp_path / "absent")


def test_service_names_come_from_the_descriptors():
    assert SERVICE_NAMES == ("clipserve.v1.EmbeddingService",
                             "clipserve.v1.ClassificationService", "clipserve.v1.ModelService",
                             "clipserve.v1.FeedbackService")


def test_several_scales_without_a_default_pick_the_largest(tmp_path, caplog):
    import shutil

    from clipserve.endpoints import Sidecar

    root = write_repository(tmp_path / "r", (Precision.FP32,))
    # A second, larger scale: the same endpoints renamed, with a wider embedding.
    for d in list(root.iterdir()):
        if d.is_dir():
            big = root / d.name.replace("tiny", "big")
            shutil.copytree(d, big)
            car = Sidecar.read(big)
            car.scale, car.embed_dim = "big", car.embed_dim * 2
            car.write(big)
            (big / "config.pbtxt").write_text(
                (big / "config.pbtxt").read_text().replace("tiny", "big"))
    catalog = Catalog.from_repository(root)
    assert set(catalog.scales) == {"tiny", "big"}
    with caplog.at_level("INFO"):
        assert resolve_default_scale(ServerConfig(), catalog) == "big"
    assert "holds scales" in caplog.text and "x-clip-scale" in caplog.text
    assert resolve_default_scale(ServerConfig(default_scale="tiny"), catalog) == "tiny"
