"""``clipserve export --qat`` end to end on the built-in digits-s (no tritonserver): QAT is
trained, quantized by the same quantizers as PTQ, measured beside it on the same held-out
test split, and the choice is recorded in the sidecar and the report."""


import onnx
import pytest

from clipserve.endpoints import Sidecar, Tower, endpoint_name
from clipserve.export import qat
from clipserve.export.report import read_rows
from tests.integration.conftest import cached_export

PRECISIONS = ("fp32", "int8", "int4")


@pytest.fixture(scope="module")
def qat_repository(cache_dir):
    return cached_export(cache_dir, "test-qat-repository", models="digits-s",
                         precisions=PRECISIONS, qat=True)


@pytest.fixture(scope="module")
def rows(qat_repository):
    return read_rows(qat_repository / "report.json")


def _row(rows, precision, tower="image"):
    return next(r for r in rows if (r["precision"], r["tower"]) == (precision, tower))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_qat_matches_or_beats_ptq_on_held_out_digits(rows, precision):
    """QAT - PTQ top-1 on the test split (paired bootstrap): not worse beyond its interval.
    Both are measured against the same FP32 on the same items. Measured here (digits-s,
    269 test digits): int4 QAT flips no item against FP32 (+0.0 [+0.0, +0.0]) where PTQ's
    interval is [-1.1, +1.1]; int8 top-1 is identical, but QAT's NLL is worse beyond its
    interval, so PTQ is served there."""
    record = _row(rows, precision)["quantization"]["qat"]
    versus = record["qat_minus_ptq"]["top1"]
    assert versus["hi"] >= 0, record
    assert versus["lo"] <= versus["delta"] <= versus["hi"]
    # The served graph is the rule's pick, and the served row measures that graph.
    assert (record["served"], record["why"]) == qat.choose_served(record["qat_minus_ptq"])
    served = record[record["served"]]["top1"]["delta"]
    row = _row(rows, precision)
    # Both graphs are measured on the runtime the endpoint is served with (--runtime auto may
    # pick OpenVINO, as it does for int8 on AMX CPUs), so the report's row is that figure.
    assert row["deltas"]["top1"]["delta"] == pytest.approx(served, abs=1e-9), \
        row["quantization"]["runtime"]
    for metric in ("ece", "nll"):
        assert row["deltas"][metric]["delta"] == pytest.approx(
            record[record["served"]][metric]["delta"], abs=1e-6), metric
    if record["served"] == "qat":  # the runtime was planned on the PTQ graph it replaced
        assert "PTQ graph" in row["quantization"]["runtime"]["measured_on"]


def test_qat_at_int4_trains_toward_its_teacher_and_is_served_by_the_rule(rows):
    """INT4: fine-tuning brings the fake-quantized student's embeddings closer to FP32's, and
    the graph served is the one the rule picks from the paired QAT - PTQ deltas. What it
    picked here depends on the CPU (the PTQ method auto keeps and the runtime both do).
    Measured on an AMD EPYC (2026-12-03), two exports: with PTQ's auto pick rtn-sym-b32-a0,
    PTQ INT4 lost OOD AUROC against FP32 (-0.010 [-0.017, -0.004]) and QAT did not (QAT - PTQ
    +0.011 [+0.005, +0.017], top-1 one test item apart inside its interval: QAT under this
    rule); with hqq-b32-a4, QAT's NLL was worse beyond its interval (+0.012 [+0.003, +0.021]):
    PTQ served. On an AMX Xeon QAT flipped no test item where PTQ's interval was +-1.1
    points: QAT served."""
    record = _row(rows, "int4")["quantization"]["qat"]
    assert record["training"]["align_last"] < record["training"]["align_first"], record
    assert (record["served"], record["why"]) == qat.choose_served(record["qat_minus_ptq"])
    if record["served"] == "ptq":  # only for a loss beyond its interval or a lower top-1
        assert ("worse than PTQ" in record["why"]) or ("not better" in record["why"])


def test_qat_graphs_come_from_the_same_quantizers(cache_dir, rows):
    work = cache_dir / "work" / "digits-s"
    for precision, op in (("int8", "QuantizeLinear"), ("int4", "MatMulNBits")):
        for tower in Tower:
            ptq = onnx.load(work / f"{precision}_{tower.value}.onnx")
            qat = onnx.load(work / f"qat-{precision}" / f"{precision}_{tower.value}.onnx")
            count = [sum(n.op_type == op for n in m.graph.node) for m in (ptq, qat)]
            assert count[0] > 0 and count[0] == count[1], (precision, tower, count)
        # PTQ's method is whichever candidate auto kept (HQQ and GPTQ among them)
        assert {r["quantization"]["method"] for r in rows if r["precision"] == precision} \
            <= {"int8-static-qdq", "int8-dynamic", "int4-weight-only-rtn",
                "int4-weight-only-hqq", "int4-weight-only-gptq"}


def test_sidecar_records_qat_and_report_shows_it_beside_ptq(qat_repository, rows):
    for precision in ("int8", "int4"):
        sidecar = Sidecar.read(qat_repository / endpoint_name("digits-s", precision, "image"))
        record = sidecar.quantization["qat"]
        training = record["training"]
        assert {"epochs", "steps", "loss_first", "loss_last", "gate_threshold",
                "seconds", "align_first", "align_last", "scheme"} <= set(training)
        assert training["gate_threshold"] == 0.5 and training["seconds"] > 0
        # PTQ's candidate search stays in the sidecar (and the report's candidates table)
        # whichever graph is served; the student's own pinned build is kept apart.
        choice = sidecar.quantization["choice"]
        assert choice["mode"] == "auto" and len(choice["candidates"]) > 1, choice
        assert bool(choice.get("qat_served")) == (record["served"] == "qat")
        if record["served"] == "qat":
            assert sidecar.quantization["qat_choice"]["mode"] == "pinned"
            assert "QAT served instead" in choice["why"]
    md = (qat_repository / "report.md").read_text()
    section = md[md.index("## Quantization-aware training"):]
    assert "| digits-s | int8 |" in section and "| digits-s | int4 |" in section
    candidates = md[md.index("## Quantization candidates"):]
    served_qat = [r for r in rows if r["tower"] == "image"
                  and r["quantization"].get("qat", {}).get("served") == "qat"]
    assert ("PTQ's pick; **QAT served**" in candidates) == bool(served_qat)
