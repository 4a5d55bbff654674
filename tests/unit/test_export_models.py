import pytest

from clipserve.export import models, train
from clipserve.export.config import ExportConfig


def test_builtin_models_need_no_weights():
    spec = models.parse_model("digits-m")
    assert spec == models.ModelSpec("digits-m", "builtin") and spec.scale == "digits-m"
    assert set(train.BUILTIN_MODELS) == {"digits-s", "digits-m", "digits-l", "digits-siglip-s"}


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(models.ModelSpecError) as err:
        models.parse_model("ViT-Q-99")
    assert "ViT-B-32" in str(err.value) and "digits-s" in str(err.value)


def test_open_clip_architecture_without_weights_says_how_to_give_them():
    with pytest.raises(models.ModelSpecError, match=r"ViT-B-32::none") as err:
        models.parse_model("ViT-B-32")
    assert "openai" in str(err.value)  # a real pretrained tag is offered


def test_weights_on_a_builtin_are_refused():
    with pytest.raises(models.ModelSpecError, match="built-in"):
        models.parse_model("digits-s::openai")


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(models.ModelSpecError, match="does not exist"):
        models.load(models.parse_model(f"RN50::{tmp_path}/nope.pt"), tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(models.ModelSpecError, match="cannot load checkpoint"):
        models.load(models.parse_model(f"RN50::{garbage}"), tmp_path)


def test_models_file(tmp_path):
    path = tmp_path / "scales.txt"
    path.write_text("# scales to compare\ndigits-s\n\nViT-B-32::none  # random init\n")
    config = ExportConfig(models_file=str(path))
    assert [s.source for s in config.model_specs()] == ["digits-s::builtin", "ViT-B-32::none"]


def test_config_rejects_bad_precision_backend_and_block_size():
    with pytest.raises(ValueError, match="valid precisions"):
        ExportConfig(precisions=("fp8",))
    with pytest.raises(ValueError, match="backend"):
        ExportConfig(backend="tensorflow")
    with pytest.raises(ValueError, match="power of two"):
        ExportConfig(int4_block_size=24)
    with pytest.raises(ValueError, match="add --backend onnxruntime"):
        ExportConfig(tensorrt=True)
    assert ExportConfig(backend="onnxruntime", tensorrt=True).tensorrt
