"""Bad input against the real gateway in front of the real tritonserver.

Every case gets a precise status (never INTERNAL or UNKNOWN), its message says what was wrong
(and which item), nothing is logged as an unexpected error, and the server keeps serving: a
good call succeeds after each case. Images the gateway can use (animated: first frame; 16-bit,
CMYK, palette: converted) are served, and the suite checks they are.

Cases already covered in test_gateway.py (empty image batch, 65 images, junk bytes, GIF, a
header-only bomb, unknown precision or scale) are not repeated here.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.server.config import ServerConfig
from clipserve.server.v1 import clipserve_pb2 as pb
from tests.integration.test_gateway import GatewayThread

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0
MAX_IMAGE_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
IA = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK


# -- image makers ------------------------------------------------------------------------------

def noise(width=40, height=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_raw(width: int, height: int, depth: int, colour: int, rows: Callable[[int], bytes],
            height_rows: int | None = None) -> bytes:
    """A PNG written by hand (streamed through zlib, so a 20000x20000 bomb costs no memory)."""
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(height if height_rows is None else height_rows):
        parts.append(compressor.compress(b"\x00" + rows(y)))
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def bomb(side: int) -> bytes:
    """A real decompression bomb: side x side black grey pixels, a few hundred KB of zlib."""
    row = bytes(side)
    return png_raw(side, side, 8, 0, lambda y: row)


def png_bad_crc() -> bytes:
    data = bytearray(encode(noise(), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def png_16bit_grey() -> bytes:
    ramp = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def png_16bit_rgb() -> bytes:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (30, 40 * 3), dtype=np.uint16).astype(">u2")
    return png_raw(40, 30, 16, 2, lambda y: pixels[y].tobytes())


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG whose frame header declares width x height, with no scan data."""
    valid = encode(noise(8, 8), "JPEG")
    sof = valid.index(b"\xff\xc0")
    return (valid[:sof + 5] + struct.pack(">HH", height, width) + valid[sof + 9:])


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP (VP8L) header declaring width x height (14-bit fields), no image data."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated(fmt: str) -> bytes:
    first, second = noise(seed=3), noise(seed=4)
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display (ignored, as open_clip does)
    return encode(noise(), "JPEG", exif=exif.tobytes())


GOOD = encode(noise(), "PNG")


# -- raw messages (what a broken or hostile client can put on the wire) ------------------------

def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    out, size = bytearray([number << 3 | 2]), len(payload)
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(out + payload)


# -- the cases -------------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad (or odd) input. ``request`` is a message, or raw bytes sent as the method's body;
    for EmbedStream a list of requests."""

    method: str
    request: object
    code: grpc.StatusCode
    fragment: str = ""
    metadata: tuple = ()
    timeout: float = TIMEOUT_S
    check: Callable | None = field(default=None, repr=False)  # on the response, when OK


def images(*data: bytes) -> pb.EmbedImagesRequest:
    return pb.EmbedImagesRequest(images=list(data))


def texts(*values: str) -> pb.EmbedTextsRequest:
    return pb.EmbedTextsRequest(texts=list(values))


def classify(labels=(), templates=(), n_images=1) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[GOOD] * n_images, labels=list(labels),
                              prompt_templates=list(templates))


def first_frame_is_used(fmt: str):
    def check(gw, response):
        still = gw.embed.EmbedImages(images(encode(noise(seed=3), "PNG")), timeout=TIMEOUT_S)
        got, want = np.array(response.embeddings[0].values), np.array(still.embeddings[0].values)
        cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        # Lossy WebP changes pixels a little; the second frame would be a different image.
        assert cosine > (0.99 if fmt == "PNG" else 0.9), cosine
    return check


def truncated_flags(*flags: bool):
    def check(gw, response):
        assert [e.truncated for e in response.embeddings] == list(flags)
    return check


def served_by(precision: int):
    def check(gw, response):
        assert response.endpoint.precision == precision, response.endpoint
    return check


def stream_items(expected: dict):
    def check(gw, responses):
        got = {r.id: (grpc.StatusCode.OK.value[0] if r.HasField("embedding") else r.error.code)
               for r in responses}
        assert got == {k: v.value[0] for k, v in expected.items()}, responses
    return check


_PNG = encode(noise(), "PNG")
_JPEG = encode(noise(200, 150), "JPEG", quality=90)
_WEBP = encode(noise(), "WEBP")
_LONG = "a photo of the digit seven " * 400  # 10800 characters

CASES = {
    # images: empty, truncated, corrupt, wrong format
    "zero-size image": Case("EmbedImages", images(b""), IA, "image 0 is empty"),
    "zero-size second image": Case("EmbedImages", images(GOOD, b""), IA, "image 1 is empty"),
    "truncated PNG": Case("EmbedImages", images(_PNG[:len(_PNG) // 2]), IA, "image 0 is corrupt"),
    "truncated JPEG header": Case("EmbedImages", images(_JPEG[:300]), IA, "image 0 is corrupt"),
    "truncated JPEG scan": Case("EmbedImages", images(_JPEG[:len(_JPEG) // 2]), IA,
                                "image 0 is corrupt"),
    "truncated WebP": Case("EmbedImages", images(_WEBP[:40]), IA, "image 0 is"),
    "PNG with a bad CRC": Case("EmbedImages", images(png_bad_crc()), IA, "image 0 is"),
    "PNG signature only": Case("EmbedImages", images(_PNG[:8]), IA, "image 0 is"),
    "text file": Case("EmbedImages", images(b"hello, I am not an image\n"), IA,
                      "image 0 is not a decodable image"),
    "TIFF": Case("EmbedImages", images(encode(noise(), "TIFF")), IA,
                 "image 0 is TIFF, which is not supported"),
    "BMP": Case("EmbedImages", images(encode(noise(), "BMP")), IA,
                "image 0 is BMP, which is not supported"),
    "animated GIF": Case("EmbedImages", images(animated("GIF")), IA,
                         "image 0 is GIF, which is not supported"),
    "zero-width PNG": Case("EmbedImages", images(png_raw(0, 10, 8, 0, lambda y: b"")), IA,
                           "image 0 is"),
    # images: bombs and huge dimensions
    "PNG bomb 8000x8000": Case("EmbedImages", images(bomb(8000)), IA,
                               "image 0 is 8000x8000 = 64000000 pixels; at most 40000000"),
    "PNG bomb 20000x20000": Case("EmbedImages", images(bomb(20000)), IA,
                                 "image 0 has more than"),
    "JPEG declaring 65500x65500": Case("EmbedImages", images(jpeg_declaring(65500, 65500)), IA,
                                       "image 0 has more than"),
    "WebP declaring 16384x16384": Case("EmbedImages", images(webp_declaring(16384, 16384)), IA,
                                       "image 0"),
    "1x40000 sliver": Case("EmbedImages", images(png_raw(1, 40000, 8, 0, lambda y: b"\x80")), IA,
                           "with its short side resized to 32 it would have"),
    "image over max_image_bytes": Case("EmbedImages", images(_PNG + bytes(MAX_IMAGE_BYTES)), IA,
                                       f"at most {MAX_IMAGE_BYTES} are accepted"),
    # images the gateway can use
    "animated PNG": Case("EmbedImages", images(animated("PNG")), OK,
                         check=first_frame_is_used("PNG")),
    "animated WebP": Case("EmbedImages", images(animated("WEBP")), OK,
                          check=first_frame_is_used("WEBP")),
    "16-bit grey PNG": Case("EmbedImages", images(png_16bit_grey()), OK),
    "16-bit RGB PNG": Case("EmbedImages", images(png_16bit_rgb()), OK),
    "CMYK JPEG": Case("EmbedImages", images(encode(noise().convert("CMYK"), "JPEG")), OK),
    "grey JPEG": Case("EmbedImages", images(encode(noise().convert("L"), "JPEG")), OK),
    "palette PNG with transparency": Case(
        "EmbedImages", images(encode(noise().convert("P"), "PNG", transparency=0)), OK),
    "1-bit PNG": Case("EmbedImages", images(encode(noise().convert("1"), "PNG")), OK),
    "1x1 PNG": Case("EmbedImages", images(encode(noise(1, 1), "PNG")), OK),
    "EXIF-rotated JPEG": Case("EmbedImages", images(exif_rotated_jpeg()), OK),
    # batches and message size
    "empty text batch": Case("EmbedTexts", texts(), IA, "texts is empty"),
    "65 texts": Case("EmbedTexts", texts(*["x"] * 65), IA, "65 texts in one call; at most 64"),
    "65 images to Classify": Case("Classify", classify(n_images=65), IA,
                                  "65 images in one call; at most 64"),
    "message over max_message_bytes": Case("EmbedTexts", texts(*["x" * 9000] * 500),
                                           grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    # text
    "text over max_text_chars": Case("EmbedTexts", texts("ok", "y" * 10_001), IA,
                                     "text 1 is 10001 characters; at most 10000"),
    "long text within the limit": Case("EmbedTexts", texts(_LONG[:10_000], "short"), OK,
                                       check=truncated_flags(True, False)),
    "empty text": Case("EmbedTexts", texts(""), OK, check=truncated_flags(False)),
    "whitespace, NUL and control characters": Case("EmbedTexts", texts(" \t\n", "\x00\x01\x7f"),
                                                   OK),
    "emoji, RTL override, zero-width, combining": Case(
        "EmbedTexts", texts("\U0001f600" * 50, "\u202eevil\u202c", "\u200b\u200d", "e\u0301"),
        OK),
    "special tokens spelled out": Case("EmbedTexts", texts("<end_of_text><start_of_text>"), OK),
    "HTML entities and mojibake": Case("EmbedTexts", texts("&amp;" * 500, "Ã©" * 500), OK),
    "non-UTF-8 text (raw)": Case("EmbedTexts", field_bytes(1, b"caf\xe9 \xff\xfe"), IA,
                                 "not a valid message"),
    "non-UTF-8 label (raw)": Case("Classify", field_bytes(1, GOOD) + field_bytes(2, b"\xc3\x28")
                                  + field_bytes(2, b"two"), IA, "not a valid message"),
    "non-UTF-8 stream text (raw)": Case("EmbedStream", [field_bytes(1, b"a")
                                                        + field_bytes(3, b"\xed\xa0\x80")],
                                        IA, "not a valid message"),
    # Classify labels and templates
    "one label": Case("Classify", classify(["cat"]), IA, "1 label(s); classification needs"),
    "repeated label": Case("Classify", classify(["cat", "dog", "cat"]), IA,
                           "label 2 ('cat') repeats label 0"),
    "empty label": Case("Classify", classify(["cat", " "]), IA, "label 1 is empty"),
    "label over max_text_chars": Case("Classify", classify(["cat", "d" * 10_001]), IA,
                                      "label 1 is 10001 characters"),
    "template without {}": Case("Classify", classify(["cat", "dog"], ["a photo"]), IA,
                                "prompt template 0 ('a photo') has no {}"),
    "labels x templates over max_labels": Case(
        "Classify", classify([f"l{i}" for i in range(501)], ["a {}", "the {}"]), IA,
        "501 labels x 2 prompt templates = 1002 prompts; at most 1000"),
    # the stream
    "stream item with neither image nor text": Case(
        "EmbedStream",
        [pb.EmbedStreamRequest(id="empty"), pb.EmbedStreamRequest(id="ok", text="a")],
        OK, check=stream_items({"empty": IA, "ok": OK})),
    "stream item over max_image_bytes": Case(
        "EmbedStream", [pb.EmbedStreamRequest(id="big", image=_PNG + bytes(MAX_IMAGE_BYTES)),
                        pb.EmbedStreamRequest(id="ok", image=GOOD)],
        OK, check=stream_items({"big": IA, "ok": OK})),
    # malformed messages
    "truncated protobuf": Case("EmbedTexts", field_bytes(1, b"abcdef")[:-3], IA,
                               "not a valid message"),
    "garbage protobuf": Case("EmbedImages", b"\xff" * 32, IA, "not a valid message"),
    "image bytes in a string field": Case("EmbedTexts", pb.ClassifyRequest(
        images=[GOOD]).SerializeToString(), IA, "not a valid message"),
    "wrong wire type (varint for texts)": Case("EmbedTexts", b"\x08\x96\x01", IA,
                                               "texts is empty"),
    # metadata
    "precision header in another case, padded": Case("EmbedTexts", texts("x"), OK,
                                                     metadata=(("x-clip-precision", " INT8 "),),
                                                     check=served_by(pb.PRECISION_INT8)),
    "empty scale header": Case("EmbedTexts", texts("x"), OK, metadata=(("x-clip-scale", ""),)),
    "binary precision header": Case("EmbedTexts", texts("x"), OK,
                                    metadata=(("x-clip-precision-bin", b"\xff\x00"),)),
    "repeated precision header (the first counts)": Case(
        "EmbedTexts", texts("x"), OK, metadata=(
            ("x-clip-precision", "int8"), ("x-clip-precision", "bogus")),
        check=served_by(pb.PRECISION_INT8)),
    "4 KiB routing key": Case("EmbedTexts", texts("x"), OK,
                              metadata=(("x-clip-routing-key", "k" * 4096),)),
    "long junk scale": Case("EmbedTexts", texts("x"), IA, "unknown x-clip-scale",
                            metadata=(("x-clip-scale", "s" * 1000),)),
    "metadata over gRPC's 16 KiB hard limit": Case(
        "EmbedTexts", texts("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "",
        metadata=(("x-clip-routing-key", "k" * 20_000),)),
    "deadline of 1 ms": Case("EmbedTexts", texts("x"), grpc.StatusCode.DEADLINE_EXCEEDED,
                             timeout=0.001),
    "unknown method": Case("EmbedAudio", texts("x"), grpc.StatusCode.UNIMPLEMENTED),
}

SERVICE = {"EmbedImages": "EmbeddingService", "EmbedTexts": "EmbeddingService",
           "EmbedStream": "EmbeddingService", "EmbedAudio": "EmbeddingService",
           "Classify": "ClassificationService"}
RESPONSES = {"EmbedImages": pb.EmbedImagesResponse, "EmbedTexts": pb.EmbedTextsResponse,
             "EmbedStream": pb.EmbedStreamResponse, "EmbedAudio": pb.EmbedTextsResponse,
             "Classify": pb.ClassifyResponse}


def _bytes(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def call(gw: GatewayThread, case: Case):
    """Send a case as raw bytes (so malformed bodies go through); returns (code, details,
    response or list of stream responses)."""
    path = f"/clipserve.v1.{SERVICE[case.method]}/{case.method}"
    deserialize = RESPONSES[case.method].FromString
    try:
        if case.method == "EmbedStream":
            stub = gw.channel.stream_stream(path, request_serializer=_bytes,
                                            response_deserializer=deserialize)
            response = list(stub(iter(case.request), metadata=case.metadata,
                                 timeout=case.timeout))
        else:
            stub = gw.channel.unary_unary(path, request_serializer=_bytes,
                                          response_deserializer=deserialize)
            response = stub(case.request, metadata=case.metadata, timeout=case.timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None
    return grpc.StatusCode.OK, "", response


@pytest.fixture(scope="module")
def gw(repository, triton):
    config = ServerConfig(repository=repository, host="127.0.0.1", port=0, metrics_port=0,
                          triton_url=triton.grpc_url, health_poll_s=0.2,
                          max_image_bytes=MAX_IMAGE_BYTES, max_message_bytes=MAX_MESSAGE_BYTES)
    gateway = GatewayThread(config)
    yield gateway
    gateway.close()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(gw, name, caplog):
    case = CASES[name]
    code, details, response = call(gw, case)
    assert code is case.code, f"{name}: {code.name} {details!r}"
    assert case.fragment in details, details
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    if case.check is not None:
        case.check(gw, response)
    # The server keeps serving, and nothing was an unexpected error.
    good = gw.embed.EmbedTexts(texts("still serving"), timeout=TIMEOUT_S)
    assert len(good.embeddings) == 1
    unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unexpected, [r.getMessage() for r in unexpected]


def test_the_suite_is_large_enough():
    # The issue asks how many bad inputs were tried: this many cases, each a separate call.
    assert len(CASES) >= 60, len(CASES)
