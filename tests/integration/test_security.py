"""TLS, mutual TLS, API keys, the concurrency bound and deadlines, over real sockets.

The gateway runs in-process on 127.0.0.1 in front of the unit tests' fake backend (slowed down
where a call must stay in flight), so no tritonserver is needed. Certificates and keys are made
here with ``cryptography``, per test session, and never written outside a temp dir.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from clipserve.endpoints import Tower
from clipserve.server import app
from clipserve.server.app import Gateway
from clipserve.server.config import ServerConfig
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc
from tests.unit.test_server_service import FakeBackend, FakeTokenizer, write_repository

pytestmark = pytest.mark.integration

KEY_ALL = "k-all-" + "a1" * 16  # may call everything
KEY_EMBED = "k-embed-" + "b2" * 16  # EmbeddingService only
TIMEOUT_S = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- certificates ------------------------------------------------------------------------------

@dataclass
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(common_name: str, issuer: tuple[Pem, ec.EllipticCurvePrivateKey] | None = None,
          *, ca: bool = False, server: bool = False) -> tuple[Pem, ec.EllipticCurvePrivateKey]:
    """A P-256 certificate: self-signed when ``issuer`` is None, else signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name = _name(common_name)
    signing_key = key
    if issuer is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer[0].cert).subject
        signing_key = issuer[1]
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    pem = Pem(cert.public_bytes(serialization.Encoding.PEM),
              key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    return pem, key


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_ca: Pem
    rogue_client: Pem
    other_server: Pem  # a second server certificate from the rogue CA (rotation)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = issue("clipserve test CA", ca=True)
    rogue = issue("someone else's CA", ca=True)
    return Pki(ca=ca[0], server=issue("clipserve gateway", ca, server=True)[0],
               client=issue("clipserve client", ca)[0], rogue_ca=rogue[0],
               rogue_client=issue("rogue client", rogue)[0],
               other_server=issue("clipserve gateway (rotated)", rogue, server=True)[0])


def write_tls(folder: Path, pki: Pki, mutual: bool = False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(pki.server.cert)
    (folder / "tls.key").write_bytes(pki.server.key)
    files = {"tls_cert_file": folder / "tls.crt", "tls_key_file": folder / "tls.key"}
    if mutual:
        (folder / "ca.crt").write_bytes(pki.ca.cert)
        files["tls_client_ca_file"] = folder / "ca.crt"
    return files


# -- a gateway on a fake backend -----------------------------------------------------------------

class GatewayThread:
    """A Gateway over the fake backend, on its own event loop in a daemon thread."""

    def __init__(self, repo: Path, backend: FakeBackend | None = None, **overrides):
        self.backend = backend or FakeBackend()
        self.backend.ready = {p.name for p in repo.iterdir() if p.is_dir()}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ServerConfig(**{"repository": repo, "host": "127.0.0.1", "port": 0,
                                 "metrics_port": 0, "triton_url": "unused:1",
                                 "health_poll_s": 0.1, **overrides})
        self.gateway = Gateway(config, backend=self.backend)
        self.run(self.gateway.start(), 30)
        self.address = f"127.0.0.1:{self.gateway.port}"

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.gateway.stop(0.5), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(app, "load_tokenizers", lambda catalog: {
        s.name: FakeTokenizer() for s in catalog if s.tower is Tower.TEXT})
    return write_repository(tmp_path / "repo")


@pytest.fixture
def start(repo):
    started: list[GatewayThread] = []

    def start_gateway(**overrides) -> GatewayThread:
        started.append(GatewayThread(repo, **overrides))
        return started[-1]
    yield start_gateway
    for gateway in started:
        gateway.close()


def tls_channel(address: str, root: bytes, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=client.key if client else None,
        certificate_chain=client.cert if client else None)
    return grpc.secure_channel(address, credentials)


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def embed_texts(channel: grpc.Channel, metadata=(), timeout: float | None = TIMEOUT_S):
    stub = pb_grpc.EmbeddingServiceStub(channel)
    return stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a"]), metadata=metadata, timeout=timeout)


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


# -- TLS -----------------------------------------------------------------------------------------

def test_tls_serves_only_tls_clients_that_trust_the_ca(start, pki, tmp_path):
    gw = start(**write_tls(tmp_path / "tls", pki))
    with tls_channel(gw.address, pki.ca.cert) as channel:
        assert len(embed_texts(channel).embeddings) == 1
    with grpc.insecure_channel(gw.address) as channel:
        assert code_of(embed_texts, channel, timeout=3)[0] is grpc.StatusCode.UNAVAILABLE
    with tls_channel(gw.address, pki.rogue_ca.cert) as channel:  # does not trust our CA
        assert code_of(embed_texts, channel, timeout=3)[0] is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(start, pki, tmp_path):
    gw = start(**write_tls(tmp_path / "tls", pki, mutual=True))
    with tls_channel(gw.address, pki.ca.cert, pki.client) as channel:
        assert len(embed_texts(channel).embeddings) == 1
    for client in (None, pki.rogue_client):
        with tls_channel(gw.address, pki.ca.cert, client) as channel:
            code, _ = code_of(embed_texts, channel, timeout=3)
            assert code is grpc.StatusCode.UNAVAILABLE, client


def test_rotated_certificate_is_used_by_new_connections(start, pki, tmp_path):
    files = write_tls(tmp_path / "tls", pki)
    gw = start(**files)
    with tls_channel(gw.address, pki.ca.cert) as channel:
        embed_texts(channel)
    # As a Secret update does: new files swapped in; no restart.
    files["tls_cert_file"].write_bytes(pki.other_server.cert)
    files["tls_key_file"].write_bytes(pki.other_server.key)
    with tls_channel(gw.address, pki.rogue_ca.cert) as channel:
        assert len(embed_texts(channel).embeddings) == 1
    with tls_channel(gw.address, pki.ca.cert) as channel:
        assert code_of(embed_texts, channel, timeout=3)[0] is grpc.StatusCode.UNAVAILABLE


def test_plaintext_health_port_answers_probes_while_the_api_needs_tls_and_a_key(
        start, pki, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_ALL}\n")
    gw = start(health_port=0, api_keys_file=keys, **write_tls(tmp_path / "tls", pki))
    with grpc.insecure_channel(f"127.0.0.1:{gw.gateway.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        # Only health is there: the API is not reachable over the plaintext port.
        assert code_of(embed_texts, channel, bearer(KEY_ALL))[0] is \
            grpc.StatusCode.UNIMPLEMENTED
        gw.backend.down = True
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
            assert time.monotonic() < deadline, "health port did not follow the backend"
            time.sleep(0.05)


# -- API keys --------------------------------------------------------------------------------------

@pytest.fixture
def keyed(start, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(f"# test keys\n{KEY_ALL}\n{KEY_EMBED} EmbeddingService\n")
    gw = start(api_keys_file=keys, api_keys_poll_s=0.1)
    channel = grpc.insecure_channel(gw.address)
    yield gw, channel, keys
    channel.close()


@pytest.mark.parametrize("metadata, code, fragment", [
    ((), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    (bearer("not-a-key-but-long-enough"), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
    (bearer(KEY_ALL + "x"), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
    ((("authorization", KEY_ALL),), grpc.StatusCode.UNAUTHENTICATED, "expected 'Bearer <key>'"),
    ((("authorization", f"Basic {KEY_ALL}"),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
    ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
    (bearer(KEY_ALL) + bearer(KEY_EMBED), grpc.StatusCode.UNAUTHENTICATED, "not 2"),
    ((("authorization", f"bearer {KEY_ALL}"),), grpc.StatusCode.OK, ""),  # scheme: any case
    (bearer(KEY_ALL), grpc.StatusCode.OK, ""),
    (bearer(KEY_EMBED), grpc.StatusCode.OK, ""),
])
def test_api_key_statuses(keyed, metadata, code, fragment):
    _, channel, _ = keyed
    got, details = code_of(embed_texts, channel, metadata)
    assert got is code, details
    assert fragment in details
    assert KEY_ALL not in details and KEY_EMBED not in details


def test_scoped_key_gets_permission_denied_outside_its_services(keyed):
    _, channel, _ = keyed
    classify = pb_grpc.ClassificationServiceStub(channel).Classify
    models = pb_grpc.ModelServiceStub(channel).ListModels
    code, details = code_of(classify, pb.ClassifyRequest(images=[b"x"]),
                            metadata=bearer(KEY_EMBED), timeout=TIMEOUT_S)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "clipserve.v1.ClassificationService" in details
    assert code_of(models, pb.ListModelsRequest(), metadata=bearer(KEY_EMBED),
                   timeout=TIMEOUT_S)[0] is grpc.StatusCode.PERMISSION_DENIED
    assert models(pb.ListModelsRequest(), metadata=bearer(KEY_ALL), timeout=TIMEOUT_S).endpoints


def test_stream_needs_a_key_too(keyed):
    _, channel, _ = keyed
    stub = pb_grpc.EmbeddingServiceStub(channel)
    requests = [pb.EmbedStreamRequest(id="1", text="a")]
    code, _ = code_of(lambda: list(stub.EmbedStream(iter(requests), timeout=TIMEOUT_S)))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    responses = list(stub.EmbedStream(iter(requests), metadata=bearer(KEY_EMBED),
                                      timeout=TIMEOUT_S))
    assert [r.id for r in responses] == ["1"] and responses[0].HasField("embedding")


def test_health_is_open_and_reflection_needs_a_key_by_default(keyed, start, tmp_path):
    _, channel, keys = keyed
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED

    open_reflection = start(api_keys_file=keys, reflection_needs_key=False)
    with grpc.insecure_channel(open_reflection.address) as other:
        assert "clipserve.v1.EmbeddingService" in \
            ProtoReflectionDescriptorDatabase(other).get_services()


def test_key_file_changes_take_effect_without_a_restart(keyed):
    gw, channel, keys = keyed
    new_key = "k-new-" + "c3" * 16
    keys.write_text(f"{new_key}\n")

    def accepted(key: str) -> bool:
        return code_of(embed_texts, channel, bearer(key))[0] is grpc.StatusCode.OK

    deadline = time.monotonic() + 5
    while not accepted(new_key):
        assert time.monotonic() < deadline, "new key file not picked up"
        time.sleep(0.05)
    assert not accepted(KEY_ALL)  # revoked
    keys.write_text("short\n")  # a broken file keeps the previous keys
    gw.run(asyncio.sleep(0.3))
    gw.gateway.reload()
    assert accepted(new_key)


def test_keys_never_reach_the_log(start, tmp_path, caplog):
    keys = tmp_path / "api-keys"
    keys.write_text(f"{KEY_ALL}\n{KEY_EMBED} EmbeddingService\n")
    caplog.set_level(logging.DEBUG)
    gw = start(api_keys_file=keys)
    wrong = "k-wrong-" + "d4" * 16
    with grpc.insecure_channel(gw.address) as channel:
        for metadata in (bearer(KEY_ALL), bearer(KEY_EMBED), bearer(wrong), ()):
            code_of(embed_texts, channel, metadata)
            code_of(pb_grpc.ClassificationServiceStub(channel).Classify,
                    pb.ClassifyRequest(images=[b"x"]), metadata=metadata, timeout=TIMEOUT_S)
    keys.write_text(f"{KEY_ALL}\n{KEY_ALL}\n")  # a reload error names lines, not keys
    gw.gateway.reload()
    text = caplog.text
    assert "API keys: 2 loaded" in text and "repeats the key of line 1" in text
    for secret in (KEY_ALL, KEY_EMBED, wrong):
        assert secret not in text


def test_start_fails_on_an_unusable_key_or_tls_file(repo, tmp_path, pki):
    short = tmp_path / "short-keys"
    short.write_text("tooshort\n")
    not_pem = tmp_path / "tls.crt"
    not_pem.write_text("hello")
    key = tmp_path / "tls.key"
    key.write_bytes(pki.server.key)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(pki.client.key)
    good_cert = tmp_path / "good.crt"
    good_cert.write_bytes(pki.server.cert)
    for overrides, fragment in (
            ({"tls_cert_file": good_cert, "tls_key_file": other_key}, "must match"),
            ({"api_keys_file": short}, "line 1: the key is shorter than 16"),
            ({"api_keys_file": tmp_path / "missing"}, "cannot read API key file"),
            ({"tls_cert_file": not_pem, "tls_key_file": key}, "is not PEM")):
        with pytest.raises(ValueError, match=fragment):
            GatewayThread(repo, **overrides)


# -- bounded concurrency and deadlines -----------------------------------------------------------

def test_calls_beyond_the_bound_get_resource_exhausted_at_once(start):
    backend = FakeBackend()
    backend.delay_s = 1.0
    gw = start(backend=backend, max_concurrent_calls=2)
    with grpc.insecure_channel(gw.address) as channel, ThreadPoolExecutor(6) as pool:
        def timed():
            started = time.monotonic()
            code, details = code_of(embed_texts, channel)
            return code, details, time.monotonic() - started

        futures = [pool.submit(timed) for _ in range(6)]
        time.sleep(0.3)
        # Probes are not counted against the bound.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
        results = [f.result() for f in futures]
    codes = sorted(r[0].name for r in results)
    assert codes == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4, results
    for code, details, seconds in results:
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert seconds < 0.5, "refused calls must not wait for a slot"
            assert "limit of 2 concurrent calls" in details
    wait_idle(gw)
    refused = gw.gateway.registry.get_sample_value("clipserve_requests_total", {
        "method": "EmbedTexts", "scale": "none", "precision": "none",
        "code": "RESOURCE_EXHAUSTED", "protocol": "grpc"})
    assert refused == 4, "refused calls are counted like any other outcome"
    backend.delay_s = 0
    with grpc.insecure_channel(gw.address) as channel:
        assert len(embed_texts(channel).embeddings) == 1


def test_an_open_stream_holds_a_slot_until_it_ends(start):
    gw = start(max_concurrent_calls=1)
    with grpc.insecure_channel(gw.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        gate = threading.Event()

        def requests():
            yield pb.EmbedStreamRequest(id="1", text="a")
            gate.wait(10)

        stream = stub.EmbedStream(requests(), timeout=TIMEOUT_S)
        assert next(stream).id == "1"
        code, _ = code_of(embed_texts, channel)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        assert list(stream) == []
        wait_idle(gw)
        assert len(embed_texts(channel).embeddings) == 1


def test_deadlines_are_honoured_from_the_client_and_the_server_cap(start):
    backend = FakeBackend()
    gw = start(backend=backend, request_timeout_s=0.5)
    with grpc.insecure_channel(gw.address) as channel:
        # Endpoint warm-ups have their own deadline (endpoint_warmup_timeout_s): let them finish
        # so that only this test's requests are counted below.
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=2).status != SERVING:
            assert time.monotonic() < deadline, "the gateway did not become SERVING"
            time.sleep(0.05)
        before = len(backend.calls)
        backend.delay_s = 3.0
        for client_timeout, bound in ((0.3, 1.0), (None, 1.5)):  # the client's, then the cap
            started = time.monotonic()
            code, _ = code_of(embed_texts, channel, timeout=client_timeout)
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < bound
        # The backend was told how long it had (the remaining deadline, not a default).
        # Ours are the two one-text calls; the gateway's own label-set encodings (live quality,
        # batch of 3 labels) run under the same cap.
        since = backend.calls[before:]
        assert len([call for call in since if call[2][0] == 1]) == 2, since
        assert all(call[3] <= 0.5 for call in since), since
    wait_idle(gw)


def wait_idle(gw: GatewayThread, timeout_s: float = 5.0) -> None:
    """The guard's count returns to 0 (a call's slot is freed when its handler ends, which can
    be just after the client saw its status)."""
    deadline = time.monotonic() + timeout_s
    while gw.gateway.guard.in_flight:
        assert time.monotonic() < deadline, f"{gw.gateway.guard.in_flight} slots never freed"
        time.sleep(0.02)
