"""What the export measures quality on, as data: labelled image folders, unlabelled OOD
folders, image-caption retrieval files, covariate-shift folders, and the built-in digits in
the same types.

Images load lazily (a folder can hold 50k photos) through :class:`ImageSource`. Files are
decoded and preprocessed by the gateway's own function (``clipserve.server.images.preprocess``:
shortest side to S bicubic, centre crop, RGB), so the pixels measured here are the pixels a
request would be served on.

Conventions follow LAION's CLIP_benchmark where it has one: class folders in the torchvision
ImageFolder layout (classes in sorted folder order), prompt templates with a ``{c}`` (or
``{}``) placeholder, retrieval CSVs with open_clip's ``filepath``/``title`` columns.

Calibration vs test: every labelled set is split in two. The calibration split feeds static
INT8 calibration and the fitting of the temperature and the OOD threshold and is never
reported; the test split is what the report shows.
"""

from __future__ import annotations

import csv
import json
import os
import time
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from clipserve.export import digits
from clipserve.server.errors import ServingError
from clipserve.server.images import SUPPORTED_FORMATS, preprocess, resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # the formats the gateway decodes
LABELS_FILE = "labels.json"
TEMPLATES_FILE = "templates.txt"
# The 7 templates OpenAI's "Prompt Engineering for ImageNet" notebook (CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb) found to do about as well as all 80
# ImageNet templates together; a reasonable default for photos of objects.
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
DEFAULT_CALIBRATION_FRACTION = 0.3
# Retrieval column names accepted, in order of preference (open_clip/CLIP_benchmark use
# filepath/title).
IMAGE_COLUMNS = ("filepath", "image", "image_path", "img", "file_name", "path")
CAPTION_COLUMNS = ("title", "caption", "captions", "text", "sentence", "query")
OOD_KINDS = ("near", "far", "unspecified")
# Pillow refuses past twice its own bomb limit anyway; this bounds the resized image too.
_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

Progress = Callable[[int, int], None]


def progress_printer(name: str, log: Callable[[str], None] = print, *,
                     fraction: float = 0.1, seconds: float = 5.0) -> Progress:
    """A ``progress(done, total)`` callback that logs "[eval] NAME: done/total images" each
    time another ``fraction`` of the total is done or ``seconds`` have passed, and at the end.

    Args:
        name: what is being loaded ("imagenet-val").
        log: where lines go.
        fraction: log every this share of the total.
        seconds: and at least this often.
    """
    state = {"next": 0.0, "time": time.monotonic()}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or done >= state["next"] * total or now - state["time"] >= seconds:
            log(f"[eval] {name}: {done}/{total} images")
            state["time"] = now
            state["next"] = (int(done / max(total, 1) / fraction) + 1) * fraction
    return progress


class ImageSource(ABC):
    """A sequence of images, produced on demand as uint8 RGB [b, S, S, 3] at any size S.

    Attributes:
        name: how messages and progress lines name it.
    """

    name: str

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _load(self, image_size: int, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices`` -> uint8 [len(indices), S, S, 3]."""

    @abstractmethod
    def subset(self, indices: Sequence[int]) -> "ImageSource":
        """The images at ``indices`` (in that order), as a source of the same kind."""

    def batches(self, image_size: int, batch_size: int = 32,
                progress: Progress | None = None) -> Iterator[np.ndarray]:
        """Yield the images in order, ``batch_size`` at a time (the last may be smaller).

        Args:
            image_size: the model's input side S.
            batch_size: images per yielded array.
            progress: called as ``progress(done, total)`` after each batch.

        Raises:
            ValueError: an image cannot be read (the message names it).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        image_size = int(image_size)
        total = len(self)
        for start in range(0, total, batch_size):
            idx = np.arange(start, min(start + batch_size, total))
            batch = self._load(image_size, idx)
            if progress is not None:
                progress(int(idx[-1]) + 1, total)
            yield batch

    def load(self, image_size: int, indices: Sequence[int] | None = None,
             progress: Progress | None = None) -> np.ndarray:
        """All images (or those at ``indices``) as one uint8 [n, S, S, 3] array.

        Raises:
            ValueError: an image cannot be read (the message names it), or an index is out
                of range.
        """
        if indices is None:
            parts = list(self.batches(image_size, progress=progress))
            if not parts:
                return np.zeros((0, image_size, image_size, 3), np.uint8)
            return np.concatenate(parts)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"{self.name}: index out of range for {len(self)} images")
        return self.subset(idx).load(image_size, progress=progress)


class FileImageSource(ImageSource):
    """Image files, decoded and preprocessed exactly as the gateway does.

    Args:
        paths: the files, in order.
        name: how messages name this source.
        workers: decoding threads (Pillow releases the GIL while decoding and resizing).
    """

    def __init__(self, paths: Sequence[os.PathLike | str], name: str, workers: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.name = name
        self.workers = workers or min(8, os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FileImageSource({self.name!r}, {len(self)} files)"

    def subset(self, indices: Sequence[int]) -> "FileImageSource":
        return FileImageSource([self.paths[int(i)] for i in indices], self.name, self.workers)

    def verify(self, progress: Progress | None = None) -> None:
        """Check every file's header without decoding its pixels, so a bad file is found before a long calibration rather than in the middle of it. A file
        whose data is cut off after the header is still only found when it is loaded.

        Raises:
            ValueError: naming up to 10 files that are missing, not JPEG/PNG/WebP, or
                unreadable, and how many there are.
        """
        bad = []
        for i, path in enumerate(self.paths, 1):
            try:
                with Image.open(path, formats=SUPPORTED_FORMATS) as img:
                    img.verify()  # header/structure only (PNG checks chunk CRCs)
            except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
                bad.append(f"{path} ({type(exc).__name__}: {exc})")
            if progress is not None and (i % 256 == 0 or i == len(self.paths)):
                progress(i, len(self.paths))
        if bad:
            raise ValueError(f"{self.name}: {len(bad)} of {len(self.paths)} image files cannot "
                             f"be read (fix or remove them): {'; '.join(bad[:10])}"
                             + (" ..." if len(bad) > 10 else ""))

    def _load(self, image_size: int, indices: np.ndarray) -> np.ndarray:
        paths = [self.paths[int(i)] for i in indices]
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                images = list(pool.map(lambda p: load_image_file(p, image_size), paths))
        else:
            images = [load_image_file(p, image_size) for p in paths]
        if not images:
            return np.zeros((0, image_size, image_size, 3), np.uint8)
        return np.stack(images)


def load_image_file(path: os.PathLike | str, image_size: int) -> np.ndarray:
    """One image file -> uint8 [S, S, 3], through the gateway's preprocessing.

    Raises:
        ValueError: the file is missing, not JPEG/PNG/WebP, or corrupt (message names it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    try:
        return preprocess(data, image_size, max_bytes=max(len(data), 1), max_pixels=_MAX_PIXELS,
                          what=f"image file {path}")
    except ServingError as exc:
        raise ValueError(f"{exc.message} (fix or remove the file)") from None


class ArrayImageSource(ImageSource):
    """In-memory uint8 images [n, H, W, 3]; asked for another size, each is resized the
    gateway's way (:func:`clipserve.server.images.resize_center_crop`).

    Raises:
        ValueError: ``images`` is not uint8 [n, H, W, 3].
    """

    def __init__(self, images: np.ndarray, name: str):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name}: images must be uint8 [n, H, W, 3], got "
                             f"{images.dtype} {images.shape}")
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"ArrayImageSource({self.name!r}, {self.images.shape})"

    def subset(self, indices: Sequence[int]) -> "ArrayImageSource":
        return ArrayImageSource(self.images[np.asarray(indices, dtype=np.int64)], self.name)

    def _load(self, image_size: int, indices: np.ndarray) -> np.ndarray:
        chosen = self.images[indices]
        if chosen.shape[1:3] == (image_size, image_size):
            return chosen.copy()
        out = np.empty((len(chosen), image_size, image_size, 3), np.uint8)
        for i, img in enumerate(chosen):
            out[i] = resize_center_crop(Image.fromarray(img, "RGB"), image_size)
        return out


class RenderedImageSource(ImageSource):
    """Images generated at whatever size is asked (the built-in digits are drawn from 8x8
    sources at the model's size rather than resized twice).

    Args:
        name: how messages name it.
        length: how many images ``render`` returns.
        render: ``render(image_size)`` -> uint8 [length, S, S, 3]; should be cached by the
            caller if it is expensive.
        indices: a subset of the rendered images (default all).
    """

    def __init__(self, name: str, length: int, render: Callable[[int], np.ndarray],
                 indices: np.ndarray | None = None):
        self.name, self.render = name, render
        self.indices = np.arange(length) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"RenderedImageSource({self.name!r}, {len(self)} images)"

    def subset(self, indices: Sequence[int]) -> "RenderedImageSource":
        return RenderedImageSource(self.name, 0, self.render,
                                   self.indices[np.asarray(indices, dtype=np.int64)])

    def _load(self, image_size: int, indices: np.ndarray) -> np.ndarray:
        return self.render(image_size)[self.indices[indices]]


@dataclass(frozen=True)
class EvalSplit:
    """Images with integer labels (indices into the set's class names)."""

    images: ImageSource
    labels: np.ndarray  # int64 [n]

    def __post_init__(self):
        if len(self.labels) != len(self.images):
            raise ValueError(f"{self.images.name}: {len(self.images)} images but "
                             f"{len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_digits(cls, split: digits.Split, name: str) -> "EvalSplit":
        """Wrap a :class:`digits.Split` (arrays already at model size)."""
        return cls(ArrayImageSource(split.images, name), np.asarray(split.labels, np.int64))


@dataclass(frozen=True)
class LabelledSet:
    """A zero-shot classification set.

    Attributes:
        name: short name for logs and the report.
        class_names: label text per class index, as it goes into the prompts.
        templates: prompt templates, each with one "{}" for the label.
        calibration: fits static INT8 calibration, the temperature and the OOD threshold;
            never reported.
        test: what the report shows.
        source: where it came from and how it was split, for the report.
        folder_names: the class folder per class index (None for built-in sets).
    """

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    calibration: EvalSplit
    test: EvalSplit
    source: str
    folder_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.calibration) + len(self.test)

    def prompts(self) -> list[str]:
        """Every template for every class, class-major: ``prompts()[c * len(templates) + t]``
        (the order ``evaluate.class_embeddings`` averages over)."""
        return [t.format(c) for c in self.class_names for t in self.templates]


class OodSet(NamedTuple):
    """Unlabelled out-of-distribution images and how far out they are meant to be."""

    images: ImageSource
    kind: str  # "near", "far" or "unspecified"


@dataclass(frozen=True)
class RetrievalSet:
    """Image-caption pairs for recall@k.

    Attributes:
        name: short name.
        images: the unique images.
        captions: every caption.
        caption_image: int64 [len(captions)]: the index in ``images`` each caption belongs to.
        source: where it came from.
    """

    name: str
    images: ImageSource
    captions: list[str]
    caption_image: np.ndarray
    source: str


# ---------------------------------------------------------------------------------------------
# Folders


def _require_dir(path: os.PathLike | str, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a directory")
    return path


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by path; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        found += [Path(dirpath) / f for f in filenames
                  if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """{folder name: its image files}, folders sorted (torchvision's ImageFolder order)."""
    return {d.name: _image_files(d) for d in sorted(root.iterdir())
            if d.is_dir() and not _hidden(d.name)}


def _label_texts(root: Path, folders: list[str]) -> tuple[list[str], str]:
    """Label text per folder, from ``root/labels.json`` if present, else the folder names."""
    path = root / LABELS_FILE
    if not path.exists():
        return list(folders), "folder names"
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); expected an object mapping each "
                         "class folder name to its label text") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(v, str) and v.strip() for v in mapping.values()):
        raise ValueError(f"{path}: expected a JSON object mapping each class folder name to a "
                         'non-empty label text, e.g. {"n01440764": "tench"}')
    missing = sorted(set(folders) - set(mapping))
    extra = sorted(set(mapping) - set(folders))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no label for folder(s) {missing}")
        if extra:
            parts.append(f"label(s) for folder(s) that do not exist {extra}")
        raise ValueError(f"{path}: {'; '.join(parts)}; it must name every class folder exactly")
    texts = [mapping[f].strip() for f in folders]
    duplicated = sorted({t for t in texts if texts.count(t) > 1})
    if duplicated:
        raise ValueError(f"{path}: label text(s) {duplicated} are given to more than one folder; "
                         "classes need distinct labels")
    return texts, LABELS_FILE


def _templates(root: Path) -> tuple[tuple[str, ...], str]:
    path = root / TEMPLATES_FILE
    if not path.exists():
        return DEFAULT_TEMPLATES, "the default 7 CLIP ImageNet templates"
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return parse_templates(lines, str(path)), TEMPLATES_FILE


def parse_templates(lines: Sequence[str], where: str = "templates") -> tuple[str, ...]:
    """Prompt templates, one per line, with "{}" or CLIP_benchmark's "{c}" for the label;
    blank lines and lines starting with "#" are skipped. Returned in "{}" form.

    Raises:
        ValueError: a line without exactly one placeholder, or no templates at all.
    """
    out = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        text = text.replace("{c}", "{}")
        try:
            ok = text.count("{}") == 1 and text.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}, line {number}: {line!r} must contain the label "
                             'placeholder "{}" (or "{c}") exactly once and no other braces')
        out.append(text)
    if not out:
        raise ValueError(f"{where}: no templates (one per line, e.g. 'a photo of a {{}}.')")
    return tuple(out)


def _stratified_split(n: int, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) positions of one class of n >= 2 items. The generator is keyed by
    the seed and the class folder only, so adding or removing other classes (or files of
    other classes) does not move this class's split."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    order = rng.permutation(n)
    n_cal = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(order[:n_cal]), np.sort(order[n_cal:])


def load_image_folder(path: os.PathLike | str, *, name: str | None = None,
                      calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION, seed: int = 0,
                      max_per_class: int | None = None) -> LabelledSet:
    """A labelled set from an ImageFolder layout: one sub-folder per class holding its images
    (.jpg/.jpeg/.png/.webp, any case, nested folders allowed; hidden files ignored).

    Classes are the folders in sorted order. Label text is the folder name unless
    ``DIR/labels.json`` maps every folder name to a label text. Templates come from
    ``DIR/templates.txt`` (one per line, "{}" or "{c}" for the label), else
    :data:`DEFAULT_TEMPLATES`.

    Each class is split on its own, deterministically from ``seed`` and its folder name:
    ``round(calibration_fraction * n)`` images (at least one, and at least one left for test)
    go to calibration, the rest to test. 0.3 is the default because static INT8 calibration
    and the temperature/threshold fits need a few hundred images in all, while the test split
    keeps the larger share since it is the one reported.

    Args:
        path: the folder.
        name: the set's name (default: the folder's name).
        calibration_fraction: share of each class for the calibration split, in (0, 1).
        seed: the split's seed (independent of any training or other seed).
        max_per_class: use at most this many images per class, a random subset drawn from
            the seed (before splitting) - for a quick run over a large folder.

    Raises:
        ValueError: missing folder, fewer than 2 classes, a class with fewer than 2 images,
            a bad labels.json or templates.txt, or bad arguments. Unreadable images raise
            ValueError (naming the file) when they are loaded.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be between 0 and 1, got {calibration_fraction}")
    if max_per_class is not None and max_per_class < 2:
        raise ValueError(f"max_per_class must be at least 2 (one calibration and one test image "
                         f"per class), got {max_per_class}")
    root = _require_dir(path, "evaluation data folder")
    name = name or root.name
    # Empty class folders are kept (and refused below): dropping a class silently would
    # make zero-shot easier than the user's real task.
    classes = _class_folders(root)
    with_images = sum(1 for files in classes.values() if files)
    if with_images < 2:
        raise ValueError(
            f"evaluation data folder {root} has {with_images} class folder(s) with images; "
            "zero-shot classification needs at least 2: put each class's images "
            f"({', '.join(IMAGE_EXTENSIONS)}) in its own sub-folder, e.g. {root}/cat/1.jpg")
    folders = list(classes)
    too_few = [f"{f} ({len(classes[f])})" for f in folders if len(classes[f]) < 2]
    if too_few:
        raise ValueError(
            f"evaluation data folder {root}: class folder(s) {', '.join(too_few)} have too few "
            "images to split: each class needs at least 2 (one for the calibration split, one "
            "for the test split); add images or remove the folder")
    texts, label_origin = _label_texts(root, folders)
    templates, template_origin = _templates(root)
    split_paths = {"calibration": ([], []), "test": ([], [])}
    for label, folder in enumerate(folders):
        files = classes[folder]
        if max_per_class is not None and len(files) > max_per_class:
            rng = np.random.default_rng([seed, zlib.crc32(folder.encode("utf-8")), 1])
            files = [files[i] for i in np.sort(rng.choice(len(files), max_per_class, replace=False))]
        cal, test = _stratified_split(len(files), calibration_fraction, seed, folder)
        for part, chosen in (("calibration", cal), ("test", test)):
            split_paths[part][0].extend(files[i] for i in chosen)
            split_paths[part][1].extend([label] * len(chosen))
    splits = {part: EvalSplit(FileImageSource(p, f"{name}-{part}"), np.asarray(l, np.int64))
              for part, (p, l) in split_paths.items()}
    source = (f"image folder {root}: {len(folders)} classes (labels from {label_origin}), "
              f"templates from {template_origin}; {len(splits['calibration'])} calibration / "
              f"{len(splits['test'])} test images, stratified split, seed {seed}, "
              f"calibration fraction {calibration_fraction}"
              + (f", at most {max_per_class} per class" if max_per_class else ""))
    return LabelledSet(name=name, class_names=tuple(texts), templates=templates,
                       calibration=splits["calibration"], test=splits["test"], source=source,
                       folder_names=tuple(folders))


def load_unlabelled_folder(path: os.PathLike | str, name: str | None = None) -> FileImageSource:
    """Every image file under ``path`` (recursively, sorted; hidden files ignored), e.g. an
    OOD set.

    Raises:
        ValueError: the folder is missing or holds no .jpg/.jpeg/.png/.webp files.
    """
    root = _require_dir(path, "image folder")
    files = _image_files(root)
    if not files:
        raise ValueError(f"image folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FileImageSource(files, name or root.name)


def load_shift_folder(path: os.PathLike | str, class_names: Sequence[str], *,
                      folder_names: Sequence[str] | None = None, name: str | None = None,
                      allow_subset: bool = False) -> EvalSplit:
    """A covariate-shifted test set: same ImageFolder layout and classes as the labelled set
    (e.g. sketches or a new camera of the same classes). Every image is used (it is only
    reported, never fitted on).

    A class folder matches a class by its label text (``labels.json`` in this folder if
    present, else the folder name) or, with ``folder_names``, by the labelled set's folder
    name, so a copy of the same layout needs no labels.json of its own.

    Args:
        path: the folder.
        class_names: the labelled set's class names; labels index into them.
        folder_names: the labelled set's class folder names (``LabelledSet.folder_names``).
        name: the set's name (default: the folder's name).
        allow_subset: accept a folder holding only some of the classes (ImageNet-R-style);
            by default every class must be there.

    Raises:
        ValueError: missing folder, unknown classes, missing classes (unless
            ``allow_subset``), or no images.
    """
    root = _require_dir(path, "shift data folder")
    name = name or root.name
    classes = {f: files for f, files in _class_folders(root).items() if files}
    if not classes:
        raise ValueError(f"shift data folder {root} has no class folders with images; use the "
                         "labelled set's layout (one sub-folder per class)")
    texts, _ = _label_texts(root, list(classes))
    index = {c: i for i, c in enumerate(class_names)}
    if folder_names is not None:
        for i, f in enumerate(folder_names):
            index.setdefault(f, i)
    unknown = [f for f, t in zip(classes, texts) if t not in index and f not in index]
    if unknown:
        raise ValueError(f"shift data folder {root}: class folder(s) {unknown} are not classes "
                         f"of the labelled set ({list(class_names)[:20]}"
                         f"{' ...' if len(class_names) > 20 else ''}); classes must match")
    labels_of = {f: index[t] if t in index else index[f] for f, t in zip(classes, texts)}
    missing = sorted(set(range(len(class_names))) - set(labels_of.values()))
    if missing and not allow_subset:
        raise ValueError(f"shift data folder {root}: no images for class(es) "
                         f"{[class_names[i] for i in missing][:20]}; classes must match the "
                         "labelled set's (or allow a subset)")
    paths, labels = [], []
    for folder, files in classes.items():
        paths += files
        labels += [labels_of[folder]] * len(files)
    return EvalSplit(FileImageSource(paths, name), np.asarray(labels, np.int64))


def parse_named_dirs(arg: str, what: str = "--ood-data") -> dict[str, Path]:
    """``"near=DIR,far=DIR2"`` -> {"near": DIR, "far": DIR2}; a bare ``DIR`` is named after
    its last path component. Paths cannot contain commas.

    Raises:
        ValueError: empty, a part with an empty name or path, or a name used twice.
    """
    out: dict[str, Path] = {}
    for part in (p.strip() for p in arg.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep:
            path, name = part, Path(part.rstrip("/\\")).name
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"{what}: {part!r} should be NAME=DIR or DIR")
        if name in out:
            raise ValueError(f"{what}: the name {name!r} is used twice; give each folder its "
                             "own NAME=DIR")
        out[name] = Path(path).expanduser()
    if not out:
        raise ValueError(f"{what}: expected NAME=DIR[,NAME=DIR...] or DIR, got {arg!r}")
    return out


def parse_ood_arg(arg: str) -> dict[str, Path]:
    """``"near=DIR,far=DIR2"`` -> {name: folder}; see :func:`parse_named_dirs` and
    :func:`ood_kind`."""
    return parse_named_dirs(arg, "--ood-data")


def ood_kind(name: str) -> str:
    """"near" for a set named "near" or "near-..."/"near_...", likewise "far", else
    "unspecified"."""
    lowered = name.lower()
    for kind in ("near", "far"):
        if lowered == kind or lowered.startswith((f"{kind}-", f"{kind}_")):
            return kind
    return "unspecified"


# ---------------------------------------------------------------------------------------------
# Retrieval


def _pick_column(columns: Sequence[str], wanted: Sequence[str], what: str, path: Path) -> str:
    lowered = {c.strip().lower(): c for c in columns if c is not None}
    for candidate in wanted:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"{path}: no {what} column among {list(columns)}; name it one of "
                     f"{list(wanted)}")


def _read_retrieval_rows(path: Path) -> list[tuple[str, str, list[str]]]:
    """("line N" or "item N", image path as written, captions) per row."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read retrieval data file {path}: {exc}") from None
    rows = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        if text.lstrip().startswith("{") and path.suffix.lower() == ".json":
            return _coco_rows(path, text)
        if text.lstrip().startswith("["):
            # One JSON list of objects: the BLIP/CLIP_benchmark Flickr30k and COCO annotations.
            try:
                items = [(f"item {i}", x) for i, x in enumerate(json.loads(text), 1)]
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
        else:
            items = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}, line {number}: not JSON ({exc}); expected one object per "
                        'line like {"image": "a.jpg", "caption": "a dog"}') from None
        for where, item in items:
            if not isinstance(item, dict):
                raise ValueError(f"{path}, {where}: expected a JSON object")
            image_key = _pick_column(list(item), IMAGE_COLUMNS, "image", path)
            caption_key = _pick_column(list(item), CAPTION_COLUMNS, "caption", path)
            caps = item[caption_key]
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{path}, {where}: {caption_key!r} must be a string or a list "
                                 "of strings")
            rows.append((where, str(item[image_key]), caps))
        return rows
    lines = text.splitlines()
    header = lines[0] if lines else ""
    # open_clip's CSV convention is tab-separated; plain CSV is comma-separated.
    delimiter = "\t" if "\t" in header else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    if not reader.fieldnames:
        raise ValueError(f"{path}: empty; expected a header row with image and caption columns")
    image_key = _pick_column(reader.fieldnames, IMAGE_COLUMNS, "image", path)
    caption_key = _pick_column(reader.fieldnames, CAPTION_COLUMNS, "caption", path)
    caption_last = reader.fieldnames[-1] == caption_key
    for row in reader:
        caption = row.get(caption_key) or ""
        extra = row.get(None)
        if extra and caption_last:
            # CLIP_benchmark's Flickr files ("image,caption") leave commas in captions
            # unquoted: the overflow belongs to the caption.
            caption = delimiter.join([caption, *extra])
        elif extra:
            raise ValueError(f"{path}, line {reader.line_num}: more fields than the header has; "
                             "quote fields that contain the delimiter")
        rows.append((f"line {reader.line_num}", row.get(image_key) or "", [caption]))
    return rows


def _coco_rows(path: Path, text: str) -> list[tuple[str, str, list[str]]]:
    """COCO captions format: {"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]} (what torchvision's CocoCaptions, and so CLIP_benchmark's
    mscoco_captions, reads)."""
    try:
        data = json.loads(text)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        captions: dict[object, list[str]] = {i: [] for i in files}
        for number, ann in enumerate(data["annotations"], 1):
            if ann["image_id"] not in captions:
                raise ValueError(f"{path}, annotation {number}: image_id {ann['image_id']!r} is "
                                 "not in images")
            captions[ann["image_id"]].append(str(ann["caption"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: a JSON object must be in COCO captions format "
                         '({"images": [{"id", "file_name"}], "annotations": [{"image_id", '
                         f'"caption"}}]}}); missing {exc}') from None
    return [(f"image id {i}", files[i], caps) for i, caps in captions.items() if caps]


def load_retrieval(path: os.PathLike | str, name: str | None = None,
                   image_root: os.PathLike | str | None = None) -> RetrievalSet:
    """An image-caption retrieval set from a CSV/TSV, JSONL or JSON file.

    CSV: a header row with an image column (one of :data:`IMAGE_COLUMNS`, e.g. ``filepath``)
    and a caption column (one of :data:`CAPTION_COLUMNS`, e.g. ``title`` or ``caption``);
    tab-separated if the header has a tab (open_clip's format). Unquoted commas in a last
    caption column stay in the caption (CLIP_benchmark's Flickr files). JSONL: one object per
    line, ``{"image": "a.jpg", "caption": "..."}``, where the caption may be a list. JSON: one
    list of such objects (the Flickr30k/COCO Karpathy-split annotations), or COCO captions
    format (``images`` + ``annotations``). An image may have several captions (repeated rows
    or a list); images are de-duplicated by resolved path.

    Args:
        path: the file.
        name: the set's name (default: the file's stem).
        image_root: where relative image paths start (default: the file's folder).

    Raises:
        ValueError: the file is missing or malformed, an image column or caption column is
            missing, a caption is empty, or an image file does not exist (line given).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"retrieval data file {path} does not exist")
    root = path.parent if image_root is None else Path(image_root).expanduser()
    rows = _read_retrieval_rows(path)
    image_index: dict[Path, int] = {}
    captions: list[str] = []
    caption_image: list[int] = []
    for where, image, caps in rows:
        if not image.strip():
            raise ValueError(f"{path}, {where}: no image path")
        file = Path(image.strip()).expanduser()
        file = file if file.is_absolute() else root / file
        if not file.is_file():
            raise ValueError(f"{path}, {where}: image file {file} does not exist")
        if not caps or not all(c.strip() for c in caps):
            raise ValueError(f"{path}, {where}: empty caption for {image}")
        index = image_index.setdefault(file.resolve(), len(image_index))
        captions += [c.strip() for c in caps]
        caption_image += [index] * len(caps)
    if not captions:
        raise ValueError(f"retrieval data file {path} has no image-caption rows")
    name = name or path.stem
    images = FileImageSource(list(image_index), name)
    return RetrievalSet(name=name, images=images, captions=captions,
                        caption_image=np.asarray(caption_image, np.int64),
                        source=f"retrieval file {path}: {len(images)} images, "
                               f"{len(captions)} captions")


@dataclass(frozen=True)
class RecallHits:
    """Per-query hits of recall@k, for bootstrapping.

    Attributes:
        image_to_text: {k: bool [n_images]}: an image's top-k captions hold one of its own.
        text_to_image: {k: bool [n_captions]}: a caption's top-k images hold its image.
    """

    image_to_text: dict[int, np.ndarray]
    text_to_image: dict[int, np.ndarray]

    def recall(self) -> dict[str, float]:
        """{"image_to_text_R@k": mean, "text_to_image_R@k": mean} for every k."""
        out = {f"image_to_text_R@{k}": float(v.mean()) for k, v in self.image_to_text.items()}
        out.update({f"text_to_image_R@{k}": float(v.mean()) for k, v in self.text_to_image.items()})
        return out


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> RecallHits:
    """Recall@k both ways on cosine similarity (embeddings are L2-normalised here).

    A query's rank is the number of wrong items scoring at least as high as its best right
    one, so ties count against the model (deterministic, and never optimistic). A hit at k
    is rank < k, as in CLIP_benchmark (where an image is right if any of its captions is in
    its top k).

    Args:
        image_emb: float [n_images, d].
        text_emb: float [n_captions, d].
        caption_image: int [n_captions], the image index of each caption.
        ks: the k values.
        chunk: queries scored at once (bounds memory to chunk x n items).

    Raises:
        ValueError: mismatched shapes, an out-of-range image index, an image without any
            caption, or a k below 1.
    """
    img, txt = _normalise(image_emb), _normalise(text_emb)
    owner = np.asarray(caption_image, dtype=np.int64).reshape(-1)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with the same d, got {img.shape} and {txt.shape}")
    if len(owner) != len(txt):
        raise ValueError(f"{len(txt)} caption embeddings but {len(owner)} caption_image entries")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(img)):
        raise ValueError(f"caption_image holds indices outside 0..{len(img) - 1}")
    uncaptioned = np.setdiff1d(np.arange(len(img)), owner)
    if len(uncaptioned):
        raise ValueError(f"image(s) {uncaptioned[:10].tolist()} have no caption")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be at least 1, got {ks}")

    t2i_rank = np.empty(len(txt), np.int64)
    for s in range(0, len(txt), chunk):
        scores = txt[s:s + chunk] @ img.T
        right = scores[np.arange(len(scores)), owner[s:s + chunk]]
        t2i_rank[s:s + chunk] = (scores >= right[:, None]).sum(1) - 1  # less the right one
    i2t_rank = np.empty(len(img), np.int64)
    for s in range(0, len(img), chunk):
        scores = img[s:s + chunk] @ txt.T
        mine = owner[None, :] == np.arange(s, s + len(scores))[:, None]
        best = np.where(mine, scores, -np.inf).max(1)
        i2t_rank[s:s + chunk] = ((scores >= best[:, None]) & ~mine).sum(1)
    return RecallHits(image_to_text={k: i2t_rank < k for k in ks},
                      text_to_image={k: t2i_rank < k for k in ks})


# ---------------------------------------------------------------------------------------------
# The suite


# The built-in digits' data seed: trained checkpoints are cached against this split
# (export/train.py DATA_SEED; not imported, as train.py pulls in torch).
DIGITS_DATA_SEED = 0


# One size at a time: a model's evaluation asks for one size, and at 224 px the digits
# (train split included) take about 360 MB, the shifted sets about 525 MB.
@lru_cache(maxsize=1)
def _digits_at(image_size: int) -> digits.DigitsData:
    return digits.load(image_size, seed=DIGITS_DATA_SEED)


@lru_cache(maxsize=1)
def _digits_shifted_at(image_size: int) -> dict[str, digits.Split]:
    return digits.shifted("test", image_size, seed=DIGITS_DATA_SEED)


def _digits_part(name: str, get: Callable[[digits.DigitsData], np.ndarray],
                 length: int) -> RenderedImageSource:
    return RenderedImageSource(name, length, lambda size: get(_digits_at(size)))


@dataclass
class EvalSuite:
    """Everything one export measures, by role.

    Attributes:
        labelled: zero-shot classification (calibration split fitted on, test split reported).
        ood: {name: OodSet(images, kind)}, kind "near", "far" or "unspecified".
        shift: {name: EvalSplit}: covariate-shifted test sets with the labelled set's classes.
        retrieval: image-caption recall@k, if given.
        domain_measured: False when the labelled set is not the measured model's own domain
            (a non-digits model measured on the built-in digits); the integrator sets it.
        builtin: whether ``labelled`` is the built-in digits.
    """

    labelled: LabelledSet
    ood: dict[str, OodSet] = field(default_factory=dict)
    shift: dict[str, EvalSplit] = field(default_factory=dict)
    retrieval: RetrievalSet | None = None
    domain_measured: bool = True
    builtin: bool = False

    @classmethod
    def from_paths(cls, eval_data: os.PathLike | str | None = None, ood_data: str | None = None,
                   retrieval_data: os.PathLike | str | None = None, shift_data: str | None = None,
                   *, calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION, seed: int = 0,
                   max_per_class: int | None = None) -> "EvalSuite":
        """Build a suite from user paths; what is not given falls back as follows.

        Args:
            eval_data: an ImageFolder (see :func:`load_image_folder`); None: the built-in
                digits, with their letters/noise OOD sets and generated shifted sets.
            ood_data: "near=DIR,far=DIR2" or "DIR" (see :func:`parse_ood_arg`, :func:`ood_kind`);
                None: the built-in OOD sets with the built-in digits, none with a folder.
            retrieval_data: a CSV/JSONL file (see :func:`load_retrieval`); None: no retrieval.
            shift_data: "NAME=DIR,..." or "DIR" of folders with the labelled set's classes;
                None: the generated shifted digits with the built-in digits, none otherwise.
            calibration_fraction, seed, max_per_class: passed to :func:`load_image_folder`.

        Raises:
            ValueError: from the loaders, with what to fix.
        """
        if eval_data is None:
            suite = builtin_digits_suite()
        else:
            labelled = load_image_folder(eval_data, calibration_fraction=calibration_fraction,
                                         seed=seed, max_per_class=max_per_class)
            suite = cls(labelled=labelled)
        if ood_data is not None:
            suite.ood = {name: OodSet(load_unlabelled_folder(d, name), ood_kind(name))
                         for name, d in parse_ood_arg(ood_data).items()}
        if shift_data is not None:
            labelled = suite.labelled
            suite.shift = {name: load_shift_folder(d, labelled.class_names,
                                                   folder_names=labelled.folder_names, name=name)
                           for name, d in parse_named_dirs(shift_data, "--shift-data").items()}
        if retrieval_data is not None:
            suite.retrieval = load_retrieval(retrieval_data)
        return suite

    def describe(self) -> list[str]:
        """One line per data set, for the report's notes and the log."""
        lines = [f"Labelled ({self.labelled.name}): {self.labelled.source}; "
                 f"{len(self.labelled.class_names)} classes, {len(self.labelled.templates)} "
                 "prompt templates; calibration split fitted on, test split reported"
                 + ("" if self.domain_measured else
                    "; NOT the measured model's domain: its numbers say little about the "
                    "model's real quality")]
        lines += [f"OOD {name} ({ood.kind}): {len(ood.images)} images" for name, ood in
                  self.ood.items()]
        lines += [f"Shift {name}: {len(split)} images" for name, split in self.shift.items()]
        if self.retrieval is not None:
            lines.append(f"Retrieval ({self.retrieval.name}): {self.retrieval.source}")
        return lines

    def file_sources(self) -> list[FileImageSource]:
        """Every file-backed source in the suite (for :meth:`FileImageSource.verify`)."""
        sources = [self.labelled.calibration.images, self.labelled.test.images,
                   *(o.images for o in self.ood.values()), *(s.images for s in self.shift.values())]
        if self.retrieval is not None:
            sources.append(self.retrieval.images)
        return [s for s in sources if isinstance(s, FileImageSource)]


def builtin_digits_suite() -> EvalSuite:
    """The offline default in the suite's types: scikit-learn's digits split as
    :func:`digits.load` (seed 0) splits them, prompts :data:`digits.PROMPTS`, OOD sets
    "letters" (near) and "noise" (far), and :func:`digits.shifted` of the test split.

    Images render lazily at whatever size a model asks (bilinear from the 8x8 sources, as
    the built-in models were trained), so one suite serves models of different input sizes.
    """
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(np.int64)
    parts = digits._split_indices(labels, np.random.default_rng(DIGITS_DATA_SEED))
    cal_labels = labels[np.sort(parts["calibration"])]
    test_labels = labels[np.sort(parts["test"])]
    n_ood = digits.N_OOD  # what digits.load draws by default
    labelled = LabelledSet(
        name="digits", class_names=tuple(digits.CLASS_NAMES), templates=tuple(digits.PROMPTS),
        calibration=EvalSplit(_digits_part("digits-calibration", lambda d: d.calibration.images,
                                           len(cal_labels)), cal_labels),
        test=EvalSplit(_digits_part("digits-test", lambda d: d.test.images, len(test_labels)),
                       test_labels),
        source=(f"built-in: scikit-learn's 8x8 digits upsampled bilinearly to the model's input; "
                f"stratified 70/15/15 train/calibration/test split, seed {DIGITS_DATA_SEED}; "
                f"{len(cal_labels)} calibration / {len(test_labels)} test images"))
    ood = {
        "letters": OodSet(_digits_part("letters", lambda d: d.ood_near, n_ood), "near"),
        "noise": OodSet(_digits_part("noise", lambda d: d.ood_far, n_ood), "far"),
    }
    shift = {
        n: EvalSplit(RenderedImageSource(
            f"digits-{n}", len(test_labels),
            lambda size, n=n: _digits_shifted_at(size)[n].images), test_labels)
        for n in digits.SHIFT_NAMES
    }
    return EvalSuite(labelled=labelled, ood=ood, shift=shift, builtin=True)
