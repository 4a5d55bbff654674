"""Live quality, no sockets: bounded stores, the label-embedding cache, live OOD scoring,
ReportOutcome's sliding-window ECE, and the shadow comparison, through the servicer against the
fake backend of test_server_service."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from clipserve.calibration import (average_prompts, compare_to_reference, score_ece, score_kl,
                                   score_mcm)
from clipserve.endpoints import Precision, Tower
from clipserve.server.config import ServerConfig
from clipserve.server.errors import ServingError
from clipserve.server.bounded_store import BoundedStore
from clipserve.server.label_cache import LabelEmbeddingCache, LabelSetKey
from clipserve.server.outcomes import CalibrationWindow, LabelIndex
from clipserve.server.metrics import Eviction, ServerMetrics
from clipserve.server.routing import HEADER_PRECISION
from clipserve.server.service import HEADER_REQUEST_ID, HEADER_STORE_PREDICTION
from clipserve.server.v1 import clipserve_pb2 as pb
from tests.unit.test_server_service import (LABELS, SCALE, SIZE, TEMPERATURE, THRESHOLD,
                                            FakeContext, FakeTokenizer, Harness, fails,
                                            image_vector, name, png, text_vector)
from tests.unit.test_server_service import repo  # noqa: F401  (fixture)

PROMPTS = ("a {}", "the {}")  # the fake repository's sidecar templates
# Colours whose fake image vectors score on both sides of THRESHOLD against LABELS, two of
# them within 10% of it (0.549 and 0.614), so a misapplied threshold changes the count.
COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (200, 200, 0), (1, 108, 3), (120, 60, 200),
          (19, 4, 44), (30, 200, 90)]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def metrics() -> tuple[ServerMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return ServerMetrics(registry, (SCALE,)), registry


# -- the math ----------------------------------------------------------------------------------

def test_score_kl_is_zero_for_identical_rows_and_matches_the_definition():
    p = np.array([[0.5, 0.5], [0.2, 0.8]])
    q = np.array([[0.9, 0.1], [0.2, 0.8]])
    kl = score_kl(p, q)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl[1] == 0.0
    assert np.isfinite(score_kl(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))).all()


def test_compare_to_reference_of_identical_inputs_agree_fully():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    labels = rng.normal(size=(3, 8))
    labels /= np.linalg.norm(labels, axis=1, keepdims=True)
    cosines, kl, agreements = compare_to_reference(images, labels, 0.05, images, labels, 0.05)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-12)
    np.testing.assert_allclose(kl, 0.0, atol=1e-12)
    assert agreements == 6


# -- bounded storage ---------------------------------------------------------------------------

def test_bounded_store_evicts_oldest_beyond_its_byte_budget():
    evicted = []
    store = BoundedStore(100, lru=False, on_evict=evicted.append)
    for i in range(5):
        store.put(i, f"v{i}", 30)
    assert [k for k in range(5) if store.get(k) is not None] == [2, 3, 4]
    assert store.nbytes == 90 and evicted == [Eviction.CAPACITY] * 2
    store.put("huge", "x", 101)  # larger than the budget: not stored, counted
    assert store.get("huge") is None and len(store) == 3
    assert store.pop(3) == "v3" and store.nbytes == 60


def test_bounded_store_lru_get_keeps_an_entry():
    store = BoundedStore(60, lru=True)
    store.put("a", 1, 30)
    store.put("b", 2, 30)
    assert store.get("a") == 1  # now the newest
    store.put("c", 3, 30)
    assert store.get("a") == 1 and store.get("b") is None


def test_bounded_store_ttl_counts_from_insertion():
    clock, evicted = FakeClock(), []
    store = BoundedStore(1000, ttl_s=10, lru=False, clock=clock, on_evict=evicted.append)
    store.put("old", 1, 1)
    clock.now = 6
    store.put("new", 2, 1)
    assert store.get("old") == 1
    clock.now = 10.5
    assert store.get("old") is None and store.get("new") == 2
    assert evicted == [Eviction.TTL]


def test_label_index_finds_labels_by_digest_only():
    labels = ["zero", "one", "two", "x" * 10_000]
    index = LabelIndex(labels)
    assert [index.index(label) for label in labels] == [0, 1, 2, 3]
    assert index.index("three") is None and index.index("") is None
    assert index.nbytes == 8 * len(labels)


def test_calibration_window_is_the_ece_of_the_last_n_outcomes():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.1, 1.0, 50)
    correct = rng.random(50) < confidence
    window = CalibrationWindow(20)
    for c, ok in zip(confidence, correct):
        window.add(c, ok)
    ece, accuracy, mean_confidence = window.summary()
    assert len(window) == 20
    assert ece == pytest.approx(score_ece(confidence[-20:], correct[-20:]), abs=1e-12)
    assert accuracy == pytest.approx(correct[-20:].mean())
    assert mean_confidence == pytest.approx(confidence[-20:].mean())
    assert CalibrationWindow(5).summary() == (0.0, 0.0, 0.0)


# -- the label-embedding cache -----------------------------------------------------------------

KEY = LabelSetKey(SCALE, Precision.FP32, ("cat", "dog"), ("a {}",))


async def test_label_cache_computes_once_for_concurrent_callers():
    calls = []
    release = asyncio.Event()

    async def compute(key):
        calls.append(key)
        await release.wait()
        return np.ones((2, 4), np.float32)

    cache = LabelEmbeddingCache(compute, metrics()[0], 1 << 20)
    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(5)]
    await asyncio.sleep(0.01)
    waiters[0].cancel()  # one caller's deadline passes: the others still get the result
    release.set()
    results = await asyncio.gather(*waiters[1:])
    assert len(calls) == 1 and all(r.shape == (2, 4) for r in results)
    assert cache.peek(KEY) is not None and await cache.get(KEY) is results[0]
    assert len(calls) == 1


async def test_label_cache_failure_reaches_callers_and_prefetch_backs_off():
    clock = FakeClock()
    attempts = []

    async def compute(key):
        attempts.append(clock.now)
        raise ServingError.unavailable("text endpoint down")

    cache = LabelEmbeddingCache(compute, metrics()[0], 1 << 20, retry_s=5.0, clock=clock)
    with pytest.raises(ServingError):
        await cache.get(KEY)
    cache.prefetch(KEY)  # failed just now: no new attempt
    await asyncio.sleep(0)
    assert attempts == [0.0]
    clock.now = 6.0
    cache.prefetch(KEY)
    await asyncio.sleep(0.01)
    assert attempts == [0.0, 6.0]


# -- live OOD through the servicer -------------------------------------------------------------

def fake_label_embeddings(labels=LABELS, templates=PROMPTS) -> np.ndarray:
    """What the fake text tower gives the label set: the reference for live scoring."""
    tokenizer = FakeTokenizer()
    prompts = [t.replace("{}", label) for label in labels for t in templates]
    ids, _ = tokenizer.encode(prompts)
    return average_prompts(np.stack([text_vector(row) for row in ids]), len(labels))


def fake_image_embeddings(colors) -> np.ndarray:
    return np.stack([image_vector(np.broadcast_to(np.array(c, np.uint8), (SIZE, SIZE, 3)))
                     for c in colors])


@pytest.fixture
async def live(repo):
    """A harness whose background work (label warm-up, shadow worker) runs."""
    harnesses = []

    async def make(**config):
        harness = Harness(repo, **config)
        harness.background = asyncio.create_task(harness.service.run_background())
        for _ in range(200):  # the warm-up computes both deployment label sets
            if len(harness.service.live.labels) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(harness.service.live.labels) == 2
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.background.cancel()
        await asyncio.gather(harness.background, return_exceptions=True)
        harness.decoder.close()


def sample(h, metric, **labels):
    return h.registry.get_sample_value(metric, {"scale": SCALE, **labels}) or 0


async def test_every_embedded_image_is_scored_against_the_deployment_labels(live):
    h = await live()
    expected = score_mcm(fake_image_embeddings(COLORS).astype(np.float64)
                         @ fake_label_embeddings().astype(np.float64).T, TEMPERATURE)
    flagged = int((expected < THRESHOLD).sum())
    assert 0 < flagged < len(COLORS), "the colours must land on both sides of the threshold"
    assert ((expected >= 0.9 * THRESHOLD) & (expected < THRESHOLD)).any()
    assert ((expected >= THRESHOLD) & (expected < 1.1 * THRESHOLD)).any()
    for precision in ("fp32", "int8"):
        await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(c) for c in COLORS[:5]]),
                                    FakeContext([(HEADER_PRECISION, precision)]))
        await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(c) for c in COLORS[5:]]),
                                    FakeContext([(HEADER_PRECISION, precision)]))
        labels = {"precision": precision, "label_set": "deployment"}
        assert sample(h, "clipserve_ood_flagged_total", **labels) == flagged
        assert sample(h, "clipserve_ood_score_count", **labels) == len(COLORS)
        assert sample(h, "clipserve_ood_score_sum", **labels) == pytest.approx(expected.sum())
        assert sample(h, "clipserve_confidence_count", **labels) == len(COLORS)
    assert sample(h, "clipserve_ood_unscored_total", precision="fp32",
                  reason="labels_pending") == 0


async def test_a_repository_without_domain_data_serves_embeddings_but_scores_nothing(repo):
    """What `clipserve export` writes for a model measured only on the built-in digits: no
    labels, temperature or threshold. Embeddings are served; live OOD says not calibrated."""
    import dataclasses

    from clipserve.endpoints import Sidecar
    from clipserve.export.datasets import builtin_digits_suite
    from clipserve.export.quality import image_sidecar_fields

    suite = dataclasses.replace(builtin_digits_suite(), domain_measured=False)
    fields = image_sidecar_fields(suite, {}, Precision.FP32, "mcm", None, "clipserve export")
    for car_path in repo.glob("*_image/clipserve.json"):
        dataclasses.replace(Sidecar.read(car_path.parent), **fields).write(car_path.parent)
    h = Harness(repo)
    try:
        response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), png()]),
                                               FakeContext())
        assert len(response.embeddings) == 2
        assert sample(h, "clipserve_ood_unscored_total", precision="fp32",
                      reason="not_calibrated") == 2
        assert not sample(h, "clipserve_ood_score_count", precision="fp32",
                          label_set="deployment")
        details = await fails(h.service.Classify(pb.ClassifyRequest(
            images=[png()], labels=["a", "b"]), FakeContext()),
            grpc.StatusCode.FAILED_PRECONDITION)
        assert "clipserve evaluate --repository REPO --eval-data DIR --write-sidecars" in details
    finally:
        h.decoder.close()


async def test_images_before_the_labels_are_embedded_count_as_unscored(repo):
    h = Harness(repo)  # no background warm-up
    try:
        await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), png()]), FakeContext())
        assert sample(h, "clipserve_ood_unscored_total", precision="fp32",
                      reason="labels_pending") == 2
        for _ in range(100):  # the call started the computation in the background
            if h.service.live.labels.has(h.service.live.deployment_key(
                    h.catalog.get(SCALE, Precision.FP32, Tower.IMAGE))):
                break
            await asyncio.sleep(0.01)
        await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), FakeContext())
        assert sample(h, "clipserve_ood_score_count", precision="fp32",
                      label_set="deployment") == 1
    finally:
        h.decoder.close()


async def test_a_failing_live_scorer_never_fails_the_call(live, caplog):
    h = await live()

    def broken(*args, **kwargs):
        raise RuntimeError("bug in live scoring")

    h.service.live.record = broken
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), png()]),
                                           FakeContext())
    assert len(response.embeddings) == 2
    await h.service.Classify(pb.ClassifyRequest(images=[png()]), FakeContext())
    assert sample(h, "clipserve_ood_unscored_total", precision="fp32", reason="error") == 3
    assert "live scoring of tiny_fp32_image failed" in caplog.text


async def test_stream_images_are_scored_too(live):
    h = await live()
    items = [pb.EmbedStreamRequest(id=str(i), image=png(c)) for i, c in enumerate(COLORS)]
    items.append(pb.EmbedStreamRequest(id="t", text="not an image"))

    async def requests():
        for item in items:
            yield item

    [r async for r in h.service.EmbedStream(requests(), FakeContext())]
    assert sample(h, "clipserve_ood_score_count", precision="fp32",
                  label_set="deployment") == len(COLORS)


async def test_classify_scores_with_its_own_labels_and_embeds_them_once(live):
    h = await live()
    request = pb.ClassifyRequest(images=[png(c) for c in COLORS[:3]], labels=["red", "green"],
                                 prompt_templates=["a {} image"])
    response = await h.service.Classify(request, FakeContext())
    text_calls = sum(1 for c in h.backend.calls if c[1] == "input_ids")
    again = await h.service.Classify(request, FakeContext())
    assert sum(1 for c in h.backend.calls if c[1] == "input_ids") == text_calls  # cached
    assert [r.probabilities for r in again.results] == [r.probabilities for r in response.results]
    flagged = sum(r.out_of_distribution for r in response.results)
    assert sample(h, "clipserve_ood_score_count", precision="fp32", label_set="request") == 6
    assert sample(h, "clipserve_ood_flagged_total", precision="fp32",
                  label_set="request") == 2 * flagged
    assert sample(h, "clipserve_ood_score_count", precision="fp32",
                  label_set="deployment") == 0
    # Without labels: the deployment set, already cached by the warm-up.
    before = len(h.backend.calls)
    await h.service.Classify(pb.ClassifyRequest(images=[png()]), FakeContext())
    assert all(c[1] == "pixels" for c in h.backend.calls[before:])
    assert sample(h, "clipserve_ood_score_count", precision="fp32",
                  label_set="deployment") == 1


async def test_ood_labels_without_a_fitted_threshold_are_refused(repo):
    with pytest.raises(ValueError) as err:
        Harness(repo, ood_labels=("red", "green", "blue"))
    message = str(err.value)
    assert "red,green,blue has no fitted OOD threshold" in message
    assert "zero, one, two" in message  # what the endpoints were fitted on
    assert "clipserve evaluate --repository REPO --eval-data DIR --write-sidecars" in message


async def test_configured_ood_labels_of_the_fitted_set_take_their_own_prompts(live):
    labels = ("two", "zero", "one")  # the sidecar's set, another order
    h = await live(ood_labels=labels, ood_prompts=("a {} thing",), max_batch_items=len(COLORS))
    key = h.service.live.deployment_key(h.catalog.get(SCALE, Precision.FP32, Tower.IMAGE))
    assert key.labels == labels and key.templates == ("a {} thing",)
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(c) for c in COLORS]),
                                FakeContext())
    expected = score_mcm(fake_image_embeddings(COLORS).astype(np.float64) @ fake_label_embeddings(
        labels, ("a {} thing",)).astype(np.float64).T, TEMPERATURE)
    assert sample(h, "clipserve_ood_score_sum", precision="fp32",
                  label_set="deployment") == pytest.approx(expected.sum())


# -- ReportOutcome -----------------------------------------------------------------------------

async def classify(h, colors, labels=("red", "green", "blue"), precision="fp32"):
    ctx = FakeContext([(HEADER_PRECISION, precision)])
    response = await h.service.Classify(pb.ClassifyRequest(
        images=[png(c) for c in colors], labels=list(labels)), ctx)
    assert dict(ctx.initial_metadata)[HEADER_REQUEST_ID] == response.request_id != ""
    return response


def outcome_request(request_id, *pairs):
    return pb.ReportOutcomeRequest(request_id=request_id, outcomes=[
        pb.Outcome(index=i, true_label=label) for i, label in pairs])


async def test_report_outcome_ece_equals_offline_ece_of_the_same_predictions(live):
    h = await live()
    rng = np.random.default_rng(7)
    truths_by_call, confidences, correct = [], [], []
    for _ in range(6):
        colors = [tuple(int(x) for x in rng.integers(0, 256, 3)) for _ in range(4)]
        response = await classify(h, colors)
        truths = [str(rng.choice(["red", "green", "blue"])) for _ in colors]
        truths_by_call.append((response, truths))
    for response, truths in truths_by_call:
        reply = await h.service.ReportOutcome(
            outcome_request(response.request_id, *enumerate(truths)), FakeContext())
        assert reply.accepted == len(truths)
        assert reply.endpoint.name == name(Precision.FP32, Tower.IMAGE)
        for result, truth in zip(response.results, truths):
            confidences.append(result.confidence)
            correct.append(result.top_label == truth)
    offline = score_ece(np.array(confidences), np.array(correct))
    assert 0 < offline  # a meaningful comparison
    assert sample(h, "clipserve_calibration_ece", precision="fp32") == pytest.approx(
        offline, abs=1e-9)
    assert sample(h, "clipserve_calibration_accuracy", precision="fp32") == pytest.approx(
        np.mean(correct))
    assert sample(h, "clipserve_calibration_window_samples", precision="fp32") == 24
    assert sample(h, "clipserve_outcomes_total", precision="fp32",
                  result="correct") == sum(correct)
    assert sample(h, "clipserve_outcomes_total", precision="fp32",
                  result="incorrect") == 24 - sum(correct)
    assert len(h.service.live.outcomes) == 0  # fully reported predictions are freed
    assert h.count("ReportOutcome", "OK") == 6


async def test_report_outcome_for_embed_images_uses_the_deployment_labels(live):
    h = await live()
    response = await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(), png()]),
                                           FakeContext([(HEADER_PRECISION, "int8")]))
    await h.service.ReportOutcome(outcome_request(response.request_id, (1, LABELS[2])),
                                  FakeContext())
    assert sample(h, "clipserve_calibration_window_samples", precision="int8") == 1
    assert len(h.service.live.outcomes) == 1  # image 0 may still be reported


async def test_report_outcome_errors(live):
    h = await live()
    response = await classify(h, COLORS[:2])
    rid = response.request_id
    cases = [
        (outcome_request("nope", (0, "red")), grpc.StatusCode.NOT_FOUND, "no stored prediction"),
        (outcome_request(rid), grpc.StatusCode.INVALID_ARGUMENT, "outcomes is empty"),
        (outcome_request("", (0, "red")), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (outcome_request(rid, (2, "red")), grpc.StatusCode.INVALID_ARGUMENT,
         "index 2, but request"),
        (outcome_request(rid, (0, "purple")), grpc.StatusCode.INVALID_ARGUMENT,
         "'purple' is not one of the 3 labels"),
        (outcome_request(rid, (0, "red"), (0, "blue")), grpc.StatusCode.ALREADY_EXISTS,
         "image 0"),
    ]
    for request, code, fragment in cases:
        assert fragment in await fails(h.service.ReportOutcome(request, FakeContext()), code)
    assert sample(h, "clipserve_calibration_window_samples", precision="fp32") == 0  # atomic
    await h.service.ReportOutcome(outcome_request(rid, (0, "red")), FakeContext())
    await fails(h.service.ReportOutcome(outcome_request(rid, (0, "red")), FakeContext()),
                grpc.StatusCode.ALREADY_EXISTS)
    assert h.count("ReportOutcome", "NOT_FOUND", precision="none", scale="none") == 1


async def test_predictions_are_stored_only_when_asked_with_a_zero_sample_fraction(live):
    h = await live(outcome_sample_fraction=0.0)
    colors = [png(c) for c in COLORS[:2]]
    quiet = await h.service.Classify(pb.ClassifyRequest(images=colors, labels=LABELS),
                                     FakeContext())
    asked = await h.service.Classify(pb.ClassifyRequest(images=colors, labels=LABELS),
                                     FakeContext([(HEADER_STORE_PREDICTION, "1")]))
    embedded = await h.service.EmbedImages(pb.EmbedImagesRequest(images=colors),
                                           FakeContext([(HEADER_STORE_PREDICTION, "true")]))
    assert len(h.service.live.outcomes) == 2
    await fails(h.service.ReportOutcome(outcome_request(quiet.request_id, (0, LABELS[0])),
                                        FakeContext()), grpc.StatusCode.NOT_FOUND)
    for response in (asked, embedded):
        reply = await h.service.ReportOutcome(
            outcome_request(response.request_id, (0, LABELS[0])), FakeContext())
        assert reply.accepted == 1
    # Live OOD and confidence are recorded for every call, stored or not.
    assert sample(h, "clipserve_confidence_count", precision="fp32",
                  label_set="request") == 4


async def test_the_store_header_can_opt_out_and_rejects_other_values(live):
    h = await live()  # default: every call stored
    request = pb.ClassifyRequest(images=[png()], labels=LABELS)
    await h.service.Classify(request, FakeContext([(HEADER_STORE_PREDICTION, "0")]))
    assert len(h.service.live.outcomes) == 0
    message = await fails(h.service.Classify(
        request, FakeContext([(HEADER_STORE_PREDICTION, "maybe")])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert HEADER_STORE_PREDICTION in message and "'maybe'" in message
    await h.service.Classify(request, FakeContext())
    assert len(h.service.live.outcomes) == 1


async def test_predictions_expire_and_the_store_stays_within_its_budget(live):
    h = await live(outcome_ttl_s=60, outcome_store_mib=1)
    store = h.service.live.outcomes.store
    clock = FakeClock()
    store._clock = clock
    response = await classify(h, COLORS[:1])
    clock.now = 61
    await fails(h.service.ReportOutcome(outcome_request(response.request_id, (0, "red")),
                                        FakeContext()), grpc.StatusCode.NOT_FOUND)
    assert h.registry.get_sample_value("clipserve_predictions_evicted_total",
                                       {"reason": "ttl"}) == 1
    # Large label sets: the store evicts the oldest to stay under 1 MiB.
    labels = [f"label {i} " + "x" * 1000 for i in range(500)]
    for _ in range(300):
        await classify(h, COLORS[:1], labels=labels)
    assert store.nbytes <= 1 << 20
    assert h.registry.get_sample_value("clipserve_predictions_evicted_total",
                                       {"reason": "capacity"}) > 0
    assert h.registry.get_sample_value("clipserve_predictions_stored_bytes") == store.nbytes


# -- shadow ------------------------------------------------------------------------------------

async def wait_idle(h):
    for _ in range(500):
        if not h.service.live.shadow.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("shadow queue did not drain")


def shadow(h, metric, precision, reference="fp32"):
    return sample(h, metric, precision=precision, reference=reference)


async def test_shadow_fp32_against_fp32_agrees_fully(live):
    h = await live(shadow_fraction=1.0)
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png(c) for c in COLORS[:5]]),
                                FakeContext())
    await h.service.Classify(pb.ClassifyRequest(images=[png(c) for c in COLORS[5:]],
                                                labels=["a", "b"]), FakeContext())
    await wait_idle(h)
    n = len(COLORS)
    assert shadow(h, "clipserve_shadow_images_total", "fp32") == n
    assert shadow(h, "clipserve_shadow_agreements_total", "fp32") == n
    assert shadow(h, "clipserve_shadow_cosine_sum", "fp32") == pytest.approx(n, abs=1e-9)
    assert shadow(h, "clipserve_shadow_kl_sum", "fp32") == pytest.approx(0, abs=1e-9)
    # Reference embeddings went to the fp32 image endpoint but are not served items.
    assert sample(h, "clipserve_items_total", tower="image", precision="fp32") == n


async def test_shadow_measures_a_perturbed_precision(live):
    h = await live(shadow_fraction=1.0, max_batch_items=len(COLORS))
    original = h.backend.embed
    rng = np.random.default_rng(5)

    async def perturbed(model, input_name, batch, timeout_s):
        out = await original(model, input_name, batch, timeout_s)
        if model == name(Precision.INT8, Tower.IMAGE):
            out = out + rng.normal(scale=0.3, size=out.shape).astype(np.float32)
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    h.backend.embed = perturbed
    response = await h.service.EmbedImages(
        pb.EmbedImagesRequest(images=[png(c) for c in COLORS]),
        FakeContext([(HEADER_PRECISION, "int8")]))
    await wait_idle(h)
    served = np.array([e.values for e in response.embeddings])
    reference = fake_image_embeddings(COLORS)
    cosines, kl, agreements = compare_to_reference(
        served, fake_label_embeddings(), TEMPERATURE, reference,
        fake_label_embeddings(), TEMPERATURE)  # the fake text towers are the same
    assert cosines.max() < 1 - 1e-3 and kl.sum() > 0
    assert shadow(h, "clipserve_shadow_images_total", "int8") == len(COLORS)
    assert shadow(h, "clipserve_shadow_agreements_total", "int8") == agreements
    assert shadow(h, "clipserve_shadow_cosine_sum", "int8") == pytest.approx(cosines.sum())
    assert shadow(h, "clipserve_shadow_kl_sum", "int8") == pytest.approx(kl.sum())


async def test_shadow_never_delays_the_caller_and_drops_when_full(live):
    h = await live(shadow_fraction=1.0, shadow_queue_mib=1)
    original = h.backend.embed
    blocked = asyncio.Event()

    async def stalled_reference(model, input_name, batch, timeout_s):
        if model == name(Precision.FP32, Tower.IMAGE) and timeout_s == h.config.request_timeout_s:
            await blocked.wait()  # the reference never answers while the test runs
        return await original(model, input_name, batch, timeout_s)

    h.backend.embed = stalled_reference
    loop = asyncio.get_running_loop()
    images = [png(c) for c in COLORS[:5]]
    calls = 400
    for _ in range(calls):  # ~4.8 KB queued per call: well past 1 MiB
        started = loop.time()
        await asyncio.wait_for(h.service.EmbedImages(
            pb.EmbedImagesRequest(images=images), FakeContext([(HEADER_PRECISION, "int8")])), 2)
        assert loop.time() - started < 1.0
    shadow_queue = h.registry.get_sample_value("clipserve_shadow_queue_bytes")
    assert 0 < shadow_queue <= 1 << 20
    dropped = sample(h, "clipserve_shadow_dropped_total", precision="int8",
                     reason="queue_full")
    assert dropped > 0
    assert dropped + h.service.live.shadow.pending == calls
    blocked.set()
    await wait_idle(h)
    assert h.registry.get_sample_value("clipserve_shadow_queue_bytes") == 0


async def test_shadow_reference_failure_is_counted_not_raised(live):
    h = await live(shadow_fraction=1.0)
    h.set_ready([s.name for s in h.catalog if s.name != name(Precision.FP32, Tower.IMAGE)])
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]),
                                FakeContext([(HEADER_PRECISION, "int8")]))
    await wait_idle(h)
    assert sample(h, "clipserve_shadow_dropped_total", precision="int8", reason="error") == 1
    assert shadow(h, "clipserve_shadow_images_total", "int8") == 0


async def test_shadow_is_off_by_default(live):
    h = await live()
    await h.service.EmbedImages(pb.EmbedImagesRequest(images=[png()]), FakeContext())
    assert h.service.live.shadow.pending == 0
    assert shadow(h, "clipserve_shadow_images_total", "fp32") == 0


# -- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, fragment", [
    ({"shadow_fraction": 1.5}, "shadow_fraction must be 0..1"),
    ({"shadow_precision": "fp8"}, "valid precisions"),
    ({"ood_labels": ("only",)}, "at least 2 distinct labels"),
    ({"ood_prompts": ("no slot",)}, "has no {} for the label"),
    ({"calibration_window": 0}, "calibration_window must be at least 1"),
    ({"outcome_ttl_s": 0}, "outcome_ttl_s must be positive"),
    ({"triton_metrics_port": 70000}, "triton_metrics_port must be 0..65535"),
])
def test_live_quality_config_is_validated(changes, fragment):
    with pytest.raises(ValueError, match="invalid server config") as info:
        ServerConfig(**changes)
    assert fragment in str(info.value)
    assert ServerConfig(shadow_precision="INT8").shadow_reference is Precision.INT8
