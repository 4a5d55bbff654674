"""clipserve.client without a server: the retry policy, image inputs, headers."""

import random

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve import client


class Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


class Flaky:
    """Fails with ``codes`` in turn, then answers "ok"; records the timeouts it was given."""

    def __init__(self, *codes):
        self.codes = list(codes)
        self.timeouts = []

    def __call__(self, timeout):
        self.timeouts.append(timeout)
        if self.codes:
            raise Failure(self.codes.pop(0))
        return "ok"


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def run(call, clock, timeout_s=10.0, retries=3):
    return client.call_with_retries(call, timeout_s=timeout_s, retries=retries, backoff_s=0.1,
                                    rng=random.Random(0), sleep=clock.sleep,
                                    clock=lambda: clock.now)


def test_unavailable_is_retried_with_growing_backoff_and_a_shrinking_timeout():
    clock = FakeClock()
    call = Flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    assert run(call, clock) == "ok"
    assert len(call.timeouts) == 3 and len(clock.slept) == 2
    assert clock.slept[0] <= 0.1 and clock.slept[1] <= 0.2  # full jitter under 0.1 * 2**i
    assert call.timeouts[2] == pytest.approx(10.0 - sum(clock.slept))


def test_invalid_argument_is_not_retried():
    clock = FakeClock()
    call = Flaky(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(Failure):
        run(call, clock)
    assert len(call.timeouts) == 1 and clock.slept == []


def test_retries_stop_after_the_budget_and_at_the_deadline():
    clock = FakeClock()
    call = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(Failure):
        run(call, clock, retries=3)
    assert len(call.timeouts) == 4  # the first try and 3 retries
    clock = FakeClock()
    call = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(Failure):
        run(call, clock, timeout_s=0.0005, retries=100)  # no time for any backoff
    assert len(call.timeouts) == 1


async def test_async_retries_unavailable_only():
    calls = []

    async def once(timeout):
        calls.append(timeout)
        if len(calls) == 1:
            raise Failure(grpc.StatusCode.UNAVAILABLE)
        if len(calls) == 2:
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT)
        return "never"

    with pytest.raises(Failure) as info:
        await client.call_with_retries_async(once, timeout_s=5, retries=3, backoff_s=0.001)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and len(calls) == 2


def test_images_from_bytes_paths_pil_and_arrays(tmp_path):
    array = np.zeros((4, 5, 3), np.uint8)
    array[1, 2] = (255, 0, 0)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    for item in (path.read_bytes(), path, str(path), Image.fromarray(array), array):
        data = client.image_bytes(item)
        decoded = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
        assert np.array_equal(decoded, array), type(item)
    with pytest.raises(TypeError, match="cannot send a int"):
        client.image_bytes(3)


def test_headers_from_call_arguments():
    assert client._metadata("k" * 20, "int8", None, "user-1") == (
        ("authorization", "Bearer " + "k" * 20), ("x-clip-precision", "int8"),
        ("x-clip-routing-key", "user-1"))


def test_float32_embeddings_are_asked_packed_and_decode_like_repeated_floats():
    from clipserve.formats import OutputFormat
    from clipserve.server.v1 import clipserve_pb2 as pb

    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    endpoint = pb.Endpoint(name="s_fp32_image", embed_dim=8)
    packed = pb.EmbedImagesResponse(endpoint=endpoint, request_id="r1",
                                    embeddings_f32=vectors.astype("<f4").tobytes())
    plain = pb.EmbedImagesResponse(endpoint=endpoint, request_id="r1",
                                   embeddings=[pb.Embedding(values=v) for v in vectors])
    c = client.Client("127.0.0.1:1")  # no call is made: the channel connects lazily
    try:
        _, request = c._embed_request("image", [np.zeros((4, 4, 3), np.uint8)], "float32")
        assert request.pack_float32
        _, text_request = c._embed_request("text", ["a"], "float32")
        assert text_request.pack_float32
        from_packed = c._embeddings(packed, OutputFormat.FLOAT32, None)
        from_plain = c._embeddings(plain, OutputFormat.FLOAT32, None)  # an older server
        np.testing.assert_array_equal(from_packed.vectors, vectors)
        np.testing.assert_array_equal(from_plain.vectors, vectors)
        assert from_packed.vectors.flags.writeable and from_packed.request_id == "r1"
    finally:
        c.close()
    off = client.Client("127.0.0.1:1", pack_float32=False)
    try:
        assert not off._embed_request("image", [np.zeros((4, 4, 3), np.uint8)],
                                      "float32")[1].pack_float32
    finally:
        off.close()
