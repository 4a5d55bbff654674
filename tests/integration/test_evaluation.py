"""Evaluation on the user's own data: a labelled folder written here (digit JPEGs at another
size, folder names that are not label words, a labels.json and templates.txt) drives the export
and `clipserve evaluate`; the sidecars carry that set's labels and prompts; top-1 agrees with
the built-in path's within the sampling error of the two test sets."""

import json
import math
import shutil

import pytest
from PIL import Image

from clipserve.endpoints import Sidecar
from clipserve.export import digits
from clipserve.export.report import read_rows

FOLDER_SIZE = 48  # not the model's 32: the gateway's resize + crop runs on these files
NAMES = {f"class_{i:02d}": name for i, name in enumerate(digits.CLASS_NAMES)}


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """The held-out digits (never trained on) as JPEG files in an ImageFolder."""
    root = tmp_path_factory.mktemp("digit-folder")
    data = digits.load(FOLDER_SIZE)
    images = [*data.calibration.images, *data.test.images]
    labels = [*data.calibration.labels, *data.test.labels]
    folders = list(NAMES)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / folders[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=95)
    (root / "labels.json").write_text(json.dumps(NAMES))
    (root / "templates.txt").write_text("\n".join(digits.PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def folder_export(digit_folder, cache_dir, tmp_path_factory):
    from clipserve.export.config import ExportConfig
    from clipserve.export.pipeline import export

    repo = tmp_path_factory.mktemp("folder-repo")
    export(ExportConfig(models="digits-s", precisions=("fp32", "int8"), repository=str(repo),
                        cache_dir=str(cache_dir), throughput_seconds=0.1,
                        eval_data=str(digit_folder), bootstrap=1000), log=lambda m: None)
    return repo


def image_row(rows, precision):
    return next(r for r in rows if (r["precision"], r["tower"]) == (precision, "image"))


def agree(a: dict, b: dict) -> bool:
    """Two top-1 estimates on independent test sets agree when their difference is inside the
    95% interval of a difference of two proportions."""
    pa, na, pb, nb = a["top1"], a["n_test"], b["top1"], b["n_test"]
    half = 1.96 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    return abs(pa - pb) <= half


def test_export_on_a_labelled_folder_fits_its_labels_and_prompts(folder_export, repository):
    rows = read_rows(folder_export / "report.json")
    fp32 = image_row(rows, "fp32")
    assert fp32["domain_measured"] is True and "labels.json" in fp32["data"]
    assert fp32["n_test"] + fp32["n_calibration"] == 538
    assert not fp32.get("shift_by_set")  # a folder brings no generated shift sets
    builtin = image_row(read_rows(repository / "report.json"), "fp32")
    assert agree(fp32, builtin), (fp32["top1"], builtin["top1"])
    for precision in ("fp32", "int8"):
        car = Sidecar.read(folder_export / f"digits-s_{precision}_image")
        assert car.labels == list(NAMES.values()) and car.prompts == list(digits.PROMPTS)
        assert car.temperature == image_row(rows, precision)["temperature"]
        assert car.evaluation["n_calibration"] == fp32["n_calibration"]
    assert image_row(rows, "int8")["verdict"]["verdict"] in ("safe", "unsafe", "inconclusive")
    md = (folder_export / "report.md").read_text()
    assert md.startswith("# clipserve export report\n\n## Verdict per endpoint")


def test_evaluate_refits_sidecars_as_a_new_revision(digit_folder, repository, tmp_path):
    from clipserve.export.config import EvaluateConfig
    from clipserve.export.reevaluate import evaluate_repository
    from clipserve.server.repository import Catalog

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    catalog = Catalog.from_repository(repo)
    before = Sidecar.read(repo / "digits-s_int4_image")
    rows = evaluate_repository(EvaluateConfig(repository=str(repo), eval_data=str(digit_folder),
                                              bootstrap=1000, write_sidecars=True),
                               log=lambda m: None)
    assert {r["precision"] for r in rows} == {"fp32", "fp16", "int8", "int4"}
    assert (repo / "evaluation.md").is_file() and (repo / "evaluation.png").is_file()
    after = Sidecar.read(repo / "digits-s_int4_image")
    assert after.revision == before.revision + 1
    assert Sidecar.read(repo / "digits-s_int4_image") != before
    assert (repo / f"digits-s_int4_image/clipserve.r{before.revision}.json").is_file()
    assert after.labels == list(NAMES.values())  # the folder's label text, not its folder names
    assert after.evaluation["fitted_by"] == "clipserve evaluate"
    assert after.temperature == image_row(rows, "int4")["temperature"]
    # A running gateway's catalog picks the new revision up on reload (SIGHUP).
    changed = catalog.reload_sidecars()
    assert "digits-s_int4_image" in changed and "digits-s_int4_text" not in changed
    assert catalog.by_name("digits-s_int4_image").sidecar.revision == after.revision
    assert catalog.reload_sidecars() == []


def test_evaluate_names_what_is_missing(repository, tmp_path):
    from clipserve.export.config import EvaluateConfig
    from clipserve.export.reevaluate import evaluate_repository

    with pytest.raises(ValueError, match="scale 'ViT-B-32' is not in the repository"):
        evaluate_repository(EvaluateConfig(repository=str(repository), scales=("ViT-B-32",)))
    # A model that is not a built-in digits model has no domain data without --eval-data:
    # nothing is measured or written before the refusal.
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    for car_path in repo.glob("*/clipserve.json"):
        car = json.loads(car_path.read_text())
        car_path.write_text(json.dumps(dict(car, source="digits-s::/elsewhere/ckpt.pt")))
    with pytest.raises(ValueError, match="not a built-in digits model: --write-sidecars fits"):
        evaluate_repository(EvaluateConfig(repository=str(repo), write_sidecars=True),
                            log=lambda m: None)
    assert not (repo / "evaluation.md").exists()
    assert Sidecar.read(repo / "digits-s_fp32_image").revision == 1
