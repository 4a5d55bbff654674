"""The INT4 speed benchmark's pieces on a tiny graph (no timing asserted: speed targets live
in the benchmark's own output)."""

import numpy as np

from clipserve.loadtest import int4_bench


def test_measure_gives_one_row_per_graph_with_ratios_to_fp32(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    graph = helper.make_graph([helper.make_node("MatMul", ["pixels", "w"], ["y"], name="mm")],
                              "g", [x], [y], [w])
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    from clipserve.export import quantize, recipes

    int4 = tmp_path / "int4.onnx"
    quantize.to_int4_recipe(fp32, int4, recipes.Int4Recipe.parse("rtn-sym-b32-a0"))
    rows = int4_bench.measure({"fp32": fp32, "rtn-sym-b32-a0": int4},
                              rng.normal(size=(4, 64)).astype(np.float32), 0.05, rounds=2)
    assert [r["label"] for r in rows] == ["fp32", "rtn-sym-b32-a0"]
    assert rows[0]["ratio_to_fp32"] == 1.0 and rows[0]["min_cosine_to_fp32"] == 1.0
    assert rows[0]["ratio_median_per_round"] == 1.0
    assert 0.9 < rows[1]["min_cosine_to_fp32"] < 1.0  # 4-bit weights: close, not equal
    assert all(len(r["rounds_images_per_s"]) == 2 for r in rows)
    assert "| rtn-sym-b32-a0 |" in int4_bench.table(rows)
