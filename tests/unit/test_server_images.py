"""Image preprocessing: open_clip's eval transform (less normalisation) and the input guards."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.server.errors import ServingError
from clipserve.server.images import ImageDecoder, preprocess

LIMITS = dict(max_bytes=1 << 20, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def invalid(data: bytes, **limits) -> str:
    with pytest.raises(ServingError) as info:
        preprocess(data, 32, **{**LIMITS, **limits}, what="image 5")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("image 5")
    return info.value.message


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (33, 100), (20, 20), (32, 32), (31, 45)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_matches_open_clip_eval_transform(size, mode):
    transforms = pytest.importorskip("torchvision.transforms")
    img = noise(*size, mode=mode)
    reference = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32),
        lambda im: im.convert("RGB"),  # open_clip's _convert_to_rgb, after the crop
    ])(img)
    ours = preprocess(encode(img, "PNG"), 32, **LIMITS)
    assert ours.dtype == np.uint8 and ours.shape == (32, 32, 3)
    np.testing.assert_array_equal(ours, np.asarray(reference))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_supported_formats_decode(fmt):
    out = preprocess(encode(noise(40, 30), fmt), 16, **LIMITS)
    assert out.shape == (16, 16, 3)


def test_empty_image():
    assert "is empty" in invalid(b"")


def test_too_many_bytes():
    assert "at most 100 are accepted" in invalid(encode(noise(40, 30), "PNG"), max_bytes=100)


def test_corrupt_bytes():
    assert "not a decodable image" in invalid(b"\x00garbage" * 50)


def test_truncated_jpeg():
    data = encode(noise(64, 64), "JPEG")
    assert "corrupt" in invalid(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_format_is_named(fmt):
    message = invalid(encode(noise(20, 20), fmt))
    assert f"is {fmt}, which is not supported" in message
    assert "JPEG, PNG, WEBP" in message


def test_decompression_bomb_is_refused_from_the_header():
    # A 3000x3000 PNG whose pixel data is cut off: the guard must trip on the header's size
    # before any decoding (decoding would report the truncation instead).
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    message = invalid(data[:200], max_pixels=1_000_000)
    assert "3000x3000 = 9000000 pixels; at most 1000000" in message


def test_pillow_bomb_limit_is_reported_not_raised():
    huge = Image.MAX_IMAGE_PIXELS * 2 + 1  # past Pillow's own hard error
    side = int(huge ** 0.5) + 1
    data = encode(Image.new("1", (side, side)), "PNG")
    message = invalid(data[:300], max_pixels=10 ** 12)
    assert "pixels; at most 1000000000000 are accepted" in message


async def test_decoder_batches_and_names_the_first_bad_item():
    decoder = ImageDecoder(workers=2, queue_limit=2, **LIMITS)
    try:
        good = encode(noise(40, 30), "PNG")
        batch = await decoder.decode([good, good, good], 16)
        assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
        with pytest.raises(ServingError) as info:
            await decoder.decode([good, good, b"bad", b""], 16)
        assert info.value.message.startswith("image 2 ")
    finally:
        decoder.close()


def test_decode_threads_leave_the_warning_filters_alone(monkeypatch):
    # Pillow warns for images past MAX_IMAGE_PIXELS; lower it so every decode below takes
    # that path. catch_warnings inside decode threads would swap warnings.filters under this
    # thread's feet (and could restore a stale list); the process-wide policy never does.
    import threading
    import warnings

    from clipserve.server.images import install_warnings_policy

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144: warns, below 2x
    data = encode(noise(12, 12), "PNG")
    install_warnings_policy()
    before = list(warnings.filters)
    stop, seen, failures = threading.Event(), [], []

    def decode_many():
        try:
            for _ in range(200):
                assert preprocess(data, 8, max_bytes=1 << 20, max_pixels=1 << 20).shape == (
                    8, 8, 3)
        except Exception as exc:  # surfaced below
            failures.append(exc)

    def watch():
        while not stop.is_set():
            now = list(warnings.filters)
            if now != before:
                seen.append(now)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=decode_many) for _ in range(8)]
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    watcher.join()
    assert not failures
    assert not seen, f"warnings.filters changed {len(seen)} times during decoding"
    assert list(warnings.filters) == before
