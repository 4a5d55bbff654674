"""The served runtime axis' pure parts: per-runtime repository copies, rows combining raw,
Triton and gateway figures, the verdict against the issue's targets, the report section (no
timings asserted)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipserve import cpu
from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.export import repository
from clipserve.loadtest import roofline, runtime_bench, runtime_served


def tiny_onnx(path):
    w = np.ones((192, 4), np.float32)
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["b", 8, 8, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 192]), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_retarget_writes_each_runtime_and_leaves_the_source_alone(tmp_path):
    source, onnx_path = tmp_path / "src", tiny_onnx(tmp_path / "t.onnx")
    for p in ("fp32", "int8", "bf16"):
        repository.write_endpoint(source, onnx_path, Sidecar(
            scale="s", precision=p, tower="image", embed_dim=4, source="x", image_size=8),
            runtime="openvino" if p == "bf16" else "onnxruntime")
    before = {p.name: (p / "config.pbtxt").read_text() for p in source.iterdir()}
    for runtime in ("openvino", "onnxruntime"):
        dest = runtime_served.retarget_repository(source, tmp_path / runtime, runtime, threads=2)
        for name in before:
            want = "openvino" if name == "s_bf16_image" else runtime
            assert runtime_served.served_runtime(dest / name) == want, (runtime, name)
            text = (dest / name / "config.pbtxt").read_text()
            assert 'key: "intra_op_threads" value: { string_value: "2" }' in text
            assert (dest / name / "1" / "model.onnx").stat().st_ino == \
                (source / name / "1" / "model.onnx").stat().st_ino  # hard link, not a copy
        if runtime == "openvino":
            assert 'openvino_precision_hint" value: { string_value: "f32"' in \
                (dest / "s_fp32_image" / "config.pbtxt").read_text()
    assert {p.name: (p / "config.pbtxt").read_text() for p in source.iterdir()} == before
    dropped = runtime_served.retarget_repository(source, tmp_path / "d", "onnxruntime",
                                                 drop_bf16=True)
    assert sorted(p.name for p in dropped.iterdir()) == ["s_fp32_image", "s_int8_image"]
    with pytest.raises(ValueError, match="no endpoints"):
        runtime_served.retarget_repository(tmp_path / "openvino" / "s_fp32_image" / "1",
                                           tmp_path / "x", "openvino")


def test_points_skip_bf16_under_onnxruntime():
    pts = runtime_served.points("s", [Precision.FP32, Precision.INT8, Precision.BF16])
    assert ("onnxruntime", Precision.BF16) not in pts
    assert ("openvino", Precision.BF16) in pts and len(pts) == 5


def summary(speed, errors=0):
    return {"items_per_s": speed, "calls_ok": 10, "errors": {"UNAVAILABLE": errors} if errors else {},
            "p50_ms": 1.0, "p99_ms": 2.0, "avg_batch": 8.0, "cpu_ms_per_item": {}}


def rows_for(ov_int8_gateway=40.0, bf16_cos=0.9995):
    raw = [{"label": label, "runtime": rt, "precision": p.value, "items_per_s": speed,
            "min_cosine_to_ort_fp32": 1.0}
           for (label, rt, p, _, _), speed in zip(runtime_bench.ROWS, [10, 25, 11, 30, 35, 33])]
    served = {("onnxruntime", "fp32"): {"triton": [summary(9), summary(8)], "gateway": [summary(8)]},
              ("onnxruntime", "int8"): {"triton": [summary(20)], "gateway": [summary(18)]},
              ("openvino", "int8"): {"triton": [summary(42)], "gateway": [summary(ov_int8_gateway)]},
              ("openvino", "bf16"): {"triton": [summary(26)], "gateway": [summary(24)]}}
    cosines = {k: 0.9996 for k in served} | {("openvino", "bf16"): bf16_cos,
                                             ("onnxruntime", "fp32"): 1.0}
    runtimes_ = {k: k[0] for k in served}
    return runtime_served.combine(raw, served, cosines, runtimes_)


def test_combine_takes_best_rounds_and_ratios_per_column():
    rows = {(r["runtime"], r["precision"]): r for r in rows_for()}
    base = rows["onnxruntime", "fp32"]
    assert base["triton"]["items_per_s"] == 9 and base["raw_vs_ort_fp32"] == 1.0
    assert base["triton_vs_ort_fp32"] == base["gateway_vs_ort_fp32"] == 1.0
    ov8 = rows["openvino", "int8"]
    assert ov8["raw_items_per_s"] == 35  # the as-served raw row (hint f32), not the bf16-hint one
    assert ov8["gateway_vs_ort_fp32"] == 5.0 and ov8["triton_vs_ort_fp32"] == pytest.approx(42 / 9, abs=1e-3)
    assert rows["openvino", "bf16"]["raw_items_per_s"] == 30


def test_verdict_says_met_or_by_how_much_and_why():
    no_amx = cpu.from_flags(["avx512f", "avx512_bf16", "avx512_vnni"], cores=2)
    met = runtime_served.verdict(rows_for(), no_amx)
    assert "**met**" in met[0] and "5.00x" in met[0]
    assert "missed by 0.00x" not in " ".join(met)
    missed = runtime_served.verdict(rows_for(ov_int8_gateway=16.0, bf16_cos=0.99), no_amx)
    # best INT8 is now onnxruntime's 18 / 8 = 2.25x against 3.5x
    assert "onnxruntime, 2.25x" in missed[0] and "missed by 1.25x" in missed[0]
    assert "3.00x ORT FP32 (target >= 3.0x): **met**" in missed[1]  # 24 / 8, on the bound
    assert "0.990000 (target >= 0.999): **missed**" in missed[1]
    # onnxruntime int8 reaches only 11 / 10 = 1.1x in process: the runtime, not the path
    assert missed[-1].startswith("- Why (onnxruntime int8)") and "in process" in missed[-1]
    assert "no AMX" in missed[-1] and "int8 peak 4x" in missed[-1]
    behind = runtime_served.verdict(rows_for(ov_int8_gateway=24.0), no_amx)
    # openvino int8: 35 / 10 = 3.5x raw and 42 / 9 = 4.67x through Triton, 24 / 8 = 3.0x behind
    # the gateway: the gateway's cost is the reason
    assert "missed by 0.50x" in behind[0]
    assert behind[-1].startswith("- Why (openvino int8)") and "the gateway's cost" in behind[-1]


def test_section_goes_after_the_runtime_axis_and_replaces_itself(tmp_path):
    rows = rows_for()
    machine = cpu.from_flags(["avx512f", "avx512_bf16", "avx512_vnni"], cores=2)
    roofline_peaks = {"analytic": roofline.analytic_peaks(machine, 2.3),
                      "measured": roofline.precision_peaks(machine, 100.0)}
    runtime_served.add_roofline(rows, int(4.4e9), roofline_peaks["analytic"],
                                roofline_peaks["measured"])
    result = {"command": "x", "started_at": "now", "image_size": 224, "image_gflop": 4.4,
              "config": {"scale": "ViT-B-32", "batch": 8, "concurrency": 2, "seconds": 4,
                         "warmup": 1, "rounds": 2, "threads": 0, "matmul_n": 1024},
              "machine": {"cpu": {**machine.as_dict(), "describe": machine.describe()},
                          "clock_ghz": 2.3, "loadavg_start": (1, 2, 3), "loadavg_end": (1, 2, 3),
                          "versions": {}},
              "peaks": roofline_peaks, "rows": rows}
    text = runtime_served.markdown(result)
    assert text.count("| openvino |") == 2 and "Failed calls in the kept rounds: 0." in text
    path = tmp_path / "B.md"
    path.write_text(f"# t\n\n{runtime_bench.START}\nraw\n{runtime_bench.END}\n\n## later\n")
    runtime_served.write_section(path, text)
    runtime_served.write_section(path, text.replace("| openvino |", "| OV |"))
    out = path.read_text()
    assert out.index(runtime_bench.END) < out.index(runtime_served.START) < out.index("## later")
    assert out.count(runtime_served.START) == 1 and "| OV |" in out
