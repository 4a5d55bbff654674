"""Evaluation data as data: image folders, OOD folders, retrieval files, shifted sets and the
built-in digits, loaded with the gateway's own preprocessing."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from clipserve.export import datasets, digits  # noqa: E402
from clipserve.server.images import resize_center_crop  # noqa: E402

_load_digits = functools.lru_cache(maxsize=4)(digits.load)  # each load takes about 0.7 s

FOLDERS = {"c0": "zero", "c1": "one", "c2": "two"}  # folder names that are not label words
PER_CLASS = 10


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _digit_image(index: int, size: tuple[int, int]) -> Image.Image:
    grey = _sklearn_digits().images[index]
    return Image.fromarray(np.clip(grey * 16, 0, 255).astype(np.uint8), "L").resize(
        size, Image.BILINEAR).convert("RGB")


def _write_class_folders(root: Path, folders=FOLDERS, per_class=PER_CLASS) -> None:
    target = _sklearn_digits().target
    for c, folder in enumerate(folders):
        d = root / folder
        d.mkdir(parents=True)
        for j, index in enumerate(np.flatnonzero(target == c)[:per_class]):
            if j % 3 == 2:  # another size and format, upper-case extension
                _digit_image(index, (64, 48)).save(d / f"img{j:02d}.PNG")
            else:
                _digit_image(index, (20, 20)).save(d / f"img{j:02d}.jpg", quality=90)
        (d / ".hidden.jpg").write_bytes(b"not an image")  # hidden: ignored
        (d / "notes.txt").write_text("not an image either")  # other extension: ignored


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "evalset"
    _write_class_folders(root)
    (root / "labels.json").write_text(json.dumps(FOLDERS))
    (root / "templates.txt").write_text(
        "# CLIP_benchmark style and plain style both work\n"
        "a photo of the digit {c}.\n"
        "\n"
        "a drawing of a {}.\n")
    (root / ".cache").mkdir()  # hidden folder: not a class
    return root


def test_labels_templates_and_folder_order(folder):
    ds = datasets.load_image_folder(folder)
    assert ds.name == "evalset"
    assert ds.class_names == ("zero", "one", "two")
    assert ds.folder_names == ("c0", "c1", "c2")
    assert ds.templates == ("a photo of the digit {}.", "a drawing of a {}.")
    assert ds.prompts()[:3] == ["a photo of the digit zero.", "a drawing of a zero.",
                                "a photo of the digit one."]
    assert "labels.json" in ds.source and "templates.txt" in ds.source
    assert len(ds.calibration) + len(ds.test) == 3 * PER_CLASS  # hidden and .txt ignored


def test_defaults_without_labels_or_templates(tmp_path):
    _write_class_folders(tmp_path / "plain", folders={"cat": 0, "dog": 0})
    ds = datasets.load_image_folder(tmp_path / "plain")
    assert ds.class_names == ("cat", "dog")
    assert ds.templates == datasets.DEFAULT_TEMPLATES
    assert all(t.count("{}") == 1 for t in ds.templates)


def test_split_is_stratified_disjoint_and_deterministic(folder):
    a = datasets.load_image_folder(folder, seed=0)
    b = datasets.load_image_folder(folder, seed=0)
    c = datasets.load_image_folder(folder, seed=1)
    assert a.calibration.images.paths == b.calibration.images.paths
    assert a.test.images.paths == b.test.images.paths
    assert a.calibration.images.paths != c.calibration.images.paths
    assert not set(a.calibration.images.paths) & set(a.test.images.paths)
    for split, per_class in ((a.calibration, 3), (a.test, 7)):  # round(0.3 * 10) = 3
        assert np.bincount(split.labels, minlength=3).tolist() == [per_class] * 3
    # Labels follow the folders the files are in.
    for path, label in zip(a.test.images.paths, a.test.labels):
        assert path.parent.name == a.folder_names[label]


def test_a_class_split_does_not_depend_on_other_classes(folder, tmp_path):
    full = datasets.load_image_folder(folder)
    _write_class_folders(tmp_path / "two", folders={"c0": 0, "c1": 1})
    fewer = datasets.load_image_folder(tmp_path / "two")
    names = lambda ds, c: [p.name for p, l in zip(ds.calibration.images.paths, ds.calibration.labels)
                           if l == c]
    assert names(full, 0) == names(fewer, 0) and names(full, 1) == names(fewer, 1)


def test_max_per_class(folder):
    ds = datasets.load_image_folder(folder, max_per_class=4)
    assert np.bincount(ds.calibration.labels).tolist() == [1, 1, 1]
    assert np.bincount(ds.test.labels).tolist() == [3, 3, 3]


def test_pixels_are_the_gateways(folder):
    ds = datasets.load_image_folder(folder)
    for size in (16, 32):
        got = ds.test.images.load(size)
        assert got.shape == (len(ds.test), size, size, 3) and got.dtype == np.uint8
        for i, path in enumerate(ds.test.images.paths):
            with Image.open(path) as img:
                np.testing.assert_array_equal(got[i], resize_center_crop(img, size))
    # Batches and indices give the same pixels.
    batched = np.concatenate(list(ds.test.images.batches(16, batch_size=4)))
    np.testing.assert_array_equal(batched, ds.test.images.load(16))
    np.testing.assert_array_equal(ds.test.images.load(16, indices=[5, 0]), batched[[5, 0]])


def test_progress_reaches_total(folder):
    ds = datasets.load_image_folder(folder)
    calls = []
    list(ds.test.images.batches(16, batch_size=4, progress=lambda d, t: calls.append((d, t))))
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert done[-1] == len(ds.test) and {t for _, t in calls} == {len(ds.test)}
    assert len(calls) == -(-len(ds.test) // 4)


def test_progress_printer_logs_by_tenths():
    lines = []
    progress = datasets.progress_printer("imagenet-val", lines.append, seconds=1e9)
    for done in range(1000, 50001, 1000):
        progress(done, 50000)
    assert lines[0] == "[eval] imagenet-val: 1000/50000 images"
    assert lines[-1] == "[eval] imagenet-val: 50000/50000 images"
    assert 9 <= len(lines) <= 12  # about every 10%, not every call


def _error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_folder_errors(tmp_path, folder):
    _error("does not exist", datasets.load_image_folder, tmp_path / "nope")
    _write_class_folders(tmp_path / "one", folders={"only": 0})
    _error("at least 2", datasets.load_image_folder, tmp_path / "one")
    _write_class_folders(tmp_path / "small", folders={"a": 0, "b": 1}, per_class=1)
    message = _error("too few images", datasets.load_image_folder, tmp_path / "small")
    assert "a (1)" in message and "at least 2" in message
    # An empty class folder is refused, not dropped (dropping it would make the task easier).
    (folder / "c3").mkdir()
    (folder / "labels.json").write_text(json.dumps({**FOLDERS, "c3": "three"}))
    assert "c3 (0)" in _error("too few images", datasets.load_image_folder, folder)


def test_labels_json_must_match_folders(folder):
    (folder / "labels.json").write_text(json.dumps({"c0": "zero", "c1": "one", "c9": "nine"}))
    message = _error("labels.json", datasets.load_image_folder, folder)
    assert "'c2'" in message and "'c9'" in message
    (folder / "labels.json").write_text(json.dumps({"c0": "zero", "c1": "zero", "c2": "two"}))
    _error("more than one folder", datasets.load_image_folder, folder)
    (folder / "labels.json").write_text("{not json")
    _error("not valid JSON", datasets.load_image_folder, folder)


def test_bad_template(folder):
    (folder / "templates.txt").write_text("a photo of a {}.\nno placeholder here\n")
    _error("line 2", datasets.load_image_folder, folder)


def test_unreadable_image_is_named(folder):
    bad = folder / "c1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = datasets.load_image_folder(folder)
    split = ds.test if bad in ds.test.images.paths else ds.calibration
    message = _error("broken.jpg", split.images.load, 16)
    assert str(bad) in message


def test_verify_finds_bad_files_before_loading(folder):
    ds = datasets.load_image_folder(folder)
    ds.test.images.verify()  # all good: no error
    (folder / "c2" / "zz.webp").write_bytes(b"RIFF....WEBPjunk")
    (folder / "c2" / "gif.png").write_bytes(b"GIF89a" + bytes(20))
    ds = datasets.load_image_folder(folder)
    everything = datasets.FileImageSource(ds.calibration.images.paths + ds.test.images.paths, "all")
    message = _error("2 of 32 image files", everything.verify)
    assert "zz.webp" in message and "gif.png" in message


def test_unlabelled_folder_and_ood_arg(tmp_path, folder):
    source = datasets.load_unlabelled_folder(folder, "mixed")
    assert len(source) == 3 * PER_CLASS and source.name == "mixed"  # recursive
    assert source.load(8).shape == (3 * PER_CLASS, 8, 8, 3)
    _error("no image files", datasets.load_unlabelled_folder, folder / ".cache")
    assert datasets.parse_ood_arg("near=/a/b, far=/c") == {"near": Path("/a/b"), "far": Path("/c")}
    assert datasets.parse_ood_arg("/data/sketches/") == {"sketches": Path("/data/sketches/")}
    _error("used twice", datasets.parse_ood_arg, "x=/a,x=/b")
    _error("NAME=DIR", datasets.parse_ood_arg, "=/a")
    assert [datasets.ood_kind(n) for n in ("near", "far-textures", "Near_1", "other")] == [
        "near", "far", "near", "unspecified"]


def test_shift_folder(tmp_path, folder):
    ds = datasets.load_image_folder(folder)
    # Same folder names, no labels.json of its own: matched by the labelled set's folders.
    _write_class_folders(tmp_path / "shift", per_class=3)
    split = datasets.load_shift_folder(tmp_path / "shift", ds.class_names,
                                       folder_names=ds.folder_names)
    assert np.bincount(split.labels).tolist() == [3, 3, 3] and len(split.images) == 9
    # Named by label text.
    _write_class_folders(tmp_path / "bytext", folders={"zero": 0, "two": 2}, per_class=2)
    _error("no images for class", datasets.load_shift_folder, tmp_path / "bytext", ds.class_names)
    sub = datasets.load_shift_folder(tmp_path / "bytext", ds.class_names, allow_subset=True)
    assert sorted(set(sub.labels.tolist())) == [0, 2]
    _write_class_folders(tmp_path / "other", folders={"zero": 0, "seven": 7}, per_class=2)
    message = _error("not classes", datasets.load_shift_folder, tmp_path / "other", ds.class_names)
    assert "seven" in message


def _image_files(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _digit_image(i, (24, 24)).save(root / f"{i}.jpg")
    return [f"{i}.jpg" for i in range(n)]


def test_retrieval_csv_relative_paths_and_repeated_rows(tmp_path):
    files = _image_files(tmp_path / "imgs", 3)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image_path,caption\n"
                        f"imgs/{files[0]},\"a zero, drawn\"\n"
                        f"imgs/{files[1]},a one\n"
                        f"imgs/{files[0]},another zero\n"
                        f"{tmp_path / 'imgs' / files[2]},a two\n")
    rs = datasets.load_retrieval(csv_path)
    assert rs.captions == ["a zero, drawn", "a one", "another zero", "a two"]
    assert rs.caption_image.tolist() == [0, 1, 0, 2]
    assert [p.name for p in rs.images.paths] == files
    assert rs.images.load(16).shape == (3, 16, 16, 3)


def test_retrieval_tsv_open_clip_columns(tmp_path):
    files = _image_files(tmp_path, 2)
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "".join(
        f"{f}\tcaption {i}\n" for i, f in enumerate(files)))
    rs = datasets.load_retrieval(tmp_path / "train.tsv")
    assert rs.captions == ["caption 0", "caption 1"] and rs.caption_image.tolist() == [0, 1]


def test_retrieval_jsonl_caption_lists(tmp_path):
    files = _image_files(tmp_path / "a", 2)
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"image": f"a/{files[1]}", "caption": ["one", "uno"]}) + "\n\n"
        + json.dumps({"image": f"a/{files[0]}", "caption": "zero"}) + "\n")
    rs = datasets.load_retrieval(tmp_path / "pairs.jsonl")
    assert rs.captions == ["one", "uno", "zero"] and rs.caption_image.tolist() == [0, 0, 1]
    assert rs.images.paths[0].name == files[1]


def test_retrieval_json_list_and_bom_csv(tmp_path):
    files = _image_files(tmp_path / "flickr", 2)
    (tmp_path / "test.json").write_text(json.dumps([
        {"image": f"flickr/{files[0]}", "caption": ["a", "b", "c"]},
        {"image": f"flickr/{files[1]}", "caption": ["d"]}]))
    rs = datasets.load_retrieval(tmp_path / "test.json")
    assert rs.captions == ["a", "b", "c", "d"] and rs.caption_image.tolist() == [0, 0, 0, 1]
    (tmp_path / "excel.csv").write_bytes(
        "\ufeffFilepath,Caption\n".encode("utf-8") + f"flickr/{files[1]},x\n".encode())
    assert datasets.load_retrieval(tmp_path / "excel.csv").captions == ["x"]


def test_retrieval_clip_benchmark_flickr_and_coco(tmp_path):
    files = _image_files(tmp_path / "Images", 2)
    # CLIP_benchmark's Flickr file: commas in captions are not quoted; images in another root.
    (tmp_path / "captions.txt").write_text(
        f"image,caption\n{files[0]},A dog, brown, runs .\n{files[0]},A dog .\n{files[1]},Sky\n")
    rs = datasets.load_retrieval(tmp_path / "captions.txt", image_root=tmp_path / "Images")
    assert rs.captions == ["A dog, brown, runs .", "A dog .", "Sky"]
    assert rs.caption_image.tolist() == [0, 0, 1]
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": f"Images/{files[1]}"},
                   {"id": 3, "file_name": f"Images/{files[0]}"}],
        "annotations": [{"image_id": 3, "caption": "zero"}, {"image_id": 7, "caption": "one"},
                        {"image_id": 3, "caption": "nought"}]}))
    rs = datasets.load_retrieval(tmp_path / "coco.json")
    assert [p.name for p in rs.images.paths] == [files[1], files[0]]
    assert rs.captions == ["one", "zero", "nought"] and rs.caption_image.tolist() == [0, 1, 1]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    _error("COCO captions format", datasets.load_retrieval, tmp_path / "bad.json")


def test_retrieval_errors(tmp_path):
    _image_files(tmp_path, 1)
    (tmp_path / "nocap.csv").write_text("filepath,label\n0.jpg,x\n")
    assert "caption" in _error("no caption column", datasets.load_retrieval, tmp_path / "nocap.csv")
    (tmp_path / "missing.csv").write_text("filepath,title\n0.jpg,ok\ngone.jpg,x\n")
    message = _error("line 3", datasets.load_retrieval, tmp_path / "missing.csv")
    assert "gone.jpg" in message
    (tmp_path / "empty.jsonl").write_text(json.dumps({"image": "0.jpg", "caption": " "}) + "\n")
    _error("empty caption", datasets.load_retrieval, tmp_path / "empty.jsonl")
    _error("does not exist", datasets.load_retrieval, tmp_path / "nothing.csv")


def test_recall_at_k_known_answer():
    # Images on the axes (norm 2: cosine is used), so cos(image i, caption j) is
    # text[j, i] / |text[j]|, written out per row.
    image = np.eye(3, dtype=np.float32) * 2.0
    text = np.array([
        [0.5, 1.0, 0.0],  # cos [.447, .894, 0]     caption 0, of image 0
        [0.0, 0.2, 1.0],  # cos [0, .196, .981]     caption 1, of image 1
        [0.5, 0.0, 0.4],  # cos [.781, 0, .625]     caption 2, of image 2
        [0.0, 0.0, 1.0],  # cos [0, 0, 1]           caption 3, of image 2
    ], dtype=np.float32)
    owner = np.array([0, 1, 2, 2])
    hits = datasets.recall_at_k(image, text, owner, ks=(1, 2, 10), chunk=2)
    # Text -> image: caption 0 ranks image 1 first, caption 1 image 2, caption 2 image 0.
    assert hits.text_to_image[1].tolist() == [False, False, False, True]
    assert hits.text_to_image[2].tolist() == [True, True, True, True]
    # Image -> text: image 0's own caption (.447) loses to caption 2 (.781); image 1's (.196)
    # to caption 0 (.894); image 2's best own caption (3, 1.0) is first.
    assert hits.image_to_text[1].tolist() == [False, False, True]
    assert hits.image_to_text[2].tolist() == [True, True, True]
    assert hits.recall() == {
        "image_to_text_R@1": pytest.approx(1 / 3), "image_to_text_R@2": 1.0,
        "image_to_text_R@10": 1.0, "text_to_image_R@1": 0.25, "text_to_image_R@2": 1.0,
        "text_to_image_R@10": 1.0}
    # Chunking does not change the answer.
    whole = datasets.recall_at_k(image, text, owner, ks=(1,), chunk=1000)
    assert whole.image_to_text[1].tolist() == hits.image_to_text[1].tolist()


def test_recall_ties_count_against_and_errors():
    image = np.array([[1.0, 0.0], [1.0, 0.0]])  # identical images: a tie
    text = np.array([[1.0, 0.0], [1.0, 0.0]])
    hits = datasets.recall_at_k(image, text, np.array([0, 1]), ks=(1, 2))
    assert hits.text_to_image[1].tolist() == [False, False]
    assert hits.text_to_image[2].tolist() == [True, True]
    _error("no caption", datasets.recall_at_k, image, text, np.array([0, 0]))
    _error("outside", datasets.recall_at_k, image, text, np.array([0, 2]))


# The split the cached trained checkpoints were trained on (digest of the splits computed with
# export/digits.py before the shifted sets were added); refactoring must not move it. At size 8
# nothing is resampled and only scikit-learn's bundled data goes in, so the digest depends on
# neither Pillow's filters nor its fonts (the OOD letters are left out for that reason).
SPLIT_DIGEST = "23aef56f2006fe72917d58f35ab90dc1ba78de6efd14759bb947b314973a940e"


def test_digits_split_unchanged():
    data = digits.load(8)
    h = hashlib.sha256()
    for part in (data.train, data.calibration, data.test):
        h.update(part.images.tobytes())
        h.update(part.labels.tobytes())
    assert h.hexdigest() == SPLIT_DIGEST


def test_shifted_digits():
    size = 16
    sets = digits.shifted("test", size)
    assert set(sets) == set(digits.SHIFT_NAMES) and len(sets) == 13
    test = _load_digits(size).test
    again = digits.shifted("test", size, names=("noise-2", "rotation-3"))
    for name, split in sets.items():
        assert split.images.shape == test.images.shape and split.images.dtype == np.uint8
        np.testing.assert_array_equal(split.labels, test.labels)
        assert (split.images[..., 0] == split.images[..., 2]).all()  # still grey
    for name in again:  # deterministic, and independent of which others are built
        np.testing.assert_array_equal(again[name].images, sets[name].images)
    clean = test.images.astype(np.float64)
    for kind in digits.SHIFT_SEVERITIES:
        distortion = [np.abs(sets[f"{kind}-{s}"].images - clean).mean() for s in (1, 2, 3)]
        assert 0 < distortion[0] < distortion[1] < distortion[2], (kind, distortion)
    nearest = sets["nearest"].images.astype(np.float64)
    assert np.abs(nearest - clean).mean() > 5  # blocky, not bilinear
    # Nearest-neighbour keeps the 17 grey levels of the source; bilinear blends them.
    assert len(np.unique(sets["nearest"].images)) <= 17 < len(np.unique(test.images))
    with pytest.raises(ValueError, match="test split only"):
        digits.shifted("calibration", size)


def test_builtin_suite_matches_digits_load():
    suite = datasets.builtin_digits_suite()
    assert suite.builtin and suite.domain_measured and suite.retrieval is None
    ds = suite.labelled
    assert ds.class_names == digits.CLASS_NAMES and ds.templates == digits.PROMPTS
    data = _load_digits(16)
    np.testing.assert_array_equal(ds.test.images.load(16), data.test.images)
    np.testing.assert_array_equal(ds.calibration.images.load(16), data.calibration.images)
    np.testing.assert_array_equal(ds.test.labels, data.test.labels)
    np.testing.assert_array_equal(ds.calibration.labels, data.calibration.labels)
    np.testing.assert_array_equal(suite.ood["letters"].images.load(16), data.ood_near)
    np.testing.assert_array_equal(suite.ood["noise"].images.load(16), data.ood_far)
    # The same suite serves a model of another input size.
    assert ds.test.images.load(12, indices=[0, 1]).shape == (2, 12, 12, 3)
    assert {n: o.kind for n, o in suite.ood.items()} == {"letters": "near", "noise": "far"}
    assert set(suite.shift) == set(digits.SHIFT_NAMES)
    blur = suite.shift["blur-2"]
    np.testing.assert_array_equal(blur.labels, ds.test.labels)
    np.testing.assert_array_equal(blur.images.load(16, indices=[3]),
                                  digits.shifted("test", 16, names=("blur-2",))["blur-2"].images[[3]])


def test_array_source_resizes_the_gateways_way():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    source = datasets.ArrayImageSource(images, "arrays")
    np.testing.assert_array_equal(source.load(20, indices=[1]), source.subset([1]).load(20)[:, :, :, :])
    got = source.load(16)
    for i in range(3):
        np.testing.assert_array_equal(got[i], resize_center_crop(Image.fromarray(images[i]), 16))
    with pytest.raises(ValueError, match="uint8"):
        datasets.ArrayImageSource(images.astype(np.float32), "bad")


def test_from_paths(tmp_path, folder):
    _write_class_folders(tmp_path / "sketch", per_class=2)
    (tmp_path / "far").mkdir()
    _digit_image(0, (30, 30)).rotate(90).save(tmp_path / "far" / "x.webp")
    files = _image_files(tmp_path / "ret", 2)
    (tmp_path / "ret" / "pairs.csv").write_text("filepath,text\n" + "".join(
        f"{f},caption {f}\n" for f in files))
    suite = datasets.EvalSuite.from_paths(
        folder, ood_data=f"far={tmp_path / 'far'}", retrieval_data=tmp_path / "ret" / "pairs.csv",
        shift_data=str(tmp_path / "sketch"))
    assert not suite.builtin and suite.labelled.class_names == ("zero", "one", "two")
    assert list(suite.ood) == ["far"] and suite.ood["far"].kind == "far"
    assert len(suite.ood["far"].images) == 1
    assert list(suite.shift) == ["sketch"] and len(suite.shift["sketch"]) == 6
    assert suite.retrieval.captions == [f"caption {f}" for f in files]
    assert len(suite.file_sources()) == 5
    suite.domain_measured = False
    notes = suite.describe()
    assert len(notes) == 4 and "NOT the measured model's domain" in notes[0]
    assert notes[1] == "OOD far (far): 1 images" and notes[2] == "Shift sketch: 6 images"
    # Nothing given: the built-in digits with their OOD and shifted sets.
    default = datasets.EvalSuite.from_paths()
    assert default.builtin and set(default.ood) == {"letters", "noise"}
    assert len(default.shift) == len(digits.SHIFT_NAMES)
