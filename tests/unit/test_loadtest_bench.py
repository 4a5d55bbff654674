"""The benchmark's pure parts: FLOP counting, the analysis and report from a synthetic
bench.json, the py-spy summary, the peer's tokenizer files."""

import gzip

import pytest

from clipserve.loadtest import bench_report, roofline
from clipserve.loadtest.bench import BenchConfig, stats_delta

onnx = pytest.importorskip("onnx")


# -- FLOPs ----------------------------------------------------------------------------------

def tiny_model(path):
    """Conv [3->4, 2x2 stride 2] on 8x8, flatten to [N, 64], Gemm to 10, MatMul to 5."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    inits = [numpy_helper.from_array(np.zeros((4, 3, 2, 2), np.float32), "w_conv"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
             numpy_helper.from_array(np.zeros((64, 10), np.float32), "w_gemm"),
             numpy_helper.from_array(np.zeros((10, 5), np.float32), "w_mm")]
    nodes = [helper.make_node("Conv", ["x", "w_conv"], ["c"], strides=[2, 2], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "w_gemm"], ["g"], name="gemm"),
             helper.make_node("MatMul", ["g", "w_mm"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_flops_counts_conv_gemm_matmul(tmp_path):
    path = tiny_model(tmp_path / "tiny.onnx")
    out = roofline.onnx_flops(path)
    conv = 2 * (4 * 4 * 4) * (3 * 2 * 2)  # 64 outputs x 12 MACs
    assert out["by_op"] == {"Conv": conv, "Gemm": 2 * 10 * 64, "MatMul": 2 * 5 * 10}
    assert out["total"] == conv + 1280 + 100 and out["uncounted"] == []
    assert roofline.onnx_flops(path, batch=4)["total"] == 4 * out["total"]


def test_onnx_flops_rejects_non_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError):
        roofline.onnx_flops(bad)


def test_vit_b32_analytic_flops_are_the_known_4_4_gmacs():
    assert roofline.vit_image_flops(224, 32, 768, 12, 512) / 2 == pytest.approx(4.41e9, rel=0.01)


def test_attainable_gflops_is_positive():
    assert roofline.attainable_gflops(128, 0.05, repeats=1) > 0


# -- Triton statistics ------------------------------------------------------------------------

def test_stats_delta_gives_average_batch_and_times():
    before = {"inference_count": 10, "execution_count": 10, "success": (10, 0),
              "queue": (10, 0), "compute_input": (10, 0), "compute_infer": (10, 0),
              "compute_output": (10, 0)}
    # 40 more requests in 10 executions of 4; each request charged its batch's 20 ms.
    after = {"inference_count": 50, "execution_count": 20, "success": (50, 0),
             "queue": (50, 40 * 5_000_000), "compute_input": (50, 40 * 100_000),
             "compute_infer": (50, 40 * 20_000_000), "compute_output": (50, 40 * 100_000)}
    d = stats_delta(before, after)
    assert d["avg_batch"] == 4.0 and d["executions"] == 10 and d["items"] == 40
    assert d["queue_ms_per_request"] == pytest.approx(5.0)
    assert d["compute_ms_per_execution"] == pytest.approx(20.0)
    assert d["compute_ms_per_item"] == pytest.approx(5.0)
    assert d["input_output_ms_per_request"] == pytest.approx(0.2)
    assert stats_delta(after, after) == {"executions": 0, "items": 0}


def test_bench_config_rejects_unknown_peer_dtype_and_bad_steps():
    with pytest.raises(ValueError):
        BenchConfig(peer_dtypes=("fp8",))
    with pytest.raises(ValueError):
        BenchConfig(sweep=("x",))
    assert BenchConfig(concurrency=8, sweep=("4", "1")).steps == [1, 4, 8]


# -- analysis and report ----------------------------------------------------------------------

def summary(items_per_s, p50, p99, concurrency, cpu=None, stats=None):
    return {"requests": 100, "ok": 100, "errors": {}, "error_rate": 0.0, "items": 100,
            "duration_s": 8.0, "items_per_s": items_per_s, "concurrency": concurrency,
            "latency_ms": {"p50": p50, "p90": p99, "p99": p99, "p99.9": p99, "max": p99,
                           "mean": p50},
            "cpu_ms_per_item": cpu or {}, "triton_stats": stats or {}}


def precision_entry(scale, model_bytes):
    return {
        "model_bytes": model_bytes,
        "ort": {"by_batch": {"1": 80 * scale, "16": 100 * scale}, "best_batch": 16,
                "best_items_per_s": 100.0 * scale},
        "triton": {"runs": {"1": summary(30 * scale, 10.0, 12.0, 1),
                            "8": summary(90 * scale, 80.0, 120.0, 8,
                                         {"triton": 10.0, "client": 1.0},
                                         {"avg_batch": 3.0, "queue_ms_per_request": 4.0,
                                          "compute_ms_per_execution": 30.0,
                                          "compute_ms_per_item": 10.0,
                                          "input_output_ms_per_request": 0.1})}},
        "gateway": {"runs": {"1": summary(28 * scale, 12.0, 15.0, 1, {"gateway": 1.2}),
                             "4": summary(70 * scale, 50.0, 60.0, 4),
                             "8": summary(72 * scale, 100.0, 140.0, 8,
                                          {"triton": 10.0, "gateway": 2.0, "client": 0.5},
                                          {"avg_batch": 2.0})}},
    }


def synthetic_results():
    return {
        "version": 1, "command": "python -m clipserve.loadtest.bench", "started_at": "now",
        "wall_s": 600, "config": {"concurrency": 8, "duration": 8.0, "latency_duration": 4.0,
                                  "warmup": 1.5, "ort_batches": ["1", "16"]},
        "machine": {"cpu": "Test CPU", "cores": 2, "python": "3.11", "versions": {},
                    "loadavg_start": [2.5, 0, 0], "loadavg_end": [0.2, 0, 0]},
        "roofline": {"attainable_gflops": 50.0, "matmul_n": 2048},
        "models": {"ViT-B-32::none": {
            "spec": "ViT-B-32::none", "scale": "ViT-B-32", "image_size": 224,
            "image_flops": 8.8e9, "flops_by_op": {},
            "precisions": {"fp32": precision_entry(1.0, 350e6),
                           "int8": precision_entry(2.0, 90e6)},
            "peer": {"status": "ok", "versions": ["0.0.78", "2.13.0"], "dtypes": {
                "float32": {"precision": "fp32", "status": "ok", "runs": {
                    "1": summary(20.0, 50.0, 55.0, 1), "4": summary(40.0, 100.0, 130.0, 4),
                    "8": summary(42.0, 190.0, 250.0, 8)}},
                "int8": {"precision": "int8", "status": "failed", "error": "boom\nmore"}}},
            "gateway_profile": {"status": "ok", "precision": "fp32", "concurrency": 8,
                                "samples": 100, "top_self": [["decode (images.py)", 30.0]],
                                "by_area": {"image decode/resize (PIL)": 30.0}},
        }},
    }


def test_analysis_ratios_and_targets():
    a = bench_report.analyze(synthetic_results())
    row = a["models"]["ViT-B-32::none"]["rows"]["fp32"]
    assert row["gateway_ratio"] == pytest.approx(72 / 90)
    assert row["added_p50"] == pytest.approx(2.0)
    assert row["batching_efficiency"] == pytest.approx(0.9)
    assert row["ort_roofline"] == pytest.approx(100 * 8.8 / 50)
    int8 = a["models"]["ViT-B-32::none"]["rows"]["int8"]
    assert int8["speedup"] == {"ort": 2.0, "triton": 2.0, "gateway": 2.0}
    assert int8["size_ratio"] == pytest.approx(90 / 350)
    peer = a["models"]["ViT-B-32::none"]["peer"]
    fp32_peer = next(p for p in peer if p["dtype"] == "float32")
    # Peer's best: 42/s at p99 250 ms; clipserve's sweep stays within 250 ms up to 72/s.
    assert fp32_peer["budget_ms"] == 250.0 and fp32_peer["clipserve"] == pytest.approx(72.0)
    assert fp32_peer["ratio"] == pytest.approx(72 / 42)
    assert next(p for p in peer if p["dtype"] == "int8")["status"] == "failed"
    by_kind = {(t["precision"], t["target"].split(" (")[0]): t for t in a["targets"]}
    gateway = by_kind[("fp32", "gateway / Triton-direct items/s")]
    assert not gateway["met"] and "expected ratio" in gateway["why"]  # 80% < 90%
    added = by_kind[("fp32", "gateway added p50, one caller")]
    assert not added["met"] and added["unit"] == "ms"
    assert by_kind[("fp32", "batching efficiency")]["met"]
    assert by_kind[("fp32", "clipserve / peer items/s at the peer's p99")]["met"]


def test_markdown_has_tables_targets_and_misses(tmp_path):
    results = synthetic_results()
    plots = [tmp_path / "ViT-B-32-throughput.png"]
    md = bench_report.markdown(results, plots, tmp_path)
    assert md.startswith("# clipserve benchmarks")
    assert "python -m clipserve.loadtest.bench" in md
    assert "not idle" in md  # load average 2.5 at the start
    assert "| fp32 | 350.0 | 100.0 (16) | 90.0 | 72.0 | 80% |" in md
    assert "missed by 10.0 points" in md
    assert "## Why targets were missed" in md and "failed: boom" in md
    assert "![ViT-B-32-throughput](ViT-B-32-throughput.png)" in md


def test_plots_are_written_for_each_model(tmp_path):
    pytest.importorskip("matplotlib")
    paths = bench_report.plot_all(synthetic_results(), tmp_path)
    assert [p.name for p in paths] == ["ViT-B-32-throughput.png", "ViT-B-32-latency.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_collapsed_profile_summary():
    text = ("MainThread;run (asyncio/base_events.py:600);decode (PIL/Image.py:10) 30\n"
            "MainThread;run (asyncio/base_events.py:600);_run_once (asyncio/base_events.py:1) 50\n"
            "Worker;infer (tritonclient/grpc/aio/__init__.py:5) 20\n"
            "Loop;EpollSelector.select (/usr/lib/python3.11/selectors.py:468) 70\n"
            "Pool;_worker (/usr/lib/python3.11/concurrent/futures/thread.py:81) 5\n")
    out = bench_report.summarize_collapsed(text)
    assert out["samples"] == 100 and out["idle_samples"] == 75
    assert out["top_self"][0] == ["_run_once (base_events.py)", 50.0]
    assert out["by_area"] == {"asyncio event loop": 50.0, "image decode/resize (PIL)": 30.0,
                              "tritonclient + protobuf": 20.0}


# -- the peer's tokenizer files ---------------------------------------------------------------

def test_peer_tokenizer_files_have_clips_vocabulary(tmp_path):
    from clipserve.loadtest.peer_model import bytes_to_unicode, write_tokenizer_files

    assert len(set(bytes_to_unicode().values())) == 256
    lines = ["#version"] + [f"a{i} b{i}" for i in range(49152 - 256 - 2)] + ["extra line"]
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress("\n".join(lines).encode()))
    vocab_path, merges_path = write_tokenizer_files(bpe, tmp_path)
    import json

    vocab = json.loads(vocab_path.read_text())
    assert len(vocab) == 49408  # CLIP's vocabulary size
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a0b0"] == 512
    merges = merges_path.read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "a0 b0" and len(merges) == 48895


def test_cached_export_is_reused_and_flagged_when_the_sources_changed(tmp_path):
    import hashlib
    import json

    from clipserve.loadtest.bench import ensure_repository, sources_digest

    lines = []
    root = tmp_path / "repositories"
    older = root / "ViT-B-32-none-000000000000"
    older.mkdir(parents=True)
    (older / "report.json").write_text("{}")
    (older / "bench-export.json").write_text(json.dumps(
        {"spec": "ViT-B-32::none", "precisions": ["fp32", "int8"], "sources": "old"}))
    path, current = ensure_repository("ViT-B-32::none", ("fp32", "int8"), tmp_path, tmp_path,
                                      lines.append)
    assert path == older and not current and "WARNING" in lines[-1]

    key = hashlib.sha256(f"ViT-B-32::none|fp32,int8|{sources_digest()}".encode()).hexdigest()
    fresh = root / f"ViT-B-32-none-{key[:12]}"
    fresh.mkdir()
    (fresh / "report.json").write_text("{}")
    assert ensure_repository("ViT-B-32::none", ("fp32", "int8"), tmp_path, tmp_path,
                             lines.append) == (fresh, True)
