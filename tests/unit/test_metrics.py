"""The metrics page as Prometheus reads it: exact moves per call, phases, in-flight, build info,
and every label value drawn from its enum (request data never becomes a label)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clipserve.endpoints import Precision, Tower
from clipserve.server.metrics import (BATCH_BUCKETS, CONFIDENCE_BUCKETS, Eviction, LabelSet,
                                      Protocol,
                                      Method, OutcomeResult, Phase, ShadowDrop, Unscored)
from clipserve.server.routing import HEADER_PRECISION, HEADER_ROUTING_KEY
from clipserve.server.v1 import clipserve_pb2 as pb
from tests.unit.test_live_quality import live  # noqa: F401  (fixture)
from tests.unit.test_server_service import (MAX_BATCH, SCALE, Aborted, FakeContext, png,
                                            repo)  # noqa: F401  (repo: fixture)

Samples = dict[tuple[str, frozenset], float]


def scrape(registry) -> Samples:
    """The registry's exposition, parsed by prometheus_client's text parser."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):  # creation timestamps, not measurements
                samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def delta(after: Samples, before: Samples) -> dict[tuple[str, frozenset], float]:
    """Samples that changed (histogram buckets, counters, gauges), by how much."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def key(name: str, **labels) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


async def test_an_embed_images_call_moves_exactly_its_counters(live):
    h = await live()
    before = scrape(h.registry)
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()] * 5),
                                FakeContext([(HEADER_PRECISION, "int8")]))
    moved = delta(scrape(h.registry), before)
    endpoint = {"scale": SCALE, "precision": "int8"}
    assert moved[key("clipserve_requests_total", method="EmbedImages", code="OK", protocol="grpc",
                     **endpoint)] == 1
    assert moved[key("clipserve_request_duration_seconds_count", method="EmbedImages", protocol="grpc",
                     **endpoint)] == 1
    assert moved[key("clipserve_items_total", tower="image", **endpoint)] == 5
    # Five images in chunks of max_batch_size 3: Triton saw a 3 and a 2.
    assert MAX_BATCH == 3
    assert moved[key("clipserve_batch_size_count", tower="image", **endpoint)] == 2
    assert moved[key("clipserve_batch_size_sum", tower="image", **endpoint)] == 5
    assert moved[key("clipserve_batch_size_bucket", tower="image", le="2.0", **endpoint)] == 1
    assert moved[key("clipserve_batch_size_bucket", tower="image", le="4.0", **endpoint)] == 2
    for phase in Phase:
        assert moved[key("clipserve_request_phase_seconds_count", method="EmbedImages",
                         phase=phase.value, **endpoint)] == 1
    assert moved[key("clipserve_ood_score_count", label_set="deployment", **endpoint)] == 5
    assert moved[key("clipserve_confidence_count", label_set="deployment", **endpoint)] == 5
    assert moved[key("clipserve_predictions_stored")] == 1
    # Nothing else moved: no text items, no other precision, no shadow.
    families = {name for name, _ in moved}
    assert families <= {
        "clipserve_requests_total", "clipserve_request_duration_seconds_count",
        "clipserve_request_duration_seconds_sum", "clipserve_request_duration_seconds_bucket",
        "clipserve_request_phase_seconds_count", "clipserve_request_phase_seconds_sum",
        "clipserve_request_phase_seconds_bucket", "clipserve_items_total",
        "clipserve_batch_size_count", "clipserve_batch_size_sum", "clipserve_batch_size_bucket",
        "clipserve_ood_score_count", "clipserve_ood_score_sum", "clipserve_ood_score_bucket",
        "clipserve_ood_flagged_total", "clipserve_confidence_count", "clipserve_confidence_sum",
        "clipserve_confidence_bucket", "clipserve_predictions_stored",
        "clipserve_predictions_stored_bytes", "clipserve_label_cache_requests_total"}, families
    assert all(dict(labels).get("precision", "int8") == "int8" for _, labels in moved)


async def test_text_calls_and_failures_are_counted_once(live):
    h = await live()
    before = scrape(h.registry)
    await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["a", "b", "c", "d"]), FakeContext())
    with pytest.raises(Aborted):
        await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=[]), FakeContext())
    moved = delta(scrape(h.registry), before)
    fp32 = {"scale": SCALE, "precision": "fp32"}
    assert moved[key("clipserve_items_total", tower="text", **fp32)] == 4
    assert moved[key("clipserve_batch_size_count", tower="text", **fp32)] == 2
    assert moved[key("clipserve_requests_total", method="EmbedTexts", code="OK", protocol="grpc", **fp32)] == 1
    assert moved[key("clipserve_requests_total", method="EmbedTexts", code="INVALID_ARGUMENT", protocol="grpc",
                     scale="none", precision="none")] == 1
    assert moved[key("clipserve_request_phase_seconds_count", method="EmbedTexts",
                     phase="preprocess", **fp32)] == 1
    assert key("clipserve_request_phase_seconds_count", method="EmbedTexts", phase="queue",
               **fp32) not in moved  # texts do not queue for a decode thread
    assert not any(name.startswith("clipserve_ood") for name, _ in moved)


async def test_in_flight_counts_calls_being_served(live):
    h = await live()
    h.backend.delay_s = 0.2
    gauge = {"method": "EmbedTexts"}
    call = asyncio.create_task(h.service.EmbedTexts(pb.EmbedTextsRequest(texts=["x"]),
                                                    FakeContext()))
    await asyncio.sleep(0.05)
    assert h.registry.get_sample_value("clipserve_requests_in_flight", gauge) == 1
    await call
    assert h.registry.get_sample_value("clipserve_requests_in_flight", gauge) == 0


async def test_build_info_and_zeroed_series(live):
    h = await live()
    samples = scrape(h.registry)
    info = [labels for name, labels in samples if name == "clipserve_build_info"]
    assert len(info) == 1 and dict(info[0])["api"] == "clipserve.v1"
    assert samples[("clipserve_build_info", info[0])] == 1
    # Per-endpoint OOD and outcome counters exist at 0 before any image, so ratios and
    # increase() have a series to start from.
    for precision in ("fp32", "int8"):
        assert samples[key("clipserve_ood_flagged_total", scale=SCALE, precision=precision,
                           label_set="deployment")] == 0
        assert samples[key("clipserve_outcomes_total", scale=SCALE, precision=precision,
                           result="correct")] == 0


def test_confidence_buckets_are_the_ece_bins():
    assert len(CONFIDENCE_BUCKETS) == 15 and CONFIDENCE_BUCKETS[-1] == 1.0
    assert CONFIDENCE_BUCKETS[0] == pytest.approx(1 / 15)
    assert BATCH_BUCKETS[-1] >= 64


SECRET = "SECRET-REQUEST-DATA"


async def test_label_values_stay_within_their_enums(live):
    h = await live(shadow_fraction=1.0)
    # Calls carrying request data everywhere it could leak: labels, templates, texts, routing
    # keys, a bad header value, ids, outcomes.
    ctx_key = [(HEADER_ROUTING_KEY, SECRET)]
    await h.service.EmbedTexts(pb.EmbedTextsRequest(texts=[SECRET]), FakeContext(ctx_key))
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), FakeContext(ctx_key))
    response = await h.service.Classify(pb.ClassifyRequest(
        images=[png()], labels=[SECRET, SECRET + "2"], prompt_templates=[SECRET + " {}"]),
        FakeContext())
    await h.service.ReportOutcome(pb.ReportOutcomeRequest(
        request_id=response.request_id, outcomes=[pb.Outcome(index=0, true_label=SECRET)]),
        FakeContext())
    for bad in ([(HEADER_PRECISION, SECRET)], [("x-clip-scale", SECRET)]):
        with pytest.raises(Aborted):
            await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), FakeContext(bad))
    with pytest.raises(Aborted):
        await h.service.ReportOutcome(pb.ReportOutcomeRequest(
            request_id=SECRET, outcomes=[pb.Outcome(true_label=SECRET)]), FakeContext())

    async def items():
        yield pb.EmbedStreamRequest(id=SECRET, text=SECRET)
        yield pb.EmbedStreamRequest(id=SECRET + "i", image=png())

    [r async for r in h.service.EmbedStream(items(), FakeContext())]
    for _ in range(100):
        if not h.service.live.shadow.pending:
            break
        await asyncio.sleep(0.01)

    text = generate_latest(h.registry).decode()
    assert SECRET not in text
    precisions = {p.value for p in Precision} | {"none"}
    allowed = {
        "method": {m.value for m in Method}, "scale": {SCALE, "none"},
        "precision": precisions, "reference": precisions,
        "code": {c.name for c in grpc.StatusCode}, "tower": {t.value for t in Tower},
        "phase": {p.value for p in Phase}, "label_set": {s.value for s in LabelSet},
        "protocol": {p.value for p in Protocol},
        "reason": ({r.value for r in Unscored} | {r.value for r in ShadowDrop}
                   | {r.value for r in Eviction}),
        "result": {"ok", "error", "hit", "miss"} | {r.value for r in OutcomeResult},
    }
    seen = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    float(value)
                elif family.name == "clipserve_build_info":
                    assert label in ("version", "api")
                else:
                    assert label in allowed, (sample.name, label)
                    assert value in allowed[label], (sample.name, label, value)
                    seen[label].add(value)
    # The calls above did reach these label values (the check above was not vacuous).
    assert {"EmbedTexts", "EmbedImages", "Classify", "ReportOutcome",
            "EmbedStream"} <= seen["method"]
    assert {"deployment", "request"} <= seen["label_set"]
    assert "fp32" in seen["reference"] and "INVALID_ARGUMENT" in seen["code"]
