"""The offline default's data: scikit-learn's bundled 8x8 digits, plus OOD sets that need no
download (letters drawn with PIL's built-in font; noise and textures).

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


def load(image_size: int, seed: int = 0, n_ood: int = 300) -> DigitsData:
    """Load the digits, split them stratified 70/15/15 (train/calibration/test), and build
    the OOD sets. Deterministic for a given seed."""
    from sklearn.datasets import load_digits  # bundled in the wheel: no download

    digits = load_digits()
    grey, labels = digits.images, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "calibration": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_cal, n_test = int(round(0.15 * len(idx))), int(round(0.15 * len(idx)))
        parts["calibration"] += idx[:n_cal].tolist()
        parts["test"] += idx[n_cal:n_cal + n_test].tolist()
        parts["train"] += idx[n_cal + n_test:].tolist()
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
