"""Encoded image bytes -> the uint8 NHWC pixels the image towers take.

Preprocessing is open_clip's eval transform minus the normalisation (which is inside the graph):
resize the shortest side to S with bicubic filtering, centre-crop S x S, convert to RGB, in that
order and with torchvision's rounding, so the gateway feeds Triton the same pixels the export
measured quality on. EXIF orientation is ignored, as open_clip does.

Decoding is CPU work that would stall every other call on the event loop, so
:class:`ImageDecoder` runs it in a bounded thread pool (Pillow releases the GIL while decoding
and resampling).
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


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shortest side to ``size`` (bicubic), centre crop, RGB: uint8 array [size, size, 3]."""
    width, height = img.size
    new_size = _resized_size(width, height, size)
    if new_size != (width, height):
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    width, height = img.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def preprocess(data: bytes, size: int, *, max_bytes: int, max_pixels: int,
               what: str = "image") -> np.ndarray:
    """Decode one encoded image and preprocess it to uint8 [size, size, 3].

    Args:
        data: the encoded file (JPEG, PNG or WebP).
        size: the endpoint's input side S.
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted width*height, read from the header before decoding.
        what: how messages name the item ("image 3").

    Raises:
        ServingError: INVALID_ARGUMENT for empty, oversized, unsupported or corrupt data.
    """
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
    with img:
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
        try:
            img.load()
            if img.mode.startswith("I;16"):
                # Pillow's RGB conversion clips 16-bit grey at 255, turning most of an image
                # white; keep the high byte, as Pillow does for 16-bit colour.
                img = Image.fromarray(
                    (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
            return resize_center_crop(img, size)
        except (*_CORRUPT, Image.DecompressionBombError) as exc:
            # Pillow reports truncated and malformed data as OSError/SyntaxError/ValueError.
            raise ServingError.invalid_argument(f"{what} is corrupt: {exc}") from None


class ImageDecoder:
    """Preprocess batches of images in a bounded thread pool, off the event loop.

    Args:
        workers: threads decoding at once.
        queue_limit: images submitted but not finished before further ones wait (keeps a
            flood of calls from queueing unbounded work and memory).
        max_bytes, max_pixels: per-image limits, see :func:`preprocess`.
    """

    def __init__(self, workers: int, queue_limit: int, max_bytes: int, max_pixels: int):
        install_warnings_policy()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(max(queue_limit, workers))
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels

    async def decode_one(self, data: bytes, size: int, what: str = "image",
                         waits: list[float] | None = None) -> np.ndarray:
        """One image -> uint8 [size, size, 3]; raises ServingError (INVALID_ARGUMENT) whose
        message names the item as ``what``. With ``waits``, appends the seconds the image
        waited for a slot and a thread before its decoding started (for metrics)."""
        queued = time.perf_counter()

        def work() -> np.ndarray:
            if waits is not None:
                waits.append(time.perf_counter() - queued)  # list.append is thread-safe
            return preprocess(data, size, max_bytes=self._max_bytes,
                              max_pixels=self._max_pixels, what=what)

        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, work)

    async def decode(self, images: Sequence[bytes], size: int,
                     waits: list[float] | None = None) -> np.ndarray:
        """A batch -> uint8 [n, size, size, 3]. Every item is tried; the lowest-numbered failure
        is raised (ServingError), so the message is deterministic. ``waits``: see
        :meth:`decode_one`."""
        if len(images) == 1:  # one image: no gather and no Task around it
            return (await self.decode_one(images[0], size, "image 0", waits))[None]
        results = await asyncio.gather(
            *(self.decode_one(data, size, f"image {i}", waits)
              for i, data in enumerate(images)),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
