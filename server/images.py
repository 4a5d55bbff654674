"""Encoded image bytes -> the uint8 NHWC pixels the image towers take.

Preprocessing is open_clip's eval transform minus the normalisation (which is inside the graph):
resize the shortest side to S with bicubic filtering, centre-crop S x S, convert to RGB, in that
order and with torchvision's rounding, so the gateway feeds Triton the same pixels the export
measured quality on. EXIF orientation is ignored, as open_clip does.

Reduced-scale JPEG decode (``reduced_jpeg``, on by default; ``--no-reduced-jpeg-decode`` or
``CLIPSERVE_REDUCED_JPEG_DECODE=0`` turns it off): a JPEG at least twice the model input on
both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT scaling, Pillow's
``Image.draft``), never below the input side S; the bicubic resize then maps the reduced image
onto the exact path's geometry and computes only the centre crop. A 640x480 photo to 224 px
decodes at 320x240 for about half the CPU of the exact path, its embedding at cosine >= 0.999
to the exact one (``python -m clipserve.loadtest.decode_bench``,
tests/unit/test_image_fidelity.py). Other formats, and JPEGs under 2 S, take the exact path.

GPU decode (an image endpoint exported with ``--gpu-decode``, its sidecar's ``gpu_decode``):
the gateway decodes nothing. :meth:`ImageDecoder.encoded` runs the same header checks (size,
format, pixel limits) and hands Triton the files themselves, zero-padded into uint8 batches
(consecutive files of similar size together, so one large file does not pad the rest to its
size), for the DALI model ahead of the tower (``clipserve.export.gpu_decode``).

Decoding is CPU work that would stall every other call on the event loop, so
:class:`ImageDecoder` runs a call's images as one job in a bounded thread pool (Pillow releases
the GIL while decoding and resampling); a call whose images are all tiny (a few KiB, few
pixels) is decoded inline, where a thread hop would cost more than the decode.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ServingError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow format names
# What Pillow raises for malformed data, besides UnidentifiedImageError (an OSError).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# Pillow's own bomb check warns between MAX_IMAGE_PIXELS and twice that (and raises past it);
# our max_pixels check is the policy, so its warning is noise. The filter is process-wide, set
# once: warnings.catch_warnings swaps the process's filter list and puts it back on exit, so
# entered from several decode threads at once it can restore another thread's state (and
# drop filters set meanwhile by anyone else).
_BOMB_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def install_warnings_policy() -> None:
    """Ignore Pillow's DecompressionBombWarning process-wide (idempotent). Called when an
    :class:`ImageDecoder` is made and before each decode, so a caller that reset the filters
    (a test harness's catch_warnings) gets it back; it only adds the filter when missing."""
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _sniff_format(data: bytes) -> str | None:
    """The Pillow format name of data we refuse to decode, for a helpful message."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # anything unreadable just gets the generic message
        return None


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    # torchvision.transforms.functional._compute_resized_output_size for an int size.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _reduced_resize_center_crop(img: Image.Image, size: int, source: tuple[int, int],
                                box: tuple[float, float, float, float]) -> np.ndarray:
    """:func:`resize_center_crop` of an image decoded at reduced scale: ``source`` is the
    file's full size and ``box`` where that full extent lies in ``img`` (``Image.draft``'s
    answer). The resize maps ``img`` onto the exact path's geometry and computes only the
    crop: ``resize(box=crop)`` gives the same sample positions and filter support as resizing
    everything and cropping after (equal to within 1 grey level on <0.1% of values)."""
    width, height = source
    new_w, new_h = _resized_size(width, height, size)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = box[2] / new_w, box[3] / new_h  # reduced-image pixels per resized pixel
    crop = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shortest side to ``size`` (bicubic), centre crop, RGB: uint8 array [size, size, 3]."""
    width, height = img.size
    new_size = _resized_size(width, height, size)
    if new_size != (width, height):
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    width, height = img.size
    # Crop and convert only when they change something: on an image already S x S RGB (a
    # digit at its model's input size) each would copy the pixels unchanged.
    if (width, height) != (size, size):
        top = int(round((height - size) / 2.0))
        left = int(round((width - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


class Deferred(Exception):
    """Raised by :func:`preprocess` with ``defer_above_pixels`` for an image with more pixels
    than that: the caller was decoding inline and should hand the image to a thread."""


def _open_checked(data: bytes, size: int, *, max_bytes: int, max_pixels: int,
                  what: str) -> Image.Image:
    """Open ``data`` (header only) and apply the limits: the cheap checks every image gets,
    on the CPU path before decoding and on the GPU path before the bytes go to Triton. The
    caller closes the image. Raises ServingError (INVALID_ARGUMENT) naming ``what``."""
    if not data:
        raise ServingError.invalid_argument(f"{what} is empty")
    if len(data) > max_bytes:
        raise ServingError.invalid_argument(
            f"{what} is {len(data)} bytes; at most {max_bytes} are accepted")
    supported = ", ".join(SUPPORTED_FORMATS)
    install_warnings_policy()
    try:
        # Pillow's own bomb check warns (or raises past 2x its limit); ours below is the policy.
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        fmt = _sniff_format(data)
        if fmt is not None:
            raise ServingError.invalid_argument(
                f"{what} is {fmt}, which is not supported; send {supported}") from None
        raise ServingError.invalid_argument(
            f"{what} is not a decodable image (corrupt, or not {supported})") from None
    except Image.DecompressionBombError:
        # Past twice Pillow's own limit it refuses to even open the file.
        raise ServingError.invalid_argument(
            f"{what} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; at most {max_pixels} "
            "are accepted") from None
    except _CORRUPT as exc:
        # A recognised format whose header breaks off or lies (a truncated JPEG or WebP).
        raise ServingError.invalid_argument(f"{what} is corrupt: {exc}") from None
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise ServingError.invalid_argument(
                f"{what} is {width}x{height} = {width * height} pixels; at most {max_pixels} "
                "are accepted")
        if width < 1 or height < 1:
            raise ServingError.invalid_argument(f"{what} has no pixels ({width}x{height})")
        # A long thin image is small, but resizing its short side up to S makes the other
        # side huge (1x40000 at S=224: 224x8960000): bound the resized image too.
        resized_w, resized_h = _resized_size(width, height, size)
        if resized_w * resized_h > max_pixels:
            raise ServingError.invalid_argument(
                f"{what} is {width}x{height}: with its short side resized to {size} it would "
                f"have {resized_w}x{resized_h} pixels; at most {max_pixels} are accepted "
                "(crop extreme aspect ratios first)")
    except BaseException:
        img.close()
        raise
    return img


def preprocess(data: bytes, size: int, *, max_bytes: int, max_pixels: int,
               what: str = "image", reduced_jpeg: bool = True,
               defer_above_pixels: int | None = None) -> np.ndarray:
    """Decode one encoded image and preprocess it to uint8 [size, size, 3].

    Args:
        data: the encoded file (JPEG, PNG or WebP).
        size: the endpoint's input side S.
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted width*height, read from the header before decoding.
        what: how messages name the item ("image 3").
        reduced_jpeg: decode a JPEG at least 2 S on both sides at a reduced scale (see the
            module docstring); False: always the exact path.
        defer_above_pixels: raise :class:`Deferred` after the header checks when the image has
            more pixels than this (inline decoding's budget); None: no limit.

    Raises:
        ServingError: INVALID_ARGUMENT for empty, oversized, unsupported or corrupt data.
        Deferred: see ``defer_above_pixels``.
    """
    img = _open_checked(data, size, max_bytes=max_bytes, max_pixels=max_pixels, what=what)
    with img:
        width, height = img.size
        if defer_above_pixels is not None and width * height > defer_above_pixels:
            raise Deferred(what)
        try:
            # libjpeg DCT scaling: at most 1/8, keeping both sides >= size. None when the file
            # cannot be drafted (several tiles); a box of the full size when no scale fits.
            drafted = (img.draft(img.mode, (size, size))
                       if reduced_jpeg and img.format == "JPEG" else None)
            img.load()
            if drafted is not None and img.size != (width, height):
                return _reduced_resize_center_crop(img, size, (width, height), drafted[1])
            if img.mode.startswith("I;16"):
                # Pillow's RGB conversion clips 16-bit grey at 255, turning most of an image
                # white; keep the high byte, as Pillow does for 16-bit colour.
                img = Image.fromarray(
                    (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
            return resize_center_crop(img, size)
        except (*_CORRUPT, Image.DecompressionBombError) as exc:
            # Pillow reports truncated and malformed data as OSError/SyntaxError/ValueError.
            raise ServingError.invalid_argument(f"{what} is corrupt: {exc}") from None


# DALI decodes simple WebP files only (lossy "VP8 " or lossless "VP8L" as the first chunk);
# an extended one (VP8X: alpha, animation, metadata) would fail the whole batch in Triton.
_SIMPLE_WEBP = (b"VP8 ", b"VP8L")


def check_encoded(data: bytes, size: int, *, max_bytes: int, max_pixels: int,
                  what: str = "image") -> None:
    """The checks an image gets before its encoded bytes go to Triton for GPU decoding: those
    of :func:`preprocess` up to the decode (size, format, pixel limits, all from the header),
    plus what the GPU decoder cannot take. Nothing is decoded.

    Raises:
        ServingError: INVALID_ARGUMENT, as :func:`preprocess`, or for an extended WebP.
    """
    with _open_checked(data, size, max_bytes=max_bytes, max_pixels=max_pixels,
                       what=what) as img:
        if img.format == "WEBP" and data[12:16] not in _SIMPLE_WEBP:
            raise ServingError.invalid_argument(
                f"{what} is an extended WebP (alpha, animation or metadata), which this "
                "endpoint's GPU decoder cannot read; send JPEG, PNG or a simple WebP")


def pack_encoded(images: Sequence[bytes]) -> np.ndarray:
    """Encoded files as one uint8 [n, longest] batch, zero-padded at the end (Triton takes one
    shape per request; the decoders stop at the end of each image)."""
    batch = np.zeros((len(images), max(len(d) for d in images)), np.uint8)
    for row, data in zip(batch, images):
        row[:len(data)] = np.frombuffer(data, np.uint8)
    return batch


# Padding slack per group: below this, a few small files of unequal length share a request.
_GROUP_SLACK = 64 * 1024


def pack_encoded_groups(images: Sequence[bytes]) -> list[np.ndarray]:
    """Consecutive files, in order, as padded batches (:func:`pack_encoded`) each at most twice
    its files' bytes plus 64 KiB: one batch for files of similar size, but one 16 MiB file
    among 63 tiny ones does not pad them all to 16 MiB (a 1 GiB batch from a 16 MiB call).
    Triton's dynamic batcher puts the groups of a call back together (ragged input)."""
    groups: list[np.ndarray] = []
    start, total, longest = 0, 0, 0
    for i, data in enumerate(images):
        wider = max(longest, len(data))
        if i > start and wider * (i - start + 1) > 2 * (total + len(data)) + _GROUP_SLACK:
            groups.append(pack_encoded(images[start:i]))
            start, total, wider = i, 0, len(data)
        total += len(data)
        longest = wider
    groups.append(pack_encoded(images[start:]))
    return groups


class ImageDecoder:
    """Preprocess a call's images off the event loop: one thread-pool job per call.

    A thread hop costs more than decoding a tiny image, and one job per image costs a hop
    each: so a call whose encoded images total at most ``inline_bytes`` is decoded on the
    calling thread (the event loop) as long as each image has at most ``inline_pixels``
    pixels (read from its header; the first larger one sends itself and the rest to the
    pool), and any other call is one pool job, or ``workers`` jobs of consecutive images when
    it has more images than that, so one large batch still uses every decode thread.

    Args:
        workers: threads decoding at once.
        queue_limit: jobs submitted but not finished before further ones wait (keeps a flood
            of calls from queueing unbounded work and memory).
        max_bytes, max_pixels: per-image limits, see :func:`preprocess`.
        reduced_jpeg: reduced-scale JPEG decode, see :func:`preprocess`.
        inline_bytes, inline_pixels: the inline budget above (0: never inline).
    """

    def __init__(self, workers: int, queue_limit: int, max_bytes: int, max_pixels: int, *,
                 reduced_jpeg: bool = True, inline_bytes: int = 16 * 1024,
                 inline_pixels: int = 128 * 128):
        install_warnings_policy()
        self._workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(max(queue_limit, self._workers))
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._reduced_jpeg = reduced_jpeg
        self._inline_bytes = inline_bytes
        self._inline_pixels = inline_pixels

    def _preprocess(self, data: bytes, size: int, what: str,
                    defer_above_pixels: int | None = None) -> np.ndarray:
        return preprocess(data, size, max_bytes=self._max_bytes, max_pixels=self._max_pixels,
                          what=what, reduced_jpeg=self._reduced_jpeg,
                          defer_above_pixels=defer_above_pixels)

    def _decode_run(self, images: Sequence[bytes], first: int, size: int,
                    names: Sequence[str] | None) -> list[np.ndarray]:
        """images[i] for i in order (a pool job); the first failure ends the job."""
        return [self._preprocess(data, size, names[first + i] if names else
                                 f"image {first + i}")
                for i, data in enumerate(images)]

    async def _in_pool(self, images: Sequence[bytes], first: int, size: int,
                       names: Sequence[str] | None, waits: list[float] | None
                       ) -> list[np.ndarray]:
        queued = time.perf_counter()

        def job() -> list[np.ndarray]:
            if waits is not None:
                waits.append(time.perf_counter() - queued)  # list.append is thread-safe
            return self._decode_run(images, first, size, names)

        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def decode_one(self, data: bytes, size: int, what: str = "image",
                         waits: list[float] | None = None) -> np.ndarray:
        """One image -> uint8 [size, size, 3]; raises ServingError (INVALID_ARGUMENT) whose
        message names the item as ``what``. With ``waits``, appends the seconds the image
        waited for a slot and a thread before its decoding started (for metrics; 0 when
        decoded inline)."""
        return (await self._decode([data], size, [what], waits))[0]

    async def decode(self, images: Sequence[bytes], size: int,
                     waits: list[float] | None = None) -> np.ndarray:
        """A batch -> uint8 [n, size, size, 3]. The lowest-numbered failure is raised
        (ServingError, naming "image i"), so the message is deterministic. ``waits``: see
        :meth:`decode_one`."""
        return np.stack(await self._decode(images, size, None, waits))

    async def _decode(self, images: Sequence[bytes], size: int, names: Sequence[str] | None,
                      waits: list[float] | None) -> list[np.ndarray]:
        done: list[np.ndarray] = []
        if sum(len(data) for data in images) <= self._inline_bytes:
            try:
                for i, data in enumerate(images):
                    done.append(self._preprocess(data, size,
                                                 names[i] if names else f"image {i}",
                                                 self._inline_pixels))
                if waits is not None:
                    waits.append(0.0)
                return done
            except Deferred:  # a tiny file with many pixels: it and the rest go to the pool
                pass
        rest = images[len(done):]
        jobs = min(self._workers, len(rest))
        if jobs == 1:
            return done + await self._in_pool(rest, len(done), size, names, waits)
        bounds = [len(rest) * j // jobs for j in range(jobs + 1)]
        results = await asyncio.gather(
            *(self._in_pool(rest[lo:hi], len(done) + lo, size, names, waits)
              for lo, hi in zip(bounds, bounds[1:])),
            return_exceptions=True)
        for result in results:  # chunks are in order: the first failure is the lowest index
            if isinstance(result, BaseException):
                raise result
            done.extend(result)
        return done

    def encoded(self, images: Sequence[bytes], size: int,
                names: Sequence[str] | None = None) -> list[np.ndarray]:
        """For an endpoint that decodes on the GPU: check each image's header
        (:func:`check_encoded`, inline: nothing is decoded) and return what Triton gets, the
        files in order as zero-padded uint8 [n, longest] batches
        (:func:`pack_encoded_groups`). The lowest-numbered failure is raised (ServingError,
        naming "image i" or ``names[i]``)."""
        for i, data in enumerate(images):
            check_encoded(data, size, max_bytes=self._max_bytes, max_pixels=self._max_pixels,
                          what=names[i] if names else f"image {i}")
        return pack_encoded_groups(images)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
