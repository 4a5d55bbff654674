"""The support matrix's rows (README, "Model families"): a small random-init model of each
open_clip family exports at fp32 with parity to PyTorch on both towers, tokenized by the
tokenizer the export picks for it and scored by its rule. Real checkpoints are these
architectures at full size; their configs are copied here with small widths (the timm
vision towers keep SigLIP's attention-pool head, the text towers SigLIP's last-token pooling
without a causal mask), and their Hugging Face tokenizer is stood in for by a local tokenizer
folder (no hub here), which exercises the same --tokenizer DIR path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

from clipserve import calibration as cal  # noqa: E402
from clipserve.endpoints import Tower  # noqa: E402
from clipserve.export import evaluate, families  # noqa: E402
from clipserve.export import onnx_export as ox  # noqa: E402
from clipserve.tokenizer import load_tokenizer  # noqa: E402

TEXT = {"context_length": 16, "vocab_size": 256, "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 64, "heads": 2, "layers": 2, "no_causal_mask": True, "proj_bias": True,
        "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
VISION = {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
          "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}
CONFIGS = {
    # ViT-B-16-SigLIP's layout (timm ViT with MAP head, sentencepiece tokenizer), small.
    "test-tiny-siglip": {"embed_dim": 192, "init_logit_bias": -10, "custom_text": True,
                         "vision_cfg": VISION,
                         "text_cfg": {**TEXT, "hf_tokenizer_name": "test/tiny-siglip"}},
    # ViT-B-16-SigLIP2's: the same plus tanh GELU (its tokenizer is Gemma's).
    "test-tiny-siglip2": {"embed_dim": 192, "init_logit_bias": -10, "custom_text": True,
                          "vision_cfg": VISION,
                          "text_cfg": {**TEXT, "hf_tokenizer_name": "test/tiny-siglip2",
                                       "act_kwargs": {"approximate": "tanh"}}},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A Hugging Face tokenizer folder: tokenizer.json and tokenizer_config.json."""
    d = tmp_path_factory.mktemp("hf-tokenizer")
    shutil.copyfile(families.DIGITS_TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    return d


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    for name, cfg in CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return d


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_siglip_family_exports_at_fp32_with_its_tokenizer_and_rule(
        registered, tokenizer_dir, tmp_path, name):
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    assert families.family_of(name) == "siglip"
    rule = families.native_scoring(model)
    assert rule.rule == "sigmoid" and rule.bias == pytest.approx(-10.0)
    families.preflight([name], str(tokenizer_dir))
    tokenizer = families.text_tokenizer(name, 16, tmp_path / "tok", str(tokenizer_dir))
    assert tokenizer.sidecar["kind"] == "hf" and tokenizer.sidecar["clean"] == "canonicalize"
    shapes = ox.tower_shapes(model)
    assert shapes.vocab_size == 256
    texts = ["a photo of the digit seven.", "zero", "a handwritten nine " * 8]
    gateway_ids, _ = load_tokenizer(tokenizer.json_path, 16, tokenizer.sidecar).encode(texts)
    np.testing.assert_array_equal(gateway_ids, tokenizer(texts))
    # SigLIP2's vision tower is SigLIP's (the same timm config): only its text tower differs.
    for tower in (Tower.TEXT,) if name.endswith("siglip2") else Tower:
        path = ox.export_tower(model, tower, shapes, tmp_path / f"{tower.value}.onnx")
        assert ox.check_parity(model, tower, shapes, path) >= ox.PARITY_MIN_COSINE
    session = evaluate.make_session(tmp_path / "text.onnx")
    got = evaluate.embed(session, gateway_ids)
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(gateway_ids).long(), normalize=True).numpy()
    assert cal.cosine_rows(got, want).min() >= ox.PARITY_MIN_COSINE
