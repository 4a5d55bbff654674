"""Model families: the scoring rule a model was trained with, unsupported families refused
by name, and a missing Hugging Face tokenizer failing at once with the files and the flag to
supply them, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

open_clip = pytest.importorskip("open_clip")

from clipserve.export import families  # noqa: E402


def test_native_scoring_follows_the_logit_bias():
    import torch

    from clipserve.export import train

    train.register_builtin_configs()
    torch.manual_seed(0)
    siglip = open_clip.create_model("digits-siglip-s")
    rule = families.native_scoring(siglip)
    assert rule.rule == "sigmoid"
    assert rule.scale == pytest.approx(10.0) and rule.bias == pytest.approx(-2.2)
    clip = open_clip.create_model("digits-s")
    rule = families.native_scoring(clip)
    assert rule.rule == "softmax" and rule.temperature == pytest.approx(0.07)


@pytest.mark.parametrize("name", ["xlm-roberta-base-ViT-B-32", "nllb-clip-base-siglip"])
def test_transformers_text_towers_are_refused_by_name(name):
    with pytest.raises(families.FamilyError, match=f"{name}: its text tower is the Hugging "
                                                   "Face transformers model"):
        families.preflight([name])


def test_missing_tokenizer_names_files_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(families.FamilyError) as info:
        families.preflight(["ViT-B-16-SigLIP"])
    message = str(info.value)
    assert "timm/ViT-B-16-SigLIP" in message and "tokenizer.json" in message
    assert "--tokenizer DIR" in message and str(tmp_path / "hub") in message
    with pytest.raises(families.FamilyError, match=f"--tokenizer {tmp_path}"):
        families.preflight(["ViT-B-16-SigLIP2"], str(tmp_path))


def test_export_cli_fails_at_once_without_a_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), CLIPSERVE_CACHE_DIR=str(
        tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "export", "--models", "ViT-B-16-SigLIP::none",
         "--repository", str(tmp_path / "repo")], capture_output=True, text=True, env=env,
        timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "tokenizer.json" in proc.stderr and "--tokenizer DIR" in proc.stderr
    assert not (tmp_path / "cache" / "work").exists()  # nothing was exported first
