"""The offline default's data: scikit-learn's bundled 8x8 digits, plus OOD sets that need no
download (letters drawn with PIL's built-in font; noise and textures) and covariate-shifted
copies of the test split (:func:`shifted`).

All images come out as uint8 RGB, NHWC, at the model's input size, exactly what the image
tower takes. Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Zero-shot prompts. The model trains on these, so held-out accuracy measures generalisation
# over unseen handwriting, not over unseen prompt wording.
PROMPTS = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a blurry picture of a {}.",
    "a drawing of the digit {}.",
)
# Letters that do not look like a digit (no O/I/l/S/Z/B/G/Q/D/T/g/q/b), so the near-OOD set is
# honestly out of distribution.
OOD_LETTERS = "ACEFHJKMNPRUVWXYaehkmnprtuvwxy"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [n, S, S, 3]
    labels: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class DigitsData:
    train: Split
    calibration: Split  # fits the temperature and the OOD threshold
    test: Split  # everything reported is measured here
    ood_near: np.ndarray  # letters, uint8 [n, S, S, 3]
    ood_far: np.ndarray  # noise and textures


def _to_model_images(grey_8x8: np.ndarray, image_size: int) -> np.ndarray:
    """8x8 intensities in [0, 16] -> uint8 RGB [n, S, S, 3], bilinear upsampling."""
    out = np.empty((len(grey_8x8), image_size, image_size, 3), dtype=np.uint8)
    for i, img in enumerate(grey_8x8):
        pil = Image.fromarray(np.clip(img * 16, 0, 255).astype(np.uint8), mode="L")
        pil = pil.resize((image_size, image_size), Image.BILINEAR)
        out[i] = np.asarray(pil)[..., None]
    return out


def _render_letters(n: int, rng: np.random.Generator) -> np.ndarray:
    """Letters drawn like the digits were made: white strokes on black, downsampled to 8x8
    and quantised to 17 grey levels, with random size, offset and rotation."""
    out = np.zeros((n, 8, 8), dtype=np.float64)
    for i in range(n):
        letter = OOD_LETTERS[rng.integers(len(OOD_LETTERS))]
        canvas = Image.new("L", (32, 32), 0)
        font = ImageFont.load_default(size=int(rng.integers(30, 38)))
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        x = (32 - (right - left)) / 2 - left + rng.integers(-2, 3)
        y = (32 - (bottom - top)) / 2 - top + rng.integers(-2, 3)
        draw.text((x, y), letter, fill=255, font=font, stroke_width=int(rng.integers(1, 3)),
                  stroke_fill=255)
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        small = np.asarray(canvas.resize((8, 8), Image.BOX), dtype=np.float64)
        # Stretch to full ink like the digits, so brightness alone does not give letters away.
        out[i] = np.round(small / max(small.max(), 1.0) * 16)
    return out


def _render_far_ood(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise, Gaussian blobs, stripes and checkerboards, 8x8 in [0, 16]."""
    out = np.zeros((n, 8, 8), dtype=np.float64)
    yy, xx = np.mgrid[0:8, 0:8]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            img = rng.uniform(0, 16, (8, 8))
        elif kind == 1:
            cy, cx, s = rng.uniform(1, 7), rng.uniform(1, 7), rng.uniform(1, 3)
            img = 16 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        elif kind == 2:
            period, phase = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
            axis = xx if rng.random() < 0.5 else yy
            img = 8 + 8 * np.sin(2 * np.pi * axis / period + phase)
        else:
            cell = int(rng.integers(1, 3))
            img = 16.0 * (((yy // cell) + (xx // cell)) % 2)
        out[i] = np.round(np.clip(img, 0, 16))
    return out


def _split_indices(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[int]]:
    """Stratified 70/15/15 indices. ``load`` goes on drawing the OOD sets from the same
    generator, so this must consume it exactly as it always has (trained checkpoints are
    cached against this split)."""
    parts: dict[str, list[int]] = {"train": [], "calibration": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_cal, n_test = int(round(0.15 * len(idx))), int(round(0.15 * len(idx)))
        parts["calibration"] += idx[:n_cal].tolist()
        parts["test"] += idx[n_cal:n_cal + n_test].tolist()
        parts["train"] += idx[n_cal + n_test:].tolist()
    return parts


N_OOD = 300  # images per OOD set by default


def load(image_size: int, seed: int = 0, n_ood: int = N_OOD) -> DigitsData:
    """Load the digits, split them stratified 70/15/15 (train/calibration/test), and build
    the OOD sets. Deterministic for a given seed."""
    from sklearn.datasets import load_digits  # bundled in the wheel: no download

    digits = load_digits()
    grey, labels = digits.images, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts = _split_indices(labels, rng)
    images = _to_model_images(grey, image_size)
    splits = {name: Split(images[np.sort(ix)], labels[np.sort(ix)]) for name, ix in parts.items()}
    return DigitsData(
        train=splits["train"], calibration=splits["calibration"], test=splits["test"],
        ood_near=_to_model_images(_render_letters(n_ood, rng), image_size),
        ood_far=_to_model_images(_render_far_ood(n_ood, rng), image_size),
    )


def captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label, each from a random prompt template."""
    return [PROMPTS[rng.integers(len(PROMPTS))].format(CLASS_NAMES[c]) for c in labels]


# Covariate shift: the same test digits (same labels), changed in ways a deployment sees.
# Corruptions are applied at model size. Blur sigma is given in 8x8-source pixels and scaled
# by S/8, so it blurs the digit alike at every size; rotation, contrast and noise levels do not
# depend on S (noise is drawn per model pixel, so a large input averages more of it away).
SHIFT_SEVERITIES = {
    "blur": (0.35, 0.7, 1.2),  # Gaussian sigma, in 8x8-source pixels
    "noise": (12.0, 28.0, 56.0),  # additive Gaussian noise, std in uint8 levels
    "rotation": (12.0, 25.0, 40.0),  # degrees, direction drawn per image
    "contrast": (0.6, 0.35, 0.15),  # factor towards each image's mean intensity
}
SHIFT_NAMES = tuple(f"{k}-{s}" for k in SHIFT_SEVERITIES for s in (1, 2, 3)) + ("nearest",)
# Fixed salt so the corruption draws are independent of the split's generator.
_SHIFT_SALT = 0x5EED


def _corrupt(images: np.ndarray, kind: str, level: float, image_size: int,
             rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageFilter

    # float32 throughout: at 224 px these are 13.5M-pixel arrays per set.
    if kind == "noise":
        noisy = images.astype(np.float32)
        noisy += np.float32(level) * rng.standard_normal(images.shape, dtype=np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if kind == "contrast":
        x = images.astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(np.rint(mean + (x - mean) * np.float32(level)), 0, 255).astype(np.uint8)
    out = np.empty_like(images)
    signs = rng.choice((-1.0, 1.0), size=len(images))
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0], mode="L")  # digits are grey: R = G = B
        if kind == "blur":
            pil = pil.filter(ImageFilter.GaussianBlur(radius=level * image_size / 8))
        elif kind == "rotation":  # black fill is the digits' own background
            pil = pil.rotate(signs[i] * level, resample=Image.BILINEAR, fillcolor=0)
        else:
            raise ValueError(f"unknown corruption {kind!r}")
        out[i] = np.asarray(pil)[..., None]
    return out


def shifted(split: str, image_size: int, seed: int = 0,
            names: tuple[str, ...] | None = None) -> dict[str, Split]:
    """Covariate-shifted copies of one digits split, for measuring robustness per precision.

    :data:`SHIFT_NAMES`: each corruption of :data:`SHIFT_SEVERITIES` at severities 1..3
    ("blur-1" .. "contrast-3"),
    plus "nearest": the same 8x8 digits upsampled with nearest-neighbour instead of bilinear
    (a live-gateway measurement had the built-in digits model flag 47% of these as OOD: a
    preprocessing change alone is a distribution shift). Labels are the
    split's own. Deterministic for a given ``seed``.

    Args:
        split: which split of :func:`load` to corrupt; only "test" is accepted, so that no
            image the calibration or training saw is reported.
        image_size: the model's input side S.
        seed: the data seed passed to :func:`load` (which digits are in the split); the
            corruption draws derive from it too.
        names: build only these sets (default: all of them).

    Raises:
        ValueError: a split other than "test", or an unknown name.
    """
    if split != "test":
        raise ValueError(f"shifted sets are built from the test split only (got {split!r}): "
                         "calibration images are used for fitting and never reported")
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey, labels = digits.images, digits.target.astype(np.int64)
    idx = np.sort(_split_indices(labels, np.random.default_rng(seed))[split])
    grey, labels = grey[idx], labels[idx]
    all_names = list(SHIFT_NAMES)
    wanted = all_names if names is None else list(names)
    unknown = sorted(set(wanted) - set(all_names))
    if unknown:
        raise ValueError(f"unknown shifted set(s) {unknown}; known: {all_names}")
    clean = _to_model_images(grey, image_size)
    out: dict[str, Split] = {}
    for name in wanted:
        if name == "nearest":
            img = np.empty_like(clean)
            for i, g in enumerate(grey):
                pil = Image.fromarray(np.clip(g * 16, 0, 255).astype(np.uint8), mode="L")
                img[i] = np.asarray(pil.resize((image_size, image_size), Image.NEAREST))[..., None]
        else:
            kind, severity = name.rsplit("-", 1)
            level = SHIFT_SEVERITIES[kind][int(severity) - 1]
            # One generator per set: a set's draws do not depend on which others were asked.
            rng = np.random.default_rng([_SHIFT_SALT, seed, all_names.index(name)])
            gray = _corrupt(clean[..., :1], kind, level, image_size, rng)
            img = np.repeat(gray, 3, axis=-1)
        out[name] = Split(img, labels.copy())
    return out
