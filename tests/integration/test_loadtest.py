"""``clipserve loadtest`` against the real gateway and tritonserver on 127.0.0.1, a few seconds
each: the JSON it writes and the attribution of calls to the endpoints that served them."""

from __future__ import annotations

import json

import pytest

from clipserve.cli import main
from tests.integration.test_gateway import GatewayThread, config_for

pytestmark = pytest.mark.integration

SCALE = "digits-s"


@pytest.fixture(scope="module")
def ab_gateway(repository, triton, tmp_path_factory):
    """A gateway whose header-less calls split 50/50 between fp32 and int8."""
    routing = tmp_path_factory.mktemp("routing") / "routing.json"
    routing.write_text(json.dumps({"weights": {"fp32": 50, "int8": 50}}))
    gateway = GatewayThread(config_for(repository, triton.grpc_url, routing_file=routing))
    yield gateway
    gateway.close()


def loadtest(tmp_path, *flags) -> dict:
    out = tmp_path / "run.json"
    assert main(["loadtest", "--quiet", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_closed_loop_mix_is_attributed_to_the_ab_arms(ab_gateway, tmp_path, capsys):
    data = loadtest(tmp_path, "--target", ab_gateway.address, "--concurrency", "4",
                    "--duration", "3", "--mix", "image:2,text:1,classify:1",
                    "--routing-keys", "32", "--plot", str(tmp_path / "run.png"))
    table = capsys.readouterr().out
    endpoints = data["endpoints"]
    # Classify is attributed to its image endpoint; texts to the text endpoints.
    assert set(endpoints) == {f"{SCALE}_{p}_{t}" for p in ("fp32", "int8")
                              for t in ("image", "text")}
    for name, entry in endpoints.items():
        assert entry["ok"] == entry["requests"] > 0, name
        assert entry["errors"] == {}
        assert entry["items_per_s"] > 0
        assert 0 < entry["latency_ms"]["p50"] <= entry["latency_ms"]["p90"] \
            <= entry["latency_ms"]["p99"] <= entry["latency_ms"]["max"]
        assert name in table
    overall = data["overall"]
    assert overall["requests"] == sum(e["requests"] for e in endpoints.values())
    assert overall["items"] == sum(e["items"] for e in endpoints.values())
    assert overall["items_per_s"] == pytest.approx(overall["items"] / 3.0, rel=1e-3)
    assert data["mode"] == "closed" and data["load"] == 4
    assert data["config"]["target"] == ab_gateway.address
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_open_loop_with_fixed_headers_hits_one_endpoint(ab_gateway, tmp_path):
    data = loadtest(tmp_path, "--target", ab_gateway.address, "--rate", "30", "--arrival",
                    "fixed", "--duration", "2", "--scale", SCALE, "--precision", "fp16",
                    "--batch", "2")
    assert list(data["endpoints"]) == [f"{SCALE}_fp16_image"]
    entry = data["endpoints"][f"{SCALE}_fp16_image"]
    assert entry["requests"] == 60 and entry["ok"] == 60  # 30/s x 2 s, none dropped
    assert data["mode"] == "open" and data["load"] == 30
    assert set(entry["latency_ms"]) >= {"p50", "p90", "p99"}


def test_errors_are_counted_by_status_without_an_endpoint(ab_gateway, tmp_path):
    data = loadtest(tmp_path, "--target", ab_gateway.address, "--concurrency", "2",
                    "--requests", "10", "--duration", "5", "--scale", "no-such-scale")
    assert data["overall"]["requests"] == 10 and data["overall"]["ok"] == 0
    assert data["overall"]["errors"] == {"INVALID_ARGUMENT": 10}
    assert data["endpoints"][""]["errors"] == {"INVALID_ARGUMENT": 10}
    assert data["overall"]["latency_ms"]["p50"] is None


# -- the gateway target against a stand-in servicer (no Triton) -------------------------------

def test_gateway_target_sends_headers_and_reads_the_endpoint_and_status():
    import asyncio

    import grpc

    from clipserve.loadtest.targets import GatewayTarget
    from clipserve.loadtest.workload import Call
    from clipserve.server.v1 import clipserve_pb2 as pb
    from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

    seen = []

    class Servicer(pb_grpc.EmbeddingServiceServicer):
        async def EmbedImages(self, request, context):
            md = dict(context.invocation_metadata())
            seen.append(md)
            if md.get("x-clip-precision") == "int3":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown precision")
            await context.send_initial_metadata((("x-clip-endpoint", "s_fp16_image"),))
            return pb.EmbedImagesResponse(embeddings=[pb.Embedding(values=[1.0])] *
                                          len(request.images))

    async def scenario():
        server = grpc.aio.server()
        pb_grpc.add_EmbeddingServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = GatewayTarget(f"127.0.0.1:{port}", timeout_s=5, api_key="k1")
        try:
            ok = await target.send(Call("image", (b"a", b"b"), (), (("x-clip-precision", "fp16"),),
                                        0))
            bad = await target.send(Call("image", (b"a",), (), (("x-clip-precision", "int3"),), 1))
        finally:
            await target.close()
            await server.stop(0)
        return ok, bad

    ok, bad = asyncio.run(scenario())
    assert ok == ("s_fp16_image", "OK")
    assert bad == ("", "INVALID_ARGUMENT")
    assert seen[0]["authorization"] == "Bearer k1" and seen[0]["x-clip-precision"] == "fp16"


def test_rate_sweep_reports_each_step_and_the_knee(ab_gateway, tmp_path):
    data = loadtest(tmp_path, "--target", ab_gateway.address, "--sweep", "rate:10,20",
                    "--duration", "1.5", "--precision", "int8", "--slo-ms", "5000",
                    "--plot", str(tmp_path / "sweep.png"))
    assert [step["load"] for step in data["steps"]] == [10.0, 20.0]
    assert all(step["mode"] == "open" for step in data["steps"])
    assert all(list(step["endpoints"]) == [f"{SCALE}_int8_image"] for step in data["steps"])
    sweep = data["sweep"]
    assert sweep["kind"] == "rate" and sweep["knee"]["first_over_slo"] is None
    assert sweep["saturation"]["items_per_s"] > 0
    assert (tmp_path / "sweep.png").stat().st_size > 1000


# -- Triton direct does what the gateway does (the benchmark's fair baseline) -----------------

def test_triton_direct_targets_compute_what_the_gateway_returns(ab_gateway, repository, triton):
    """The benchmark's Triton-direct client decodes JPEGs, tokenizes texts and scores labels
    itself: its results must be the gateway's, or the comparison would time different work."""
    import asyncio

    import numpy as np

    from clipserve.endpoints import Precision, Tower
    from clipserve.loadtest import bench_workloads as bw
    from clipserve.loadtest.workload import Call, builtin_images
    from clipserve.server.repository import Catalog
    from clipserve.server.v1 import clipserve_pb2 as pb

    catalog = Catalog.from_repository(repository)
    fp32 = Precision.FP32
    assert bw.skip_reason("classify", catalog, SCALE, fp32) == ""
    photo = tuple(bw.inputs("jpeg", [], photo_count=2).images)
    size = catalog.get(SCALE, fp32, Tower.IMAGE).sidecar.image_size
    digit = (builtin_images(1, size)[0],)
    text = ("a photo of the digit 3",)
    md = (("x-clip-scale", SCALE), ("x-clip-precision", "fp32"))

    async def direct(name, call):
        target = bw.triton_factory(name, catalog, SCALE, fp32, triton.grpc_url)()
        try:
            assert (await target.send(call))[1] == "OK"
            return await target.result(call)
        finally:
            await target.close()

    image_emb = asyncio.run(direct("jpeg", Call("image", photo, (), (), 0)))
    text_emb = asyncio.run(direct("text", Call("text", (), text, (), 0)))
    probs = asyncio.run(direct("classify", Call("classify", digit, (), (), 0)))

    got = ab_gateway.embed.EmbedImages(pb.EmbedImagesRequest(images=photo), metadata=md)
    np.testing.assert_allclose(image_emb, [e.values for e in got.embeddings], atol=2e-5)
    got = ab_gateway.embed.EmbedTexts(pb.EmbedTextsRequest(texts=text), metadata=md)
    np.testing.assert_allclose(text_emb, [e.values for e in got.embeddings], atol=2e-5)
    got = ab_gateway.classify.Classify(pb.ClassifyRequest(images=digit), metadata=md)
    np.testing.assert_allclose(probs, [c.probabilities for c in got.results], atol=1e-4)
    assert probs.argmax(axis=1).tolist() == [c.top_index for c in got.results]

