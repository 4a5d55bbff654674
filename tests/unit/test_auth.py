"""API keys, TLS file checks, the call guard and their config, without sockets."""

from __future__ import annotations

import asyncio
import hmac

import grpc
import pytest

from clipserve.server import security
from clipserve.server.config import ServerConfig
from clipserve.server.security import (ApiKeys, CallGuard, KeyFile, TlsFiles, MIN_KEY_CHARS)
from clipserve.server.v1 import clipserve_pb2 as pb

SERVICES = ("clipserve.v1.EmbeddingService", "clipserve.v1.ClassificationService",
            "clipserve.v1.ModelService")
EMBED, CLASSIFY = SERVICES[0], SERVICES[1]
KEY_A = "a" * 8 + "0123456789abcdef"
KEY_B = "b" * 8 + "0123456789abcdef"


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def status(keys: ApiKeys, metadata, service=EMBED) -> grpc.StatusCode:
    try:
        keys.authorize(metadata, service)
    except security.ServingError as exc:
        assert KEY_A not in exc.message and KEY_B not in exc.message
        return exc.code
    return grpc.StatusCode.OK


# -- key files ---------------------------------------------------------------------------------

def test_key_file_format_comments_scopes_and_full_names():
    keys = ApiKeys.parse(f"# comment\n\n  {KEY_A}  \n{KEY_B} EmbeddingService, "
                         "clipserve.v1.ModelService\n", SERVICES)
    assert len(keys.entries) == 2
    assert keys.entries[0][1] == {"*"}
    assert keys.entries[1][1] == {"EmbeddingService", "ModelService"}
    # Only digests are kept.
    assert KEY_A.encode() not in repr(keys).encode()


@pytest.mark.parametrize("text, fragment", [
    ("", "holds no keys"),
    ("# only a comment\n", "holds no keys"),
    ("short\n", f"line 1: the key is shorter than {MIN_KEY_CHARS}"),
    (f"{KEY_A}\n\n{KEY_A}\n", "line 3 repeats the key of line 1"),
    (f"{KEY_A} Nope\n", "unknown service(s) Nope"),
    ("ключ-ключ-ключ-ключ-ключ\n", "printable ASCII"),
])
def test_bad_key_files_name_the_line_never_the_key(text, fragment):
    with pytest.raises(ValueError) as info:
        ApiKeys.parse(text, SERVICES, source="keys.txt")
    assert fragment in str(info.value)
    assert KEY_A not in str(info.value)


@pytest.mark.parametrize("metadata, service, code", [
    ((), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    ((("x-other", "1"),), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    (bearer(KEY_A), EMBED, grpc.StatusCode.OK),
    (bearer(KEY_A), CLASSIFY, grpc.StatusCode.OK),
    (bearer(KEY_B), EMBED, grpc.StatusCode.OK),
    (bearer(KEY_B), CLASSIFY, grpc.StatusCode.PERMISSION_DENIED),
    (bearer(KEY_A[:-1]), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    (bearer(KEY_A + " "), EMBED, grpc.StatusCode.OK),  # surrounding spaces are not the key
    ((("authorization", f"BEARER {KEY_A}"),), EMBED, grpc.StatusCode.OK),
    ((("authorization", f"Token {KEY_A}"),), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer"),), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", b"Bearer x"),), EMBED, grpc.StatusCode.UNAUTHENTICATED),
    (bearer(KEY_A) + bearer(KEY_A), EMBED, grpc.StatusCode.UNAUTHENTICATED),
])
def test_authorize_statuses(metadata, service, code):
    keys = ApiKeys.parse(f"{KEY_A}\n{KEY_B} EmbeddingService\n", SERVICES)
    assert status(keys, metadata, service) is code


def test_every_key_is_compared_in_constant_time(monkeypatch):
    keys = ApiKeys.parse("\n".join(f"{c * 4}0123456789abcdef" for c in "abcdefgh"), SERVICES)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for key in (KEY_A, "c" * 4 + "0123456789abcdef", "nope-nope-nope-nope"):
        calls.clear()
        status(keys, bearer(key))
        # Digests (fixed length) against every entry, whether or which one matched.
        assert calls == [(32, 32)] * 8


def test_key_file_reloads_on_change_and_keeps_the_old_keys_on_a_bad_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n")
    source = KeyFile(path, SERVICES)
    assert not source.check()  # unchanged
    path.write_text(f"{KEY_B}\n")
    assert source.check()
    assert status(source.keys, bearer(KEY_B)) is grpc.StatusCode.OK
    assert status(source.keys, bearer(KEY_A)) is grpc.StatusCode.UNAUTHENTICATED
    path.write_text("")  # a half-written or emptied file must not lock everyone out
    assert not source.check()
    assert status(source.keys, bearer(KEY_B)) is grpc.StatusCode.OK
    path.unlink()
    assert not source.reload()
    assert status(source.keys, bearer(KEY_B)) is grpc.StatusCode.OK


def test_key_file_must_load_at_start(tmp_path):
    with pytest.raises(ValueError, match="cannot read API key file"):
        KeyFile(tmp_path / "missing", SERVICES)


def test_tls_files_must_be_pem(tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("not a certificate")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="certificate .* is not PEM"):
        TlsFiles(cert, key)
    with pytest.raises(ValueError, match="cannot read client CA"):
        TlsFiles(key, key, tmp_path / "missing-ca.crt")
    cert.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="do not load"):
        TlsFiles(cert, key)


# -- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "k.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "ca.pem"}, "needs tls_cert_file"),
    ({"max_concurrent_calls": -1}, "max_concurrent_calls must be 0"),
    ({"health_port": 70000}, "health_port must be 0..65535"),
    ({"health_port": 50051}, "health_port 50051 is also port"),
    ({"api_keys_poll_s": 0}, "api_keys_poll_s must be positive"),
])
def test_security_config_is_validated(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        ServerConfig(**overrides)


def test_empty_security_paths_mean_unset():
    # A Kubernetes base may set CLIPSERVE_TLS_CLIENT_CA_FILE="" for an overlay to fill in.
    config = ServerConfig(tls_cert_file="", tls_key_file="", tls_client_ca_file="",
                          api_keys_file="")
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
            config.api_keys_file) == (None, None, None, None)


# -- the guard -----------------------------------------------------------------------------------

class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class Context:
    async def abort(self, code, details=""):
        raise Aborted(code, details)


class Details:
    def __init__(self, method, metadata=()):
        self.method = method
        self.invocation_metadata = metadata


def guard_for(handler, **kwargs):
    rejected = []
    guard = CallGuard(**{"keys": lambda: None, "open_services": {"grpc.health.v1.Health"},
                         "max_concurrent_calls": 0, **kwargs},
                      on_reject=lambda method, code: rejected.append((method, code)))

    async def continuation(details):
        return handler

    async def wrap(method, metadata=()):
        return await guard.intercept_service(continuation, Details(method, metadata))
    return guard, wrap, rejected


def unary(behavior):
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=pb.EmbedTextsRequest.FromString,
        response_serializer=pb.EmbedTextsResponse.SerializeToString)


async def test_guard_bounds_calls_in_progress_and_frees_slots():
    release = asyncio.Event()

    async def slow(request, context):
        await release.wait()
        return pb.EmbedTextsResponse()

    guard, wrap, rejected = guard_for(unary(slow), max_concurrent_calls=2)
    handler = await wrap("/clipserve.v1.EmbeddingService/EmbedTexts")
    request = handler.request_deserializer(pb.EmbedTextsRequest(texts=["x"]).SerializeToString())
    running = [asyncio.create_task(handler.unary_unary(request, Context())) for _ in range(2)]
    await asyncio.sleep(0)
    assert guard.in_flight == 2
    with pytest.raises(Aborted) as info:
        await handler.unary_unary(request, Context())
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejected == [("/clipserve.v1.EmbeddingService/EmbedTexts",
                         grpc.StatusCode.RESOURCE_EXHAUSTED)]
    release.set()
    await asyncio.gather(*running)
    assert guard.in_flight == 0
    running[0] = asyncio.create_task(handler.unary_unary(request, Context()))
    await asyncio.sleep(0)
    running[0].cancel()  # a cancelled call (client gone, deadline) frees its slot too
    await asyncio.gather(running[0], return_exceptions=True)
    assert guard.in_flight == 0


async def test_guard_turns_unparsable_requests_into_invalid_argument():
    async def echo(request, context):
        return pb.EmbedTextsResponse()

    _, wrap, _ = guard_for(unary(echo))
    handler = await wrap("/clipserve.v1.EmbeddingService/EmbedTexts")
    for raw in (b"\x0a\x02\xff\xfe", b"\x0a\x10abc", b"\xff\xff\xff"):
        with pytest.raises(Aborted) as info:
            await handler.unary_unary(handler.request_deserializer(raw), Context())
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in info.value.details


async def test_guard_checks_keys_before_reading_the_request_and_leaves_health_open():
    keys = ApiKeys.parse(f"{KEY_A}\n", SERVICES)
    seen = []

    async def echo(request, context):
        seen.append(request)
        return pb.EmbedTextsResponse()

    guard, wrap, rejected = guard_for(unary(echo), keys=lambda: keys)
    refused = await wrap("/clipserve.v1.EmbeddingService/EmbedTexts")
    assert refused.request_deserializer(b"\xff\xff") is None  # the body is never parsed
    with pytest.raises(Aborted) as info:
        await refused.unary_unary(None, Context())
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert rejected[-1][1] is grpc.StatusCode.UNAUTHENTICATED

    admitted = await wrap("/clipserve.v1.EmbeddingService/EmbedTexts", bearer(KEY_A))
    await admitted.unary_unary(pb.EmbedTextsRequest(texts=["x"]), Context())
    assert len(seen) == 1

    health_handler = unary(echo)
    _, wrap_health, _ = guard_for(health_handler, keys=lambda: keys, max_concurrent_calls=1)
    assert await wrap_health("/grpc.health.v1.Health/Check") is health_handler
    assert guard.in_flight == 0


async def test_guard_wraps_each_method_once_and_still_checks_keys_per_call():
    keys = ApiKeys.parse(f"{KEY_A}\n", SERVICES)

    async def echo(request, context):
        return pb.EmbedTextsResponse()

    servicer_handler = unary(echo)
    handlers = {"/clipserve.v1.EmbeddingService/EmbedTexts": servicer_handler,
                "/clipserve.v1.EmbeddingService/EmbedImages": unary(echo)}
    guard = CallGuard(keys=lambda: keys, open_services=(), max_concurrent_calls=1)

    async def wrap(method, metadata=()):
        async def continuation(details):
            return handlers[details.method]
        return await guard.intercept_service(continuation, Details(method, metadata))

    texts = "/clipserve.v1.EmbeddingService/EmbedTexts"
    first = await wrap(texts, bearer(KEY_A))
    assert await wrap(texts, bearer(KEY_A)) is first  # built once, reused
    assert await wrap("/clipserve.v1.EmbeddingService/EmbedImages", bearer(KEY_A)) is not first
    refused = await wrap(texts)  # no key: refused on this call, the cache notwithstanding
    with pytest.raises(Aborted) as info:
        await refused.unary_unary(None, Context())
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    handlers[texts] = unary(echo)  # a new servicer handler for the method gets a new wrapper
    assert await wrap(texts, bearer(KEY_A)) is not first
    await first.unary_unary(pb.EmbedTextsRequest(texts=["x"]), Context())
    assert guard.in_flight == 0


async def test_guard_counts_a_stream_once_and_checks_each_streamed_message():
    async def stream(requests, context):
        async for request in requests:
            yield pb.EmbedTextsResponse()

    handler = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=pb.EmbedStreamRequest.FromString,
        response_serializer=pb.EmbedTextsResponse.SerializeToString)
    guard, wrap, _ = guard_for(handler, max_concurrent_calls=1)
    guarded = await wrap("/clipserve.v1.EmbeddingService/EmbedStream")
    good = pb.EmbedStreamRequest(id="1", text="a").SerializeToString()

    async def messages(*raws):
        for raw in raws:
            yield guarded.request_deserializer(raw)

    responses = guarded.stream_stream(messages(good, good), Context())
    assert await responses.__anext__() is not None
    assert guard.in_flight == 1
    assert len([r async for r in responses]) == 1
    assert guard.in_flight == 0
    with pytest.raises(security.ServingError) as info:
        [r async for r in guarded.stream_stream(messages(good, b"\x1a\x01\xff"), Context())]
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert guard.in_flight == 0
