"""What the load tester sends: a mix of calls by ratio, their inputs and their routing metadata.

A :class:`Workload` turns a request index into a :class:`Call`, deterministically, so two runs
with the same settings send the same sequence. Inputs come from a built-in image set (the
digits the default model is trained on, encoded as PNG), a folder of images, built-in captions
or a text file. Routing is either fixed headers (``x-clip-scale`` / ``x-clip-precision``) or,
without them, a spread of ``x-clip-routing-key`` values so the server's sticky A/B split sees
many users.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

KINDS = ("image", "text", "classify")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_FOLDER_IMAGES = 1000  # read at most this many files from --images (memory bound)
MAX_TEXTS = 10_000


@dataclass(frozen=True)
class Call:
    """One request to send.

    Attributes:
        kind: "image" (EmbedImages), "text" (EmbedTexts) or "classify" (Classify).
        images: encoded images (image and classify calls).
        texts: strings (text calls).
        metadata: gRPC metadata pairs: routing headers.
        index: the request's index in the run.
    """

    kind: str
    images: tuple[bytes, ...]
    texts: tuple[str, ...]
    metadata: tuple[tuple[str, str], ...]
    index: int

    @property
    def items(self) -> int:
        return len(self.texts) if self.kind == "text" else len(self.images)


def parse_mix(text: str) -> dict[str, float]:
    """``"image:3,text:1"`` -> {"image": 0.75, "text": 0.25}; a bare kind weighs 1.

    Raises:
        ValueError: unknown kind, bad or non-positive weight, or nothing given.
    """
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, _, weight = part.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown call kind {kind!r} in mix {text!r}; valid: "
                             f"{', '.join(KINDS)}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for {kind} in mix {text!r}") from None
        if not value > 0:
            raise ValueError(f"weight for {kind} must be positive, got {value}")
        weights[kind] = weights.get(kind, 0.0) + value
    if not weights:
        raise ValueError("empty mix: name at least one of " + ", ".join(KINDS))
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def builtin_pixels(count: int = 64, size: int = 64, seed: int = 0) -> np.ndarray:
    """Held-out test digits as uint8 [count, size, size, 3]: the built-in image set.

    Uses scikit-learn's bundled digits (no download) through the export stage's loader.
    """
    from clipserve.export import digits

    data = digits.load(size, seed=seed, n_ood=1)
    images = data.test.images
    return images[np.arange(count) % len(images)]


def builtin_images(count: int = 64, size: int = 64, seed: int = 0) -> list[bytes]:
    """The built-in image set as PNG files."""
    return [encode_png(p) for p in builtin_pixels(count, size, seed)]


def synthetic_photo(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 [height, width, 3] scene, made offline (no download): a sky and a
    ground gradient meeting at a random horizon, low-frequency texture, soft-edged objects,
    vignetting and sensor noise. Its JPEG compresses like a camera photo (q90: about
    100-150 KB at 640x480), unlike a flat test card."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.35, 0.65) + height * 0.05 * np.sin(
        x / width * rng.uniform(2, 6) + rng.uniform(0, 6))
    sky_top, sky_low = rng.uniform(60, 220, 3), rng.uniform(150, 255, 3)
    ground_near, ground_far = rng.uniform(20, 120, 3), rng.uniform(60, 180, 3)
    t_sky = (y / np.maximum(horizon, 1))[..., None].clip(0, 1)
    t_ground = ((y - horizon) / np.maximum(height - horizon, 1))[..., None].clip(0, 1)
    scene = np.where((y < horizon)[..., None], sky_top + (sky_low - sky_top) * t_sky,
                     ground_far + (ground_near - ground_far) * t_ground)
    # Texture at a few scales: bilinear-upsampled noise (grass, clouds, walls).
    for cells, amplitude in ((8, 18.0), (32, 10.0), (128, 10.0), (320, 20.0)):
        coarse = rng.normal(0, 1, (cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize(
            (width, height), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)
        scene += amplitude * layer
    img = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
    objects = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(objects), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(5, 10))):
        cx, cy = rng.uniform(0, width), rng.uniform(height * 0.3, height)
        rx, ry = rng.uniform(width / 30, width / 6), rng.uniform(height / 30, height / 5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=255)
        else:
            draw.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=255)
    img.paste(objects.filter(ImageFilter.GaussianBlur(1.5)), (0, 0),
              mask.filter(ImageFilter.GaussianBlur(2.5)))
    r2 = ((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2
    out = np.asarray(img, dtype=np.float32) * (1 - 0.6 * r2)[..., None]
    out += rng.normal(0, 8.0, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> baseline JPEG bytes (4:2:0, as cameras and browsers write)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_jpegs(count: int = 16, width: int = 640, height: int = 480, quality: int = 90,
                seed: int = 0) -> list[bytes]:
    """``count`` distinct :func:`synthetic_photo` scenes as JPEG: the photo workload (real
    traffic is camera JPEGs much larger than the model input, not PNGs at its size)."""
    return [encode_jpeg(synthetic_photo(width, height, seed + i), quality)
            for i in range(count)]


def folder_images(folder: Path, limit: int = MAX_FOLDER_IMAGES) -> list[bytes]:
    """The image files in ``folder`` (JPEG/PNG/WebP by suffix, sorted, at most ``limit``).

    Raises:
        ValueError: the folder does not exist or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return [p.read_bytes() for p in paths]


def builtin_texts() -> list[str]:
    """Captions of the built-in set: every prompt template x digit name."""
    from clipserve.export.digits import CLASS_NAMES, PROMPTS

    return [p.format(c) for c in CLASS_NAMES for p in PROMPTS]


def file_texts(path: Path, limit: int = MAX_TEXTS) -> list[str]:
    """Non-empty lines of a text file, at most ``limit``.

    Raises:
        ValueError: unreadable or empty file.
    """
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise ValueError(f"cannot read texts file {path}: {exc}") from exc
    lines = [line for line in lines if line][:limit]
    if not lines:
        raise ValueError(f"no texts in {path}")
    return lines


def routing_metadata(scale: str = "", precision: str = "") -> tuple[tuple[str, str], ...]:
    """Fixed routing headers; empty values are left out."""
    pairs = []
    if scale:
        pairs.append(("x-clip-scale", scale))
    if precision:
        pairs.append(("x-clip-precision", precision))
    return tuple(pairs)


class Workload:
    """Request index -> :class:`Call`.

    Args:
        mix: kind -> share (from :func:`parse_mix`).
        images: encoded images to cycle through (needed for image/classify).
        texts: strings to cycle through (needed for text).
        batch: items per call.
        metadata: fixed routing headers sent on every call.
        routing_keys: when > 0, call i also carries ``x-clip-routing-key: lt-<i mod N>``.
        seed: the kind sequence is drawn from this seed.

    Raises:
        ValueError: batch < 1, or the mix needs inputs that are missing.
    """

    _KIND_CYCLE = 4096  # kinds are pre-drawn for this many calls, then repeat

    def __init__(self, mix: dict[str, float], images: Sequence[bytes] = (),
                 texts: Sequence[str] = (), batch: int = 1,
                 metadata: tuple[tuple[str, str], ...] = (), routing_keys: int = 0,
                 seed: int = 0):
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if routing_keys < 0:
            raise ValueError(f"routing_keys must be 0 or more, got {routing_keys}")
        if ({"image", "classify"} & set(mix)) and not images:
            raise ValueError("the mix sends images but no images were given")
        if "text" in mix and not texts:
            raise ValueError("the mix sends texts but no texts were given")
        self.mix = dict(mix)
        self.images = list(images)
        self.texts = list(texts)
        self.batch = batch
        self.metadata = tuple(metadata)
        self.routing_keys = routing_keys
        kinds = sorted(self.mix)
        rng = np.random.default_rng(seed)
        draws = rng.choice(len(kinds), size=self._KIND_CYCLE, p=[self.mix[k] for k in kinds])
        self._kinds = [kinds[d] for d in draws]

    def call(self, index: int) -> Call:
        """The call sent as request number ``index`` (0-based)."""
        kind = self._kinds[index % len(self._kinds)]
        start = index * self.batch
        metadata = self.metadata
        if self.routing_keys:
            metadata = metadata + (("x-clip-routing-key", f"lt-{index % self.routing_keys}"),)
        if kind == "text":
            texts = tuple(self.texts[(start + j) % len(self.texts)] for j in range(self.batch))
            return Call(kind, (), texts, metadata, index)
        images = tuple(self.images[(start + j) % len(self.images)] for j in range(self.batch))
        return Call(kind, images, (), metadata, index)
