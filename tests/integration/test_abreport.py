"""``clipserve ab-report`` on the real gateway in front of the real tritonserver.

Two fresh gateways on the same Triton each classify the held-out digits at fp32 and int8, every
call mirrored to an fp32 shadow, then report outcomes. On the first, every arm's outcomes are
the true labels: two arms serving the same digits must never be judged unsafe. On the second the
int8 arm is made worse on purpose: its callers report the next digit as the truth (what an arm
that had learned the wrong answers would collect), so its live accuracy falls to about 0 and the
verdict must be unsafe. The command is run as users run it, against the gateway's /metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from clipserve.endpoints import Precision
from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc
from tests.integration.test_gateway import CALL_TIMEOUT_S, GatewayThread, config_for
from tests.integration.test_metrics import BATCH, encode, parse, precision_md, scrape_text, total

pytestmark = pytest.mark.integration

ARMS = (Precision.FP32, Precision.INT8)


@pytest.fixture(scope="module")
def digits_test():
    from clipserve.export import digits

    data = digits.load(32)
    return encode(data.test.images), data.test.labels, digits.CLASS_NAMES


def run_arms(repository, triton, digits_test, tmp_path, worse: Precision | None) -> dict:
    images, labels, class_names = digits_test
    gateway = GatewayThread(config_for(repository, triton.grpc_url, shadow_fraction=1.0))
    feedback = pb_grpc.FeedbackServiceStub(gateway.channel)
    try:
        for precision in ARMS:
            for i in range(0, len(images), BATCH):
                response = gateway.classify.Classify(
                    pb.ClassifyRequest(images=images[i:i + BATCH]),
                    metadata=precision_md(precision), timeout=CALL_TIMEOUT_S)
                shift = 1 if precision is worse else 0
                truths = [class_names[(c + shift) % len(class_names)]
                          for c in labels[i:i + BATCH]]
                reply = feedback.ReportOutcome(pb.ReportOutcomeRequest(
                    request_id=response.request_id,
                    outcomes=[pb.Outcome(index=j, true_label=t) for j, t in enumerate(truths)]),
                    timeout=CALL_TIMEOUT_S)
                assert reply.accepted == len(truths)
        # Shadow comparisons run after the answers: wait until every mirrored image is counted.
        deadline = time.monotonic() + 120
        while True:
            samples = parse(scrape_text(gateway.gateway.metrics_port))
            done = sum(total(samples, name, precision="int8") for name in (
                "clipserve_shadow_images_total", "clipserve_shadow_dropped_total")) >= len(images)
            if done:
                break
            assert time.monotonic() < deadline, "shadow comparisons did not finish"
            time.sleep(0.2)
        out = tmp_path / f"ab-{worse.value if worse else 'same'}.json"
        url = f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics"
        done = subprocess.run([sys.executable, "-m", "clipserve.cli", "ab-report", "--metrics",
                               url, "--json", str(out)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        rows = {r["precision"]: r for r in json.loads(out.read_text())}
        return {"rows": rows, "stdout": done.stdout}
    finally:
        gateway.close()


def test_identical_arms_are_never_unsafe(repository, triton, digits_test, tmp_path):
    seen = run_arms(repository, triton, digits_test, tmp_path, worse=None)
    row = seen["rows"]["int8"]
    n = len(digits_test[0])
    assert row["counts"]["correct"] + row["counts"]["incorrect"] == n
    assert row["counts"]["shadow_images"] == n
    assert set(row["verdicts"]) == {"accuracy", "agreement", "flag_rate"}
    assert row["verdict"] in ("safe", "inconclusive"), seen["stdout"]
    for name, v in row["verdicts"].items():
        assert v["verdict"] != "unsafe", (name, v)
        # An undecided metric says how much more traffic would decide it.
        assert (v["verdict"] == "inconclusive") == (v["more_needed"] is not None), (name, v)
    assert "int8 vs fp32: " + row["verdict"].upper() in seen["stdout"]


def test_an_arm_made_worse_on_purpose_is_unsafe(repository, triton, digits_test, tmp_path):
    seen = run_arms(repository, triton, digits_test, tmp_path, worse=Precision.INT8)
    row = seen["rows"]["int8"]
    assert row["accuracy"]["arm"] < 0.2 < 0.8 < row["accuracy"]["reference"]
    assert row["verdicts"]["accuracy"]["verdict"] == "unsafe"
    assert row["verdict"] == "unsafe"
    assert "int8 vs fp32: UNSAFE" in seen["stdout"]
