"""Live metrics on the real gateway in front of the real tritonserver: a mixed load of held-out
digits (in distribution), letters and noise (out of distribution) at two precisions, then
ReportOutcome with the true labels, with every call mirrored to FP32. /metrics is scraped over
HTTP and read with prometheus_client's text parser between phases; each test checks a delta
against what was sent or against an offline computation on the same images.

Set CLIPSERVE_METRICS_DUMP=path to keep the final /metrics page.
"""

from __future__ import annotations

import io
import os
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clipserve.calibration import average_prompts, load_ood_state, score_ece, score_ood
from clipserve.export.report import read_rows
from clipserve.endpoints import Precision, Tower
from clipserve.server.metrics import (Eviction, LabelSet, Method, OutcomeResult, Phase,
                                      Protocol, ShadowDrop, Unscored)
from clipserve.server.repository import Catalog
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc
from tests.integration.reference import served_runner
from tests.integration.test_gateway import CALL_TIMEOUT_S, GatewayThread, config_for

pytestmark = pytest.mark.integration

PRECISIONS = (Precision.FP32, Precision.INT8)
BATCH = 64  # images per call: the endpoints' max_batch_size, so one Triton request per call
# Calls go through Triton, the offline reference through the same runtime in this process
# (other thread counts, so other summation orders): a score within float noise of the threshold may
# land on the other side. Two images per set is generous for ~1e-6 differences.
BORDERLINE_IMAGES = 2

Samples = dict[tuple[str, frozenset], float]


def encode(images: np.ndarray) -> list[bytes]:
    out = []
    for pixels in images:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def parse(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str, **labels) -> float:
    """Sum of ``name`` over series matching ``labels`` (others summed away, as PromQL sum)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def precision_md(precision: Precision) -> tuple:
    return (("x-clip-precision", precision.value),)


class Load:
    """Runs the phases and keeps a scrape after each."""

    def __init__(self, gw: GatewayThread, catalog: Catalog, repository: Path, triton):
        from clipserve.export import digits

        self.gw, self.catalog = gw, catalog
        self.scale = catalog.scales[0]
        size = catalog.get(self.scale, Precision.FP32, Tower.IMAGE).sidecar.image_size
        self.data = digits.load(size)
        self.class_names = digits.CLASS_NAMES
        self.report = {(r["precision"], r["tower"]): r
                       for r in read_rows(repository / "report.json")}
        self.triton = triton
        self.scrapes: dict[str, Samples] = {}
        self.triton_scrapes: dict[str, Samples] = {}
        self.sent: dict[str, dict] = defaultdict(lambda: defaultdict(int))
        self.mirrored = defaultdict(int)  # precision -> images sent to the shadow
        self.classified: dict[Precision, list[tuple[float, bool]]] = defaultdict(list)
        self.text = ""

    def scrape(self, phase: str) -> None:
        self.wait_for_shadow()
        self.text = scrape_text(self.gw.gateway.metrics_port)
        self.scrapes[phase] = parse(self.text)
        self.triton_scrapes[phase] = parse(urllib.request.urlopen(
            self.triton.metrics_url, timeout=10).read().decode())

    def wait_for_shadow(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            samples = parse(scrape_text(self.gw.gateway.metrics_port))
            done = all(total(samples, "clipserve_shadow_images_total", precision=p.value)
                       + total(samples, "clipserve_shadow_dropped_total", precision=p.value)
                       >= self.mirrored[p.value] for p in PRECISIONS)
            if done:
                return
            assert time.monotonic() < deadline, "shadow comparisons did not finish"
            time.sleep(0.2)

    def embed(self, phase: str, images: np.ndarray) -> None:
        data = encode(images)
        for precision in PRECISIONS:
            for i in range(0, len(data), BATCH):
                chunk = data[i:i + BATCH]
                response = self.gw.embed.EmbedImages(pb.EmbedImagesRequest(images=chunk),
                                                     metadata=precision_md(precision),
                                                     timeout=CALL_TIMEOUT_S)
                assert len(response.embeddings) == len(chunk) and response.request_id
                self.sent[phase][precision.value, "calls"] += 1
                self.sent[phase][precision.value, "images"] += len(chunk)
                self.mirrored[precision.value] += len(chunk)

    def classify_and_report(self, phase: str) -> None:
        images, labels = encode(self.data.test.images), self.data.test.labels
        for precision in PRECISIONS:
            for i in range(0, len(images), BATCH):
                response, call = self.gw.classify.Classify.with_call(
                    pb.ClassifyRequest(images=images[i:i + BATCH]),
                    metadata=precision_md(precision), timeout=CALL_TIMEOUT_S)
                assert dict(call.initial_metadata())["x-clip-request-id"] == response.request_id
                self.sent[phase][precision.value, "calls"] += 1
                self.sent[phase][precision.value, "images"] += len(response.results)
                self.mirrored[precision.value] += len(response.results)
                truths = [self.class_names[c] for c in labels[i:i + BATCH]]
                reply = self.gw.feedback.ReportOutcome(pb.ReportOutcomeRequest(
                    request_id=response.request_id,
                    outcomes=[pb.Outcome(index=j, true_label=t) for j, t in enumerate(truths)]),
                    timeout=CALL_TIMEOUT_S)
                assert reply.accepted == len(truths)
                assert reply.endpoint.name == response.endpoint.name
                for result, truth in zip(response.results, truths):
                    self.classified[precision].append((result.confidence,
                                                       result.top_label == truth))

    def offline_flagged(self, precision: Precision, images: np.ndarray) -> int:
        """Images the served runtime flags on the same model files (onnxruntime or openvino,
        as config.pbtxt says), in the same batches as the calls (int8's dynamic quantization
        picks activation scales per batch, so its embeddings depend on which images share a
        batch), with the same labels, T and threshold."""
        from clipserve.tokenizer import ClipTokenizer

        image = self.catalog.get(self.scale, precision, Tower.IMAGE)
        text = self.catalog.get(self.scale, precision, Tower.TEXT)
        car = image.sidecar

        prompts = [t.replace("{}", label) for label in car.labels for t in car.prompts]
        ids, _ = ClipTokenizer.from_file(text.tokenizer_path,
                                         text.sidecar.context_length).encode(prompts)
        assert len(ids) <= text.max_batch_size  # one request, as the gateway sends it
        labels = average_prompts(served_runner(text)[1]("input_ids", ids), len(car.labels))
        _, run_image = served_runner(image)
        vectors = np.concatenate([run_image("pixels", images[i:i + BATCH])
                                  for i in range(0, len(images), BATCH)])
        cosines = vectors.astype(np.float64) @ labels.astype(np.float64).T
        state = load_ood_state(image.directory / car.ood_state)[1] if car.ood_state else None
        scores = score_ood(car.ood_score, state, vectors, cosines, car.temperature)
        return int((scores < car.ood_threshold).sum())

    def delta(self, name: str, start: str, end: str, **labels) -> float:
        return total(self.scrapes[end], name, **labels) - total(self.scrapes[start], name,
                                                                 **labels)


@pytest.fixture(scope="module")
def load(repository, triton) -> Load:
    catalog = Catalog.from_repository(repository)
    for p in PRECISIONS:
        if not catalog.has(catalog.scales[0], p, Tower.IMAGE):
            pytest.skip(f"needs {p.value} endpoints")
    gw = GatewayThread(config_for(repository, triton.grpc_url, shadow_fraction=1.0,
                                  shadow_precision="fp32", calibration_window=1000))
    gw.feedback = pb_grpc.FeedbackServiceStub(gw.channel)
    try:
        run = Load(gw, catalog, repository, triton)
        # Warm-up: a default-label Classify per precision waits for the deployment label set
        # (the background warm-up computes the same), so every image below is scored.
        for precision in PRECISIONS:
            gw.classify.Classify(pb.ClassifyRequest(images=encode(run.data.test.images[:1])),
                                 metadata=precision_md(precision), timeout=CALL_TIMEOUT_S)
            run.mirrored[precision.value] += 1
        run.scrape("start")
        run.embed("id", run.data.test.images)
        run.scrape("id")
        run.embed("near", run.data.ood_near)
        run.scrape("near")
        run.embed("far", run.data.ood_far)
        run.scrape("far")
        run.classify_and_report("outcomes")
        run.scrape("outcomes")
        if os.environ.get("CLIPSERVE_METRICS_DUMP"):
            Path(os.environ["CLIPSERVE_METRICS_DUMP"]).write_text(run.text)
        yield run
    finally:
        gw.close()


PHASES = (("start", "id"), ("id", "near"), ("near", "far"))


def test_counters_and_histograms_move_by_exactly_what_was_sent(load):
    for start, end in PHASES:
        for precision in PRECISIONS:
            p = precision.value
            calls, images = load.sent[end][p, "calls"], load.sent[end][p, "images"]
            assert load.delta("clipserve_requests_total", start, end, method="EmbedImages",
                              precision=p, code="OK") == calls
            assert load.delta("clipserve_requests_total", start, end, precision=p) == calls
            assert load.delta("clipserve_request_duration_seconds_count", start, end,
                              method="EmbedImages", precision=p) == calls
            assert load.delta("clipserve_request_duration_seconds_bucket", start, end,
                              method="EmbedImages", precision=p, le="+Inf") == calls
            for phase in Phase:
                assert load.delta("clipserve_request_phase_seconds_count", start, end,
                                  method="EmbedImages", precision=p, phase=phase.value) == calls
            assert load.delta("clipserve_items_total", start, end, tower="image",
                              precision=p) == images
            assert load.delta("clipserve_items_total", start, end, tower="text") == 0
            assert load.delta("clipserve_ood_score_count", start, end, precision=p,
                              label_set="deployment") == images
            assert load.delta("clipserve_confidence_count", start, end, precision=p) == images
            assert load.delta("clipserve_shadow_images_total", start, end, precision=p,
                              reference="fp32") == images
        # Triton saw the served batches plus the shadow's FP32 copies of both precisions'.
        mirrored = sum(load.sent[end][p.value, "images"] for p in PRECISIONS)
        fp32_images = load.sent[end]["fp32", "images"] + mirrored
        assert load.delta("clipserve_batch_size_sum", start, end, tower="image",
                          precision="fp32") == fp32_images
        assert load.delta("clipserve_batch_size_sum", start, end, tower="image",
                          precision="int8") == load.sent[end]["int8", "images"]
        # ... and Triton's own metrics page agrees request for request.
        for p in PRECISIONS:
            model = f"{load.scale}_{p.value}_image"
            ours = load.delta("clipserve_batch_size_count", start, end, tower="image",
                              precision=p.value)
            # The parser names Triton's counter (exposed without _total) ..._total.
            success = "nv_inference_request_success_total"
            theirs = (total(load.triton_scrapes[end], success, model=model)
                      - total(load.triton_scrapes[start], success, model=model))
            assert theirs == ours > 0, (model, theirs, ours)
    assert total(load.scrapes["far"], "clipserve_requests_in_flight") == 0


def test_ood_rate_is_near_five_percent_on_held_out_digits_and_far_higher_off_distribution(load):
    n_id = len(load.data.test.images)
    for precision in PRECISIONS:
        p = precision.value
        report = load.report[p, "image"]

        def rate(start, end):
            flagged = load.delta("clipserve_ood_flagged_total", start, end, precision=p)
            scored = load.delta("clipserve_ood_score_count", start, end, precision=p)
            return flagged / scored, scored

        id_rate, scored = rate("start", "id")
        assert scored == n_id
        # The threshold is the 5th percentile of ~270 calibration digits' scores, measured here
        # on ~270 other digits: the true flag rate of a quantile fitted on n samples has
        # sd sqrt(.05 * .95 / n) ~ 0.013, and the test sample adds as much again, so the rate
        # is 0.05 +- 0.019 (1 sd). 3.5 sd: |rate - 0.05| <= 0.066.
        assert abs(id_rate - 0.05) <= 0.066, (p, id_rate)
        near_rate, _ = rate("id", "near")
        far_rate, _ = rate("near", "far")
        for ood_rate in (near_rate, far_rate):
            # "Far higher": at least three times the ID rate and 15 points above it.
            assert ood_rate >= max(3 * id_rate, id_rate + 0.15), (p, id_rate, ood_rate)
        # The live counters equal an offline computation on the same images, batches, model
        # files, labels, temperature and threshold.
        for (start, end), images in zip(PHASES, (load.data.test.images, load.data.ood_near,
                                                 load.data.ood_far)):
            live = load.delta("clipserve_ood_flagged_total", start, end, precision=p)
            offline = load.offline_flagged(precision, images)
            assert abs(live - offline) <= BORDERLINE_IMAGES, (p, end, live, offline)
        if precision is Precision.FP32:
            # ... and the export report's figures (measured in batches of 256: only batch
            # independent precisions can match them image for image).
            score = report["live_ood_score"]
            for live, offline, n in ((id_rate, report["flagged_rate_id_by_score"][score], n_id),
                                     (near_rate, report["flagged_rate_by_set"]["letters"][score],
                                      len(load.data.ood_near)),
                                     (far_rate, report["flagged_rate_by_set"]["noise"][score],
                                      len(load.data.ood_far))):
                assert abs(live - offline) * n <= BORDERLINE_IMAGES, (p, live, offline)


def test_ece_from_report_outcome_equals_the_offline_ece_of_the_same_predictions(load):
    for precision in PRECISIONS:
        p = precision.value
        pairs = load.classified[precision]
        confidence = np.array([c for c, _ in pairs])
        correct = np.array([ok for _, ok in pairs])
        live_ece = total(load.scrapes["outcomes"], "clipserve_calibration_ece", precision=p)
        assert live_ece == pytest.approx(score_ece(confidence, correct), abs=1e-9)
        assert total(load.scrapes["outcomes"], "clipserve_calibration_accuracy",
                     precision=p) == pytest.approx(correct.mean(), abs=1e-12)
        assert total(load.scrapes["outcomes"], "clipserve_calibration_window_samples",
                     precision=p) == len(pairs)
        assert load.delta("clipserve_outcomes_total", "far", "outcomes", precision=p,
                          result="correct") == correct.sum()
        assert load.delta("clipserve_requests_total", "far", "outcomes",
                          method="ReportOutcome", precision=p,
                          code="OK") == load.sent["outcomes"][p, "calls"]
        # Same test split, temperature and class embeddings as the export's calibrated ECE.
        assert live_ece == pytest.approx(load.report[p, "image"]["ece_calibrated"], abs=0.01)


def test_shadow_fp32_against_fp32_agrees_fully(load):
    start, end = "start", "outcomes"
    images = load.delta("clipserve_shadow_images_total", start, end, precision="fp32")
    assert images == sum(load.sent[phase]["fp32", "images"]
                         for phase in ("id", "near", "far", "outcomes"))
    assert load.delta("clipserve_shadow_agreements_total", start, end, precision="fp32") == images
    cosine_mean = load.delta("clipserve_shadow_cosine_sum", start, end,
                             precision="fp32") / images
    assert cosine_mean == pytest.approx(1.0, abs=1e-6)
    # Every cosine in the top bucket: (0.99999, 1].
    assert load.delta("clipserve_shadow_cosine_bucket", start, end, precision="fp32",
                      le="0.99999") == 0
    assert load.delta("clipserve_shadow_kl_sum", start, end, precision="fp32") / images < 1e-6
    assert total(load.scrapes[end], "clipserve_shadow_dropped_total") == 0
    # The int8 arm is compared too; quantization moves it a little, not a lot.
    int8 = load.delta("clipserve_shadow_images_total", start, end, precision="int8")
    agreement = load.delta("clipserve_shadow_agreements_total", start, end,
                           precision="int8") / int8
    assert 0.9 <= agreement <= 1.0
    assert load.delta("clipserve_shadow_cosine_sum", start, end, precision="int8") / int8 > 0.99


def test_label_values_stay_within_their_enums(load):
    precisions = {p.value for p in Precision} | {"none"}
    allowed = {
        "method": {m.value for m in Method}, "scale": {load.scale, "none"},
        "precision": precisions, "reference": precisions,
        "code": {c.name for c in grpc.StatusCode}, "tower": {t.value for t in Tower},
        "phase": {p.value for p in Phase}, "label_set": {s.value for s in LabelSet},
        "protocol": {p.value for p in Protocol},
        "reason": ({r.value for r in Unscored} | {r.value for r in ShadowDrop}
                   | {r.value for r in Eviction}),
        "result": {"ok", "error", "hit", "miss"} | {r.value for r in OutcomeResult},
        "le": None, "version": None, "api": {"clipserve.v1"},
        "protocol": {"grpc", "http"},
    }
    seen = set()
    for family in text_string_to_metric_families(load.text):
        if not family.name.startswith("clipserve_"):
            continue  # the default process/python collectors are not on our registry
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert label in allowed, (sample.name, label)
                assert allowed[label] is None or value in allowed[label], (sample.name, value)
                seen.add(label)
    assert {"method", "scale", "precision", "code", "tower", "phase", "label_set",
            "reference", "result"} <= seen
