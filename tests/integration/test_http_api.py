"""The OpenAI-compatible HTTP API against the real tritonserver and the real gateway.

The official ``openai`` package and plain ``httpx`` are the clients. The module's gateway runs
on a copy of the test repository's sidecars (no ONNX files; the same Triton serves the models)
into which int8 ranges were fitted here, on the digits calibration split embedded by the
gateway itself, as the export does on its calibration embeddings.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from clipserve import formats
from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.server.repository import Catalog
from clipserve.server.v1 import clipserve_pb2 as pb
from tests.integration.test_gateway import CALL_TIMEOUT_S, GatewayThread, config_for, png
from tests.integration.test_security import KEY_ALL, KEY_EMBED, pki, write_tls  # noqa: F401

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def digit_pngs(images: np.ndarray) -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for array in images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def digits_data():
    from clipserve.export import digits

    return digits.load(32)


def grpc_embed(gateway: GatewayThread, tower: Tower, items, precision: str, fmt=0):
    md = (("x-clip-precision", precision),)
    out = []
    for i in range(0, len(items), 64):
        chunk = items[i:i + 64]
        if tower is Tower.IMAGE:
            r = gateway.embed.EmbedImages(pb.EmbedImagesRequest(images=chunk, format=fmt),
                                          metadata=md, timeout=CALL_TIMEOUT_S)
        else:
            r = gateway.embed.EmbedTexts(pb.EmbedTextsRequest(texts=chunk, format=fmt),
                                         metadata=md, timeout=CALL_TIMEOUT_S)
        out += [list(e.values) for e in r.embeddings]
    return np.array(out, np.float32)


@pytest.fixture(scope="module")
def fitted_repository(repository, triton, tmp_path_factory, digits_data):
    """Sidecars of ``repository`` with output_formats fitted on calibration embeddings."""
    from clipserve.export import digits

    catalog = Catalog.from_repository(repository)
    root = tmp_path_factory.mktemp("fitted")
    gateway = GatewayThread(config_for(repository, triton.grpc_url))
    try:
        images = digit_pngs(digits_data.calibration.images)
        texts = digits.captions(digits_data.calibration.labels, np.random.default_rng(0))
        for spec in catalog:
            target = root / spec.name
            shutil.copytree(spec.directory, target,
                            ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
            items = images if spec.tower is Tower.IMAGE else texts
            vectors = grpc_embed(gateway, spec.tower, items, spec.precision.value)
            car = Sidecar.read(target)
            car.output_formats = formats.fit_output_formats(vectors)
            car.write(target)
    finally:
        gateway.close()
    return root


@pytest.fixture(scope="module")
def hw(fitted_repository, triton, tmp_path_factory):
    """A gateway with the HTTP API on an ephemeral port and an even fp32/int8 split."""
    routing = tmp_path_factory.mktemp("routing") / "routing.json"
    routing.write_text(json.dumps({"weights": {"fp32": 50, "int8": 50}}))
    gateway = GatewayThread(config_for(fitted_repository, triton.grpc_url, http_port=0,
                                       routing_file=routing))
    gateway.http = f"http://127.0.0.1:{gateway.gateway.http_port}"
    yield gateway
    gateway.close()


def sdk(gateway, **kwargs):
    return openai.OpenAI(base_url=gateway.http + "/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, timeout=CALL_TIMEOUT_S, **kwargs)


# -- the openai SDK --------------------------------------------------------------------------

def test_openai_sdk_embeds_texts_and_images_float_and_base64_equal_grpc(hw):
    images = [png(i) for i in range(3)]
    texts = ["a photo of the digit 7", "zero"]
    inputs = [texts[0], data_uri(images[0]), data_uri(images[1]), texts[1], data_uri(images[2])]
    client = sdk(hw)
    got = {}
    for encoding in ("float", "base64"):
        raw = client.embeddings.with_raw_response.create(
            model="digits-s_fp32", input=inputs, encoding_format=encoding)
        response = raw.parse()
        assert raw.headers["x-clip-endpoint"] == "digits-s_fp32_image,digits-s_fp32_text"
        assert response.model == "digits-s_fp32_image,digits-s_fp32_text"
        assert [d.index for d in response.data] == list(range(5))
        # Asked for explicitly, base64 comes back as the string (the SDK decodes only when
        # it chose base64 itself, below): little-endian float32, as OpenAI's.
        got[encoding] = np.array([d.embedding if encoding == "float" else
                                  np.frombuffer(base64.b64decode(d.embedding), "<f4")
                                  for d in response.data], np.float64)
        assert response.usage.prompt_tokens > 0
    assert np.array_equal(got["float"], got["base64"])  # same float32 bits both ways
    # The SDK's default (no encoding_format) asks for base64 and decodes it itself.
    default = client.embeddings.create(model="digits-s_fp32", input=texts)
    assert np.array_equal(np.array([d.embedding for d in default.data]), got["float"][[0, 3]])

    grpc_images = grpc_embed(hw, Tower.IMAGE, images, "fp32")
    grpc_texts = grpc_embed(hw, Tower.TEXT, texts, "fp32")
    np.testing.assert_allclose(got["float"][[1, 2, 4]], grpc_images, atol=1e-6)
    np.testing.assert_allclose(got["float"][[0, 3]], grpc_texts, atol=1e-6)


def test_openai_sdk_lists_models_with_int8_ranges(hw, fitted_repository):
    models = {m.id: m for m in sdk(hw).models.list()}
    assert {"digits-s", "digits-s_fp32", "digits-s_int8", "digits-s_fp16",
            "digits-s_int4"} <= set(models)
    entry = models["digits-s_int8"].model_dump()
    image = entry["endpoints"]["image"]
    car = Sidecar.read(fitted_repository / "digits-s_int8_image")
    np.testing.assert_allclose(image["int8_ranges"]["lo"], car.output_formats["int8"]["lo"])
    assert "int8" in image["output_formats"] and entry["routing_weight"] == 0.5
    assert models["digits-s"].model_dump()["default"] is True


# -- routing ---------------------------------------------------------------------------------

def post(gateway, path: str, body: dict, headers=None, **kwargs) -> httpx.Response:
    return httpx.post(gateway.http + path, json=body, headers=headers or {},
                      timeout=CALL_TIMEOUT_S, **kwargs)


def test_header_selects_the_precision_and_user_routes_like_grpc_routing_key(hw):
    for precision in ("fp16", "int4"):
        r = post(hw, "/v1/embeddings", {"input": "x", "model": "digits-s"},
                 {"x-clip-precision": precision})
        assert r.status_code == 200 and r.headers["x-clip-endpoint"] == \
            f"digits-s_{precision}_text"
        assert r.json()["model"] == f"digits-s_{precision}_text"

    def http_arm(user: str) -> str:
        return post(hw, "/v1/embeddings", {"input": "x", "user": user}).headers[
            "x-clip-endpoint"]

    def grpc_arm(key: str) -> str:
        _, call = hw.embed.EmbedTexts.with_call(pb.EmbedTextsRequest(texts=["x"]), metadata=(
            ("x-clip-routing-key", key),), timeout=CALL_TIMEOUT_S)
        return dict(call.initial_metadata())["x-clip-endpoint"]

    users = [f"user-{i}" for i in range(60)]
    first = [http_arm(u) for u in users]
    assert {a.split("_")[1] for a in first} == {"fp32", "int8"}  # 50/50: both arms appear
    assert [http_arm(u) for u in users[:20]] == first[:20]  # sticky
    assert [grpc_arm(u) for u in users[:20]] == first[:20]  # the same arm as over gRPC


def test_mixed_input_without_a_key_goes_to_one_arm(hw):
    for _ in range(8):
        r = post(hw, "/v1/embeddings", {"input": [data_uri(png(0)), "seven"]})
        image, text = r.headers["x-clip-endpoint"].split(",")
        assert image.rsplit("_", 1)[0] == text.rsplit("_", 1)[0]


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, headers, status, code, fragment", [
    ({"input": ["ok", "data:image/png;base64,bm90IGFuIGltYWdl"]}, {}, 400,
     "invalid_argument", "input[1] (image) is not a decodable image"),
    ({"input": ["ok", "data:image/png;base64,@@@"]}, {}, 400, "invalid_argument",
     "input[1] is not valid base64"),
    ({"input": [[1, 2, 3]]}, {}, 400, "invalid_argument", "token arrays are not supported"),
    ({"input": []}, {}, 400, "invalid_argument", "non-empty list"),
    ({"input": "x", "encoding_format": "hex"}, {}, 400, "invalid_argument", "float, base64"),
    ({"input": "x", "output_format": "int4"}, {}, 400, "invalid_argument",
     "float32, float16, int8, ubinary"),
    ({"input": "x", "dimensions": 3}, {}, 400, "invalid_argument", "shortening"),
    ({"input": "x"}, {"x-clip-precision": "fp8"}, 400, "invalid_argument", "valid precisions"),
    ({"input": "x", "model": "digits-s_int8"}, {"x-clip-precision": "fp32"}, 400,
     "invalid_argument", "disagree"),
    ({"input": "x"}, {"x-clip-timeout": "soon"}, 400, "invalid_argument", "x-clip-timeout"),
    ({"input": "x", "model": "gpt-4"}, {}, 404, "not_found", "models: digits-s"),
    ({"input": "x", "model": "digits-s_fp8"}, {}, 404, "not_found", "is not served here"),
    ({"input": ["x"] * 65}, {}, 400, "invalid_argument", "65 texts in one call; at most 64"),
    ({"input": "x"}, {"x-clip-timeout": "0.000001"}, 504, "deadline_exceeded", "deadline"),
])
def test_error_statuses_and_openai_error_bodies(hw, body, headers, status, code, fragment):
    r = post(hw, "/v1/embeddings", body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and fragment in error["message"], error
    assert error["type"] and set(error) == {"message", "type", "code"}
    # the openai SDK surfaces the same body
    if status == 404:
        with pytest.raises(openai.NotFoundError) as info:
            sdk(hw).embeddings.create(**body)
        assert fragment in str(info.value)


def test_body_not_json_is_400_and_too_large_is_413(hw, fitted_repository, triton):
    r = httpx.post(hw.http + "/v1/embeddings", content=b"{not json", timeout=CALL_TIMEOUT_S)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    small = GatewayThread(config_for(fitted_repository, triton.grpc_url, http_port=0,
                                     max_message_bytes=1000))
    try:
        url = f"http://127.0.0.1:{small.gateway.http_port}/v1/embeddings"
        r = httpx.post(url, json={"input": "x" * 2000}, timeout=CALL_TIMEOUT_S)
        assert r.status_code == 413, r.text
        assert "at most 1000" in r.json()["error"]["message"]
    finally:
        small.close()


def test_int8_without_fitted_ranges_is_400_naming_the_fix(repository, triton, tmp_path):
    # The export fits int8 ranges into every sidecar; a repository from before it did not.
    old = tmp_path / "repo"
    shutil.copytree(repository, old, ignore=shutil.ignore_patterns("model.onnx*"))
    for path in old.glob("*/clipserve.json"):
        path.write_text(json.dumps(dict(json.loads(path.read_text()), output_formats={})))
    plain = GatewayThread(config_for(old, triton.grpc_url, http_port=0))
    try:
        url = f"http://127.0.0.1:{plain.gateway.http_port}/v1/embeddings"
        r = httpx.post(url, json={"input": "x", "output_format": "int8"},
                       timeout=CALL_TIMEOUT_S)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "failed_precondition" and "re-export" in error["message"]
        code = None
        try:
            plain.embed.EmbedTexts(pb.EmbedTextsRequest(
                texts=["x"], format=pb.EMBEDDING_FORMAT_INT8), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code()
        assert code is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        plain.close()


def test_concurrency_bound_is_429_and_not_ready_is_503(hw, fitted_repository):
    limit = hw.gateway.config.max_concurrent_calls
    hw.gateway.guard.in_flight += limit  # every slot taken, as by `limit` calls in flight
    try:
        r = post(hw, "/v1/embeddings", {"input": "x"})
    finally:
        hw.gateway.guard.in_flight -= limit
    assert r.status_code == 429 and r.json()["error"]["code"] == "resource_exhausted"
    assert post(hw, "/v1/embeddings", {"input": "x"}).status_code == 200

    # A Triton that is not there: the gateway serves, NOT_SERVING, and calls get 503.
    down = GatewayThread(config_for(fitted_repository, "127.0.0.1:1", http_port=0))
    try:
        base = f"http://127.0.0.1:{down.gateway.http_port}"
        r = httpx.post(base + "/v1/embeddings", json={"input": "x"}, timeout=CALL_TIMEOUT_S)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert httpx.get(base + "/health/ready", timeout=5).status_code == 503
        assert httpx.get(base + "/health/live", timeout=5).status_code == 200
    finally:
        down.close()
    assert httpx.get(hw.http + "/health/ready", timeout=5).status_code == 200


def test_api_keys_and_tls_over_http(fitted_repository, triton, tmp_path, pki):  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_ALL}\n{KEY_EMBED} EmbeddingService\n")
    tls = write_tls(tmp_path / "tls", pki)
    (tmp_path / "ca.pem").write_bytes(pki.ca.cert)
    gateway = GatewayThread(config_for(fitted_repository, triton.grpc_url, http_port=0,
                                       api_keys_file=keys, **tls))
    try:
        base = f"https://127.0.0.1:{gateway.gateway.http_port}"
        import ssl

        verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

        def call(path, key=None, method="post"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            if method == "get":
                return httpx.get(base + path, headers=headers, verify=verify, timeout=10)
            return httpx.post(base + path, json={"input": "x"}, headers=headers, verify=verify,
                              timeout=CALL_TIMEOUT_S)

        assert call("/v1/embeddings").status_code == 401
        assert call("/v1/embeddings", "k-wrong-" + "c3" * 16).json()["error"]["type"] == \
            "authentication_error"
        assert call("/v1/embeddings", KEY_EMBED).status_code == 200
        r = call("/v1/models", KEY_EMBED, "get")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert call("/v1/models", KEY_ALL, "get").status_code == 200
        assert call("/health/live", method="get").status_code == 200  # probes need no key
        with pytest.raises(httpx.ConnectError):  # the server's certificate is not trusted
            httpx.get(base + "/health/live", timeout=5)
        with pytest.raises(httpx.HTTPError):  # no plaintext on the TLS port
            httpx.get(base.replace("https", "http") + "/health/live", timeout=5)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY_EMBED, max_retries=0,
                               http_client=httpx.Client(verify=verify))
        assert len(client.embeddings.create(model="digits-s", input=["a", "b"]).data) == 2
    finally:
        gateway.close()


# -- output formats --------------------------------------------------------------------------

def test_int8_and_ubinary_neighbours_match_float32_at_the_reported_rate(hw, digits_data,
                                                                        fitted_repository):
    images = [data_uri(p) for p in digit_pngs(digits_data.test.images)]
    queries_n = 40
    car = Sidecar.read(fitted_repository / "digits-s_fp32_image")

    def embed(fmt: str, encoding: str = "base64"):
        rows = []
        for i in range(0, len(images), 64):
            r = post(hw, "/v1/embeddings", {"input": images[i:i + 64], "model": "digits-s_fp32",
                                            "encoding_format": encoding, "output_format": fmt})
            assert r.status_code == 200, r.text
            assert r.headers["x-clip-output-format"] == fmt
            rows += [d["embedding"] for d in r.json()["data"]]
        return rows

    def as_vectors(rows, fmt):
        blobs = [base64.b64decode(b) for b in rows]
        assert {len(b) for b in blobs} == {formats.bytes_per_vector(fmt, car.embed_dim)}
        return formats.decode(blobs, fmt, car.embed_dim, car.output_formats)

    reference = as_vectors(embed("float32"), "float32")
    report = formats.format_report(reference[:queries_n], reference, car.output_formats)
    truth = formats.top_k(reference[:queries_n], reference, 10)
    for fmt in ("float16", "int8", "ubinary"):
        served = as_vectors(embed(fmt), fmt)
        found = formats.top_k(served[:queries_n], served, 10)
        recall = formats.recall_at_k(truth, found)
        # The server packs with the same function the report uses; only float rounding
        # differences in Triton's output (batch composition) may move a borderline code.
        assert recall == pytest.approx(report[fmt]["recall_at_k"], abs=0.02), fmt
    assert report["int8"]["recall_at_k"] >= 0.8  # a fitted range keeps most neighbours
    # JSON numbers carry the same codes as base64
    as_numbers = embed("int8", "float")[:3]
    codes = [np.frombuffer(base64.b64decode(b), np.int8).tolist() for b in embed("int8")[:3]]
    assert as_numbers == codes


# -- classify, feedback, metrics -------------------------------------------------------------

def test_classify_and_feedback_over_http(hw, digits_data):
    images = [data_uri(p) for p in digit_pngs(digits_data.test.images[:4])]
    r = post(hw, "/v1/classify", {"input": images, "model": "digits-s_fp32"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-clip-request-id"] == body["request_id"]
    assert len(body["data"]) == 4 and body["model"] == "digits-s_fp32_image"
    for result in body["data"]:
        assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert result["top_label"] == body["labels"][result["top_index"]]
        assert result["out_of_distribution"] == (result["ood_score"] < body["ood_threshold"])
    r = post(hw, "/v1/feedback", {"request_id": body["request_id"],
                                  "outcomes": [{"index": 0, "true_label": body["labels"][0]}]})
    assert r.status_code == 200 and r.json() == {"accepted": 1, "model": "digits-s_fp32_image"}
    r = post(hw, "/v1/feedback", {"request_id": body["request_id"],
                                  "outcomes": [{"index": 0, "true_label": body["labels"][0]}]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists"
    r = post(hw, "/v1/feedback", {"request_id": "nope", "outcomes": []})
    assert r.status_code == 400 and "outcomes is empty" in r.json()["error"]["message"]
    r = post(hw, "/v1/feedback", {"request_id": "nope",
                                  "outcomes": [{"index": 0, "true_label": body["labels"][0]}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_http_calls_are_counted_with_their_protocol(hw):
    registry = hw.gateway.registry

    def count(protocol, code="OK"):
        return registry.get_sample_value("clipserve_requests_total", {
            "method": "EmbedTexts", "scale": "digits-s", "precision": "fp16", "code": code,
            "protocol": protocol}) or 0

    before_http, before_grpc = count("http"), count("grpc")
    post(hw, "/v1/embeddings", {"input": "x", "model": "digits-s_fp16"})
    assert (count("http"), count("grpc")) == (before_http + 1, before_grpc)
    refused = {"method": "Embeddings", "scale": "none", "precision": "none",
               "code": "INVALID_ARGUMENT", "protocol": "http"}
    before = registry.get_sample_value("clipserve_requests_total", refused) or 0
    httpx.post(hw.http + "/v1/embeddings", content=b"[", timeout=CALL_TIMEOUT_S)
    assert registry.get_sample_value("clipserve_requests_total", refused) == before + 1


# -- clipserve.client against the same gateway -------------------------------------------------

def test_client_embeds_decodes_int8_and_retries_only_unavailable(hw, fitted_repository):
    from clipserve.client import Client

    with Client(hw.address, retries=2, backoff_s=0.01) as client:
        floats = client.embed_texts(["seven", "three"], precision="fp32")
        assert floats.endpoint == "digits-s_fp32_text" and floats.vectors.shape[0] == 2
        codes = client.embed_texts(["seven", "three"], precision="fp32", output_format="int8")
        car = Sidecar.read(fitted_repository / "digits-s_fp32_text")
        expected = formats.decode(formats.encode(floats.vectors, "int8", car.output_formats),
                                  "int8", car.embed_dim, car.output_formats)
        np.testing.assert_allclose(codes.vectors, expected, atol=1e-6)
        images = client.embed_images([png(0), np.zeros((20, 20, 3), np.uint8)], scale="digits-s",
                                     precision="int8")
        assert images.endpoint == "digits-s_int8_image" and images.request_id

        def count(code):
            return hw.gateway.registry.get_sample_value("clipserve_requests_total", {
                "method": "EmbedTexts", "scale": "none", "precision": "none", "code": code,
                "protocol": "grpc"}) or 0
        before = count("INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as info:
            client.embed_texts(["x"], precision="fp8")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        time.sleep(0.5)  # the server counts a call just after its status goes out
        assert count("INVALID_ARGUMENT") == before + 1  # asked once, not retried


def test_client_retries_unavailable_against_a_gateway_without_triton(fitted_repository):
    from clipserve.client import Client

    down = GatewayThread(config_for(fitted_repository, "127.0.0.1:1"))
    try:
        def unavailable():
            return sum(s.value for m in down.gateway.registry.collect()
                       if m.name == "clipserve_requests"
                       for s in m.samples if s.name == "clipserve_requests_total"
                       and s.labels["code"] == "UNAVAILABLE")
        with Client(down.address, retries=3, backoff_s=0.01) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.embed_texts(["x"], timeout_s=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        # The server counts a call just after its status goes out: wait for the last one.
        deadline = time.monotonic() + 5
        while unavailable() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert unavailable() == 4  # the first try and three retries, no more
    finally:
        down.close()


def test_embed_and_classify_commands(hw, tmp_path, digits_data):
    import subprocess
    import sys

    image = tmp_path / "seven.png"
    image.write_bytes(digit_pngs(digits_data.test.images[:1])[0])
    run = [sys.executable, "-m", "clipserve.cli"]
    out = subprocess.run([*run, "embed", "--target", hw.address, "--precision", "int8",
                          str(image), "a seven", "a three"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "images: digits-s_int8_image" in out.stdout
    assert "texts: digits-s_int8_text" in out.stdout and "seven.png" in out.stdout
    out = subprocess.run([*run, "classify", "--target", hw.address, str(image), "--labels",
                          "zero,seven"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "seven.png:" in out.stdout and "ood_score" in out.stdout
    out = subprocess.run([*run, "embed", "--target", hw.address, "--precision", "fp8", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
