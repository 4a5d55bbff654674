"""The benchmark's runtime axis and per-precision peaks (no timings asserted: only structure,
ratios' reference row and fidelity)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipserve import cpu
from clipserve.export import quantize
from clipserve.loadtest import roofline, runtime_bench

pytest.importorskip("openvino")


@pytest.mark.parametrize("flags, bf16, int8", [
    (["amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni"], 16, 32),
    (["avx512f", "avx512_bf16", "avx512_vnni"], 2, 4),
    (["avx2", "fma", "avx_vnni"], 1, 4),
    (["avx2", "fma"], 1, 2),
])
def test_peaks_follow_the_flags(flags, bf16, int8):
    peaks = roofline.precision_peaks(cpu.from_flags(flags), 100.0)
    assert peaks["fp32"]["gflops"] == peaks["fp16"]["gflops"] == 100.0
    assert peaks["bf16"]["gflops"] == 100.0 * bf16
    assert peaks["int8"]["gflops"] == peaks["int4"]["gflops"] == 100.0 * int8
    if bf16 == 1:
        assert "emulated" in peaks["bf16"]["assumes"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny image 'tower': uint8 [batch, 8, 8, 3] -> float -> flatten -> MatMul -> L2 norm."""
    out = tmp_path_factory.mktemp("tiny")
    w = np.random.default_rng(0).standard_normal((192, 16)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["y"]),
             helper.make_node("ReduceL2", ["y", "axes"], ["n"], keepdims=1),
             helper.make_node("Div", ["y", "n"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 192]), "shape"),
         numpy_helper.from_array(np.array([1]), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    fp32 = out / "fp32.onnx"
    onnx.save(model, fp32)
    calib = np.random.default_rng(1).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    quantize.to_int8_static(fp32, out / "int8.onnx", "pixels", [calib[:16], calib[16:]],
                            reduce_range=False)
    return {"fp32": fp32, "int8": out / "int8.onnx"}


def test_measure_gives_every_row_side_by_side(files):
    pixels = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    peaks = roofline.precision_peaks(cpu.detect(), 50.0)
    rows = runtime_bench.measure(files, pixels, threads=1, seconds=0.04, flops=2 * 192 * 16,
                                 peaks=peaks, rounds=2, log=lambda m: None)
    assert [r["label"] for r in rows] == [r[0] for r in runtime_bench.ROWS]
    assert all("error" not in r for r in rows), rows
    assert rows[0]["vs_ort_fp32"] == 1.0 and rows[0]["min_cosine_to_ort_fp32"] == pytest.approx(1.0)
    by = {r["label"]: r for r in rows}
    assert by["OpenVINO FP32 (hint f32)"]["min_cosine_to_ort_fp32"] >= 0.99999
    assert by["OpenVINO BF16 (FP32 graph, hint bf16)"]["options"]["openvino_precision_hint"] == "bf16"
    assert by["OpenVINO INT8 (same QDQ graph, hint bf16)"]["options"]["openvino_precision_hint"] == "bf16"
    for r in rows:
        assert len(r["rounds_items_per_s"]) == 2 and r["items_per_s"] == max(r["rounds_items_per_s"])
        assert r["peak_gflops"] == peaks[r["precision"]]["gflops"]
        assert r["min_cosine_to_ort_fp32"] >= 0.99
    without_int8 = runtime_bench.measure({"fp32": files["fp32"]}, pixels, 1, 0.02, 1, peaks,
                                         rounds=1, log=lambda m: None)
    assert {r["precision"] for r in without_int8} == {"fp32", "bf16"}


def test_section_replaces_itself_and_keeps_the_rest(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# title\n\nbefore\n")
    runtime_bench.write_section(path, f"{runtime_bench.START}\nfirst\n{runtime_bench.END}\n")
    runtime_bench.write_section(path, f"{runtime_bench.START}\nsecond\n{runtime_bench.END}\n")
    text = path.read_text()
    assert text.startswith("# title\n\nbefore\n") and "second" in text and "first" not in text
    assert text.count(runtime_bench.START) == 1


@pytest.mark.parametrize("load, says", [((0.3, 0.2, 0.1), "quiet at the start"),
                                        ((1.2, 1.0, 0.5), "quiet at the start"),
                                        ((1.2, 1.0, 0.5), None),
                                        ((6.0, 5.0, 4.0), "other work shared the cores")])
def test_load_is_judged_by_the_start_and_the_cores(load, says):
    machine = {"cpu": {"cores": 2 if says else 1}, "loadavg_start": load}
    text = runtime_bench.load_judgement(machine)
    # 1.2 on 2 cores is quiet (the run's own load is not counted); on 1 core it is shared
    assert (says or "other work shared the cores") in text


def test_the_busy_sample_overrides_a_load_average_left_by_a_job_that_just_ended():
    # 1.5 on 2 cores by the 1-minute average (an export that ended a minute ago), but the
    # cores measured just before the start were idle: the run was alone
    machine = {"cpu": {"cores": 2}, "loadavg_start": (1.6, 1.0, 0.5), "busy_cores_start": 0.1}
    text = runtime_bench.load_judgement(machine)
    assert "quiet at the start" in text and "0.10 of 2 cores busy" in text
    machine["busy_cores_start"] = 1.9
    assert "other work shared the cores" in runtime_bench.load_judgement(machine)
