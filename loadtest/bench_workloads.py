"""The benchmark's workloads (``bench --workloads``): which call, with which inputs, and how a
client of raw Triton makes the same call.

- ``png``: EmbedImages of the built-in digits, PNG at the model's input size (the precision
  sweep: every precision, the targets' workload).
- ``jpeg``: EmbedImages of 640x480 photo-like JPEGs (quality 90, made offline by
  :func:`.workload.photo_jpegs`): what real traffic sends, where decoding dominates.
- ``text``: EmbedTexts of the built-in captions (tokenized per call on both sides).
- ``classify``: Classify of the built-in digit PNGs against the endpoint's label set
  (Triton direct: the image tower, then the same cosine-softmax against label embeddings it
  computed once, as the gateway's label cache does).

Every workload sends single-item calls. On Triton direct the client does what the gateway
does before Triton (decode and resize with the gateway's own decoder, tokenize with the same
tokenizer), in its own process, so both sides pay for input preparation. Separately,
:func:`prep_ms_per_item` measures that preparation on one thread of this process, so the
report can show the gateway's CPU with it taken out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from clipserve.endpoints import Precision, Tower, endpoint_name

from . import workload as wl

PNG = "png"  # the precision sweep's workload


@dataclass(frozen=True)
class WorkloadSpec:
    """One named workload: the call kind and a line for the report."""

    name: str
    kind: str  # loadtest.workload.KINDS
    description: str


WORKLOADS = {w.name: w for w in (
    WorkloadSpec(PNG, "image", "EmbedImages, built-in digits as PNG at the model's input size"),
    WorkloadSpec("jpeg", "image", "EmbedImages, 640x480 photo-like JPEGs (quality 90)"),
    WorkloadSpec("text", "text", "EmbedTexts, built-in captions"),
    WorkloadSpec("classify", "classify", "Classify, built-in digits as PNG, the endpoint's "
                                         "default label set"),
)}
PHOTO_SIZE = (640, 480)


def check_names(names: Sequence[str]) -> None:
    """Raises ValueError naming the valid workloads when one of ``names`` is unknown."""
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; valid: "
                         f"{', '.join(WORKLOADS)}")


@dataclass(frozen=True)
class GpuRate:
    """The items/s one GPU's Triton is assumed to serve: ``value`` items/s, or with
    ``factor`` ``value`` times the Triton-direct throughput measured in the run."""

    value: float
    factor: bool = False

    def items_per_s(self, measured: float | None) -> float | None:
        return (self.value * measured if measured else None) if self.factor else self.value

    def describe(self) -> str:
        return (f"{self.value:g}x the Triton-direct rate measured here" if self.factor
                else f"{self.value:g} items/s")


def parse_gpu_rates(entries: Sequence[str]) -> dict[str, GpuRate]:
    """``("ViT-B-32=3000", "ViT-B-32:text=x40")`` -> {"ViT-B-32": GpuRate(3000), ...}: the
    items/s one GPU is assumed to serve, by scale or scale:workload (the latter wins); ``xF``
    means F times the Triton-direct throughput measured in the run.

    Raises:
        ValueError: an entry that is not KEY=N or KEY=xF with a positive number, or an
            unknown workload.
    """
    rates = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        factor = value[:1].lower() == "x"
        try:
            rate = float(value[1:] if factor else value)
        except ValueError:
            rate = -1.0
        if not sep or not key or not rate > 0:
            raise ValueError(f"--gpu-items-per-s entries are SCALE[:WORKLOAD]=ITEMS_PER_S (or "
                             f"=xFACTOR of the measured Triton rate) with a positive number, "
                             f"got {entry!r}")
        if ":" in key:
            check_names([key.split(":", 1)[1]])
        rates[key] = GpuRate(rate, factor)
    return rates


def gpu_rate(rates: dict[str, GpuRate], scale: str, workload: str) -> GpuRate | None:
    """The assumed GPU rate for ``workload`` on ``scale`` (None: none given)."""
    return rates.get(f"{scale}:{workload}", rates.get(scale))


@dataclass(frozen=True)
class Inputs:
    """A workload's inputs for one model and how to reach it."""

    spec: WorkloadSpec
    images: tuple[bytes, ...] = ()
    texts: tuple[str, ...] = ()

    @property
    def bytes_mean(self) -> float | None:
        return float(np.mean([len(d) for d in self.images])) if self.images else None

    def workload(self, metadata: tuple[tuple[str, str], ...] = ()) -> wl.Workload:
        return wl.Workload({self.spec.kind: 1.0}, self.images, self.texts, metadata=metadata)


def inputs(name: str, png_images: Sequence[bytes], photo_count: int = 16) -> Inputs:
    """The inputs of workload ``name`` (``png_images``: the digits at the model's size)."""
    spec = WORKLOADS[name]
    if name == "jpeg":
        return Inputs(spec, images=tuple(wl.photo_jpegs(photo_count, *PHOTO_SIZE)))
    if name == "text":
        return Inputs(spec, texts=tuple(wl.builtin_texts()))
    return Inputs(spec, images=tuple(png_images))


def skip_reason(name: str, catalog, scale: str, precision: Precision) -> str:
    """Why workload ``name`` cannot run on this endpoint ("" when it can)."""
    kind = WORKLOADS[name].kind
    if kind in ("text", "classify") and not catalog.has(scale, precision, Tower.TEXT):
        return f"no text endpoint for {scale} {precision.value}"
    if kind == "classify":
        sidecar = catalog.get(scale, precision, Tower.IMAGE).sidecar
        if not sidecar.labels or sidecar.temperature is None or sidecar.ood_threshold is None:
            return (f"endpoint {endpoint_name(scale, precision, Tower.IMAGE)} has no default "
                    "label set or fitted temperature, so Classify needs them per call")
    return ""


def tokenizer_for(catalog, scale: str, precision: Precision):
    from clipserve.tokenizer import ClipTokenizer

    spec = catalog.get(scale, precision, Tower.TEXT)
    return ClipTokenizer.from_file(spec.tokenizer_path, spec.sidecar.context_length)


def triton_factory(name: str, catalog, scale: str, precision: Precision, url: str,
                   decode_per_call: bool = True) -> Callable:
    """A zero-argument factory of the Triton-direct target for workload ``name``."""
    from .targets import TritonTarget

    kind = WORKLOADS[name].kind
    image = catalog.get(scale, precision, Tower.IMAGE)
    size = image.sidecar.image_size
    model = endpoint_name(scale, precision, Tower.IMAGE)
    if kind == "image":
        return lambda: TritonTarget(url, model, size, decode_per_call=decode_per_call)
    tokenizer = tokenizer_for(catalog, scale, precision)
    text_model = endpoint_name(scale, precision, Tower.TEXT)
    if kind == "text":
        return lambda: TritonTarget(url, "", size, text_model=text_model, tokenizer=tokenizer)
    sidecar = image.sidecar
    return lambda: TritonTarget(url, model, size, decode_per_call=decode_per_call,
                                text_model=text_model, tokenizer=tokenizer,
                                labels=tuple(sidecar.labels),
                                prompts=tuple(sidecar.prompts or ["{}"]),
                                temperature=sidecar.temperature)


def stats_model(name: str, scale: str, precision: Precision) -> str:
    """The Triton model whose statistics describe workload ``name``'s calls."""
    tower = Tower.TEXT if WORKLOADS[name].kind == "text" else Tower.IMAGE
    return endpoint_name(scale, precision, tower)


def prep_ms_per_item(data: Inputs, image_size: int, tokenizer=None,
                     min_seconds: float = 0.3) -> float:
    """CPU ms per item of the gateway's input preparation on one thread of this process:
    ``preprocess`` (decode, reduced-scale JPEG, resize, crop) for images, the tokenizer for
    texts, one item at a time as the single-item calls send them."""
    from clipserve.server.images import preprocess

    if data.texts:
        if tokenizer is None:
            raise ValueError("a text workload's preparation needs its tokenizer")
        items: Sequence = data.texts

        def prep(text):
            tokenizer.encode([text])
    else:
        items = data.images

        def prep(image):
            preprocess(image, image_size, max_bytes=1 << 26, max_pixels=1 << 28)
    for item in items[:4]:  # warm caches and lazy imports
        prep(item)
    count, start = 0, time.process_time()
    while True:
        for item in items:
            prep(item)
        count += len(items)
        elapsed = time.process_time() - start
        if elapsed >= min_seconds:
            return round(elapsed * 1000 / count, 4)
