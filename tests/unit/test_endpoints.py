import json

import pytest

from clipserve.endpoints import (Precision, Sidecar, Tower, endpoint_name, parse_endpoint_name,
                                 scale_name)


def test_endpoint_names_round_trip():
    for precision in Precision:
        for tower in Tower:
            name = endpoint_name("ViT-B-32", precision, tower)
            assert parse_endpoint_name(name) == ("ViT-B-32", precision, tower)
    assert endpoint_name("digits-s", "int8", "image") == "digits-s_int8_image"


def test_scale_with_underscore_is_rejected_and_scale_name_fixes_it():
    with pytest.raises(ValueError, match="may only contain"):
        endpoint_name("my_model", Precision.FP32, Tower.IMAGE)
    assert scale_name("ViT-B-32_quickgelu") == "ViT-B-32-quickgelu"
    endpoint_name(scale_name("hf-hub:org/model"), Precision.FP32, Tower.TEXT)


def test_unknown_precision_lists_valid_ones():
    with pytest.raises(ValueError, match="fp32, fp16, int8, int4, bf16"):
        Precision.parse("fp8")
    assert Precision.parse(" INT4 ") is Precision.INT4
    assert Precision.parse("BF16") is Precision.BF16


def test_parse_rejects_foreign_names():
    with pytest.raises(ValueError):
        parse_endpoint_name("resnet50")
    with pytest.raises(ValueError):
        parse_endpoint_name("digits-s_int3_image")


def test_sidecar_round_trip_and_version_check(tmp_path):
    sidecar = Sidecar(scale="digits-s", precision="int8", tower="image", embed_dim=64,
                      source="digits-s::builtin", image_size=32, temperature=0.06,
                      ood_threshold=0.6, labels=["zero"], prompts=["a {}"])
    sidecar.write(tmp_path)
    assert Sidecar.read(tmp_path) == sidecar
    data = json.loads((tmp_path / "clipserve.json").read_text())
    data["version"] = 99
    (tmp_path / "clipserve.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        Sidecar.read(tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        Sidecar.read(tmp_path / "missing")
