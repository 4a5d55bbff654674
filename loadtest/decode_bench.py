"""Image decode paths side by side: CPU ms per JPEG photo to the model input, and how far each
path's embedding is from the exact path's.

    python -m clipserve.loadtest.decode_bench --json benchmarks/decode.json

Paths (all end in the same uint8 [S, S, 3] centre crop the gateway sends Triton):

- ``exact``: Pillow full-size decode, bicubic resize of the short side to S, centre crop
  (open_clip's eval transform; ``preprocess(reduced_jpeg=False)``).
- ``reduced``: what the gateway serves by default: libjpeg DCT-scaled decode through Pillow's
  ``draft`` (1/2, 1/4 or 1/8, never below S) and a bicubic resize of the crop only
  (``preprocess(reduced_jpeg=True)``).
- ``simplejpeg``: the same DCT scaling through simplejpeg (libjpeg-turbo's own API), then the
  same Pillow resize: is a second JPEG library worth it?
- ``reduced+cv2-area`` / ``reduced+cv2-cubic``: Pillow's reduced decode, then OpenCV's SIMD
  ``cv2.resize`` (INTER_AREA / INTER_CUBIC) instead of Pillow's resampler, then the crop.
- ``exact+cv2-area``: full-size decode, OpenCV INTER_AREA resize (a SIMD resize alone).

Optional paths are skipped (and say so) when simplejpeg or opencv-python-headless is missing
(``pip install simplejpeg opencv-python-headless`` to compare; the gateway needs neither).

Images: the two real photos scikit-learn ships (``load_sample_images``: a temple and a flower,
427x640) resized to each ``--sizes`` entry, plus synthetic scenes (gradients, shapes, text,
sensor noise), all saved as JPEG quality 90 (photos) and 85 (synthetic).

Fidelity: each path's pixels through a ViT-B-32 image tower (open_clip, random init, seed 0;
``--no-fidelity`` skips it, it needs the export extra), cosine to the exact path's embedding.
For scale, the table also prints the cosine between the exact embeddings of different images.
CPU time is ``time.process_time`` of this single-threaded process (OpenCV set to one thread),
paths interleaved in rounds and the median round kept, because the machine is shared; the JSON
records the CPU model and flags and ``os.getloadavg()`` before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, features

from clipserve import calibration as cal
from clipserve import cpu
from clipserve.server.images import _resized_size, preprocess

LIMITS = dict(max_bytes=1 << 26, max_pixels=1 << 26)


@dataclass
class PathResult:
    """One path at one image size."""

    path: str
    size: str  # "640x480"
    cpu_ms: float  # per image, median round
    cpu_ratio: float  # cpu_ms / exact's cpu_ms in the same run
    max_abs_pixel_diff: int  # to the exact path, over all images
    mean_abs_pixel_diff: float
    cosine_min: float | None  # embedding cosine to the exact path, worst image
    cosine_mean: float | None


def benchmark_images(width: int, height: int) -> dict[str, bytes]:
    """The benchmark's JPEGs at ``width`` x ``height``: two real photos, two synthetic."""
    from sklearn.datasets import load_sample_images

    out = {}
    sample = load_sample_images()
    for name, arr in zip(("photo-temple", "photo-flower"), sample.images):
        img = Image.fromarray(arr).resize((width, height), Image.Resampling.BICUBIC)
        out[name] = _jpeg(img, 90)
    for seed in (1, 2):
        out[f"synthetic-{seed}"] = _jpeg(synthetic_scene(width, height, seed), 85)
    return out


def synthetic_scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test card: smooth gradient sky, soft shapes, hard-edged text, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 100 * np.sin(x / width * np.pi * (1 + c) + seed)
                     * np.cos(y / height * np.pi) for c in range(3)], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 40, width // 6))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(max(1, width // 400)))
    draw = ImageDraw.Draw(img)
    for i in range(6):
        draw.text((int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height - 20))),
                  f"clipserve {seed}-{i} ABC xyz 0123", fill=(255 * (i % 2),) * 3,
                  font_size=max(10, height // 24))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def paths(size: int) -> tuple[dict[str, Callable[[bytes], np.ndarray]], list[str]]:
    """The decode paths available here, and notes on those that are not."""
    def exact(data):
        return preprocess(data, size, **LIMITS, reduced_jpeg=False)

    def reduced(data):
        return preprocess(data, size, **LIMITS, reduced_jpeg=True)

    found: dict[str, Callable[[bytes], np.ndarray]] = {"exact": exact, "reduced": reduced}
    notes = []
    try:
        import simplejpeg
    except ImportError:
        notes.append("simplejpeg not installed: path skipped")
    else:
        from clipserve.server.images import _reduced_resize_center_crop

        def simplejpeg_path(data):
            width, height = simplejpeg.decode_jpeg_header(data)[:2][::-1]
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size,
                                         min_width=size)
            img = Image.fromarray(arr)
            # libjpeg rounds scaled sizes up; the full extent is size * scale of the original.
            scale = round(width / img.size[0])
            return _reduced_resize_center_crop(img, size, (width, height),
                                               (0, 0, width / scale, height / scale))
        found["simplejpeg"] = simplejpeg_path
    try:
        import cv2
    except ImportError:
        notes.append("opencv-python-headless not installed: cv2 paths skipped")
    else:
        cv2.setNumThreads(1)

        def cv2_path(interpolation, reduce):
            def run(data):
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                if reduce:
                    img.draft(img.mode, (size, size))
                arr = np.asarray(img.convert("RGB"))
                target = _resized_size(width, height, size)
                return _crop(cv2.resize(arr, target, interpolation=interpolation), size)
            return run
        found["reduced+cv2-area"] = cv2_path(cv2.INTER_AREA, True)
        found["reduced+cv2-cubic"] = cv2_path(cv2.INTER_CUBIC, True)
        found["exact+cv2-area"] = cv2_path(cv2.INTER_AREA, False)
    return found, notes


def time_paths(funcs: dict[str, Callable[[bytes], np.ndarray]], images: list[bytes],
               rounds: int, reps: int) -> dict[str, float]:
    """CPU ms per image of each path: ``rounds`` interleaved rounds of ``reps`` passes over
    the images; the median round."""
    per_round: dict[str, list[float]] = {name: [] for name in funcs}
    for func in funcs.values():  # warm-up
        for data in images:
            func(data)
    for _ in range(rounds):
        for name, func in funcs.items():
            started = time.process_time()
            for _ in range(reps):
                for data in images:
                    func(data)
            per_round[name].append((time.process_time() - started) * 1e3 / (reps * len(images)))
    return {name: statistics.median(ms) for name, ms in per_round.items()}


class Embedder:
    """A random-init open_clip ViT-B-32 image tower (seed 0): uint8 pixels -> unit vectors."""

    def __init__(self, size: int):
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        self.model = model.visual.eval()
        self.torch = torch
        self.size = size
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            out = self.model((x - self.mean) / self.std)
        out = out / out.norm(dim=-1, keepdim=True)
        return out.numpy().astype(np.float64)


def run(sizes: list[tuple[int, int]], model_size: int = 224, rounds: int = 7, reps: int = 3,
        fidelity: bool = True) -> tuple[list[PathResult], dict]:
    funcs, notes = paths(model_size)
    embedder = Embedder(model_size) if fidelity else None
    results, extra = [], {"notes": notes, "between_images_cosine_max": {}}
    for width, height in sizes:
        label = f"{width}x{height}"
        images = benchmark_images(width, height)
        data = list(images.values())
        pixels = {name: np.stack([f(d) for d in data]) for name, f in funcs.items()}
        embeddings = {name: embedder(p) for name, p in pixels.items()} if embedder else {}
        if embedder:
            ref = embeddings["exact"]
            sims = ref @ ref.T
            extra["between_images_cosine_max"][label] = float(
                sims[~np.eye(len(ref), dtype=bool)].max())
        ms = time_paths(funcs, data, rounds, reps)
        for name in funcs:
            diff = np.abs(pixels[name].astype(np.int16) - pixels["exact"])
            cos = cal.cosine_rows(embeddings[name], embeddings["exact"]) if embedder else None
            results.append(PathResult(
                name, label, round(ms[name], 3), round(ms[name] / ms["exact"], 3),
                int(diff.max()), round(float(diff.mean()), 3),
                None if cos is None else round(float(cos.min()), 6),
                None if cos is None else round(float(cos.mean()), 6)))
        extra.setdefault("jpeg_bytes", {})[label] = {k: len(v) for k, v in images.items()}
    return results, extra


@dataclass
class DispatchResult:
    """How ImageDecoder hands a call's images to threads, for one kind of call."""

    images: str  # "32x32 PNG x1"
    dispatch: str  # "job per image" (before issue 10), "job per call", "inline"
    cpu_us_per_call: float  # every thread of the process
    cpu_ratio: float  # to "job per image"


def time_dispatch(calls: int = 300, workers: int = 2) -> list[DispatchResult]:
    """CPU us per ImageDecoder call: one pool job per image (what the gateway did before), the
    current one job per call (inline budget off), and the current default (tiny calls inline).
    The digits-s case: 32x32 PNGs to 32 px, batch 1 and 32, and 640x480 JPEGs at batch 8."""
    import asyncio

    from clipserve.loadtest.workload import builtin_images
    from clipserve.server.images import ImageDecoder

    async def per_image(decoder, images, size):  # the old dispatch: gather of one job each
        return np.stack(await asyncio.gather(*(decoder.decode_one(d, size, f"image {i}")
                                               for i, d in enumerate(images))))

    async def measure():
        found = []
        photo = benchmark_images(640, 480)["photo-temple"]
        cases = [("32x32 PNG x1", builtin_images(1, 32), 32, calls),
                 ("32x32 PNG x32", builtin_images(32, 32), 32, max(10, calls // 32)),
                 ("640x480 JPEG x8", [photo] * 8, 224, max(5, calls // 50))]
        pool = ImageDecoder(workers, 8 * workers, **LIMITS, inline_bytes=0)
        default = ImageDecoder(workers, 8 * workers, **LIMITS)
        try:
            for label, images, size, n in cases:
                variants = [("job per image", lambda: per_image(pool, images, size)),
                            ("job per call", lambda: pool.decode(images, size)),
                            ("default (inline when tiny)", lambda: default.decode(images, size))]
                cpu_us = {}
                for name, call in variants * 3:  # interleaved; the last round counts
                    await call()
                    started = time.process_time()
                    for _ in range(n):
                        await call()
                    cpu_us[name] = (time.process_time() - started) * 1e6 / n
                for name, _ in variants:
                    found.append(DispatchResult(label, name, round(cpu_us[name], 1), round(
                        cpu_us[name] / cpu_us["job per image"], 3)))
        finally:
            pool.close()
            default.close()
        return found

    return asyncio.run(measure())


def dispatch_table(results: list[DispatchResult]) -> str:
    lines = [f"{'images':<16} {'dispatch':<27} {'cpu us/call':>11} {'vs per image':>12}"]
    for r in results:
        lines.append(f"{r.images:<16} {r.dispatch:<27} {r.cpu_us_per_call:>11.1f} "
                     f"{r.cpu_ratio:>12.2f}")
    return "\n".join(lines)


def table(results: list[PathResult]) -> str:
    lines = [f"{'path':<18} {'image':>9} {'cpu ms':>7} {'vs exact':>8} {'max |dpx|':>9} "
             f"{'mean |dpx|':>10} {'cos min':>9} {'cos mean':>9}"]
    for r in results:
        cos_min = "-" if r.cosine_min is None else f"{r.cosine_min:.5f}"
        cos_mean = "-" if r.cosine_mean is None else f"{r.cosine_mean:.5f}"
        lines.append(f"{r.path:<18} {r.size:>9} {r.cpu_ms:>7.2f} {r.cpu_ratio:>8.2f} "
                     f"{r.max_abs_pixel_diff:>9} {r.mean_abs_pixel_diff:>10.3f} "
                     f"{cos_min:>9} {cos_mean:>9}")
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"pillow": Image.__version__,
                                    "libjpeg": features.version("jpg"),
                                    "libjpeg_turbo": str(features.check_feature("libjpeg_turbo"))}
    for module in ("simplejpeg", "cv2", "open_clip", "torch"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.decode_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results and machine here")
    parser.add_argument("--sizes", default="640x480,1280x960",
                        help="comma-separated WIDTHxHEIGHT of the test JPEGs")
    parser.add_argument("--model-size", type=int, default=224, help="model input side S")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3, help="passes over the images per round")
    parser.add_argument("--dispatch-calls", type=int, default=300,
                        help="calls per cell of the dispatch table at batch 1")
    parser.add_argument("--no-fidelity", action="store_true",
                        help="skip the embedding cosine (no torch/open_clip needed)")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    info = cpu.detect()
    load_before = os.getloadavg()
    results, extra = run(sizes, args.model_size, args.rounds, args.reps, not args.no_fidelity)
    dispatch = time_dispatch(args.dispatch_calls)
    load_after = os.getloadavg()
    print(f"CPU: {info.model} ({info.cores} cores usable; {info.isa()}); "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for note in extra["notes"]:
        print(f"note: {note}")
    print(table(results))
    if extra["between_images_cosine_max"]:
        print("cosine between different images' exact embeddings, max: "
              + ", ".join(f"{k}: {v:.4f}" for k, v in extra["between_images_cosine_max"].items()))
    print(dispatch_table(dispatch))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model_size": args.model_size,
            "cpu": {"model": info.model, "cores": info.cores, "flags": sorted(info.flags)},
            "python": sys.version.split()[0], "versions": _versions(),
            "loadavg_before": load_before, "loadavg_after": load_after,
            "results": [asdict(r) for r in results],
            "dispatch": [asdict(r) for r in dispatch], **extra}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
