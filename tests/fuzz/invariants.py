"""What must hold for any input on the gateway's decode and tokenise paths, shared by the
hypothesis tests (tests/unit/test_fuzz.py) and the coverage-guided atheris target
(tests/fuzz/fuzz_inputs.py).

- Image bytes: :func:`clipserve.server.images.preprocess` returns uint8 [S, S, 3] or raises
  ServingError INVALID_ARGUMENT; any other exception would reach the client as INTERNAL.
- Text: :meth:`ClipTokenizer.encode` returns one well-formed row (start token, ids, end token,
  zero padding) and a truncation flag that agrees with it.
- Both finish quickly: bounded work per item is what makes the request limits meaningful.
"""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
from PIL import Image

from clipserve.server.errors import ServingError
from clipserve.server.images import preprocess

SIZE = 24  # the endpoint's input side; small keeps each example cheap
# Small limits: the fuzzer explores the guards' edges instead of spending time on big images.
MAX_BYTES = 64 * 1024
MAX_PIXELS = 256 * 256
MAX_SECONDS = 2.0  # per item, on a loaded 2-core CI machine; typical is under 10 ms


def check_image(data: bytes) -> str:
    """Run preprocess on ``data``; returns "ok" or "invalid". Raises AssertionError when an
    invariant breaks (wrong shape or dtype, a non-INVALID_ARGUMENT status, any other exception,
    too slow)."""
    started = time.perf_counter()
    try:
        pixels = preprocess(data, SIZE, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, what="image")
    except ServingError as exc:
        assert exc.code is grpc.StatusCode.INVALID_ARGUMENT, exc
        assert exc.message.startswith("image "), exc.message
        outcome = "invalid"
    else:
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8, pixels.shape
        outcome = "ok"
    elapsed = time.perf_counter() - started
    assert elapsed < MAX_SECONDS, f"{len(data)} bytes took {elapsed:.2f} s"
    return outcome


def check_text(tokenizer, text: str) -> None:
    """Tokenise ``text``; raises AssertionError when the row or flag is malformed or slow."""
    started = time.perf_counter()
    ids, truncated = tokenizer.encode([text])
    elapsed = time.perf_counter() - started
    assert elapsed < MAX_SECONDS, f"{len(text)} characters took {elapsed:.2f} s"
    length = tokenizer.context_length
    assert ids.shape == (1, length) and ids.dtype == np.int32
    row = ids[0].tolist()
    assert row[0] == tokenizer.sot_id
    used = max(i for i, token in enumerate(row) if token != 0) + 1
    assert row[used - 1] == tokenizer.eot_id, "the last id must be end-of-text"
    assert all(0 <= token < tokenizer._tokenizer.get_vocab_size() for token in row)
    assert len(truncated) == 1
    if truncated[0]:
        assert used == length, "a truncated text fills the whole context"


def seed_images() -> list[bytes]:
    """Valid encodings of small images in every supported format and a few modes, plus formats
    the gateway refuses: starting points that mutations turn into near-valid files."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    seeds = []
    for fmt, modes in (("PNG", ("RGB", "RGBA", "L", "P", "1", "LA", "I;16")),
                       ("JPEG", ("RGB", "L", "CMYK")), ("WEBP", ("RGB", "RGBA")),
                       ("GIF", ("P",))):
        for mode in modes:
            buf = io.BytesIO()
            image = (Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
                     if mode == "I;16" else rgb.convert(mode))
            image.save(buf, format=fmt)
            seeds.append(buf.getvalue())
    animated = io.BytesIO()
    rgb.save(animated, format="PNG", save_all=True, append_images=[rgb.rotate(90)])
    seeds.append(animated.getvalue())
    return seeds
