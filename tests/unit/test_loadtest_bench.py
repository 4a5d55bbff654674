"""The benchmark's pure parts: FLOP counting, the analysis and report from a synthetic
bench.json, the py-spy summary, the peer's tokenizer files."""

import dataclasses
import gzip
import json

import pytest

from clipserve.loadtest import bench_report, compare, roofline
from clipserve.loadtest.bench import BenchConfig, finish_py_spy, stats_delta
from clipserve.loadtest.bench_results import (GATEWAY, TRITON, BenchResults, CpuPerItem,
                                              ModelResult, OrtResult, PrecisionResult, Profile,
                                              RunSummary, StackRuns, TritonStats)

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


# -- typed results, analysis and report -------------------------------------------------------

def summary(items_per_s, p50, p99, concurrency, cpu=None, stats=None):
    """A run as bench.json holds it (the legacy, untyped form)."""
    data = {"requests": 100, "ok": 100, "errors": {}, "error_rate": 0.0, "items": 100,
            "duration_s": 8.0, "items_per_s": items_per_s, "concurrency": concurrency,
            "latency_ms": {"p50": p50, "p90": p99, "p99": p99, "p99.9": p99, "max": p99,
                           "mean": p50}}
    if cpu:
        data["cpu_ms_per_item"] = cpu
    if stats:
        data["triton_stats"] = stats
    return data


def precision_entry(scale, model_bytes):
    return {
        "model_bytes": model_bytes,
        "ort": {"by_batch": {"1": 80 * scale, "16": 100 * scale}, "best_batch": 16,
                "best_items_per_s": 100.0 * scale},
        "triton": {"runs": {"1": summary(30 * scale, 10.0, 12.0, 1),
                            "8": summary(90 * scale, 80.0, 120.0, 8,
                                         {"triton": 10.0, "client": 1.0},
                                         {"executions": 30, "items": 90, "avg_batch": 3.0,
                                          "queue_ms_per_request": 4.0,
                                          "compute_ms_per_execution": 30.0,
                                          "compute_ms_per_item": 10.0,
                                          "input_output_ms_per_request": 0.1})}},
        "gateway": {"runs": {"1": summary(28 * scale, 12.0, 15.0, 1, {"gateway": 1.2}),
                             "4": summary(70 * scale, 50.0, 60.0, 4),
                             "8": summary(72 * scale, 100.0, 140.0, 8,
                                          {"triton": 10.0, "gateway": 2.0, "client": 0.5},
                                          {"executions": 36, "items": 72,
                                           "avg_batch": 2.0})}},
    }


def synthetic_results():
    """A bench.json from before the typed results (no rounds, no gateway variants)."""
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
                                "samples": 100, "idle_samples": 5,
                                "top_self": [["decode (images.py)", 30.0]],
                                "by_area": {"image decode/resize (PIL)": 30.0}},
        }},
    }


def run_of(items_per_s, p50, concurrency, cpu=None, avg_batch=None):
    return RunSummary(concurrency=concurrency, requests=100, ok=100, items=100, duration_s=8.0,
                      items_per_s=items_per_s, error_rate=0.0,
                      latency_ms={"p50": p50, "p99": 2 * p50}, cpu=CpuPerItem(cpu or {}),
                      triton_stats=TritonStats(executions=10, items=100, avg_batch=avg_batch))


def typed_results(profile, gateway_items_per_s=50.0, gateway_p50=4.0, triton_batch=6.0):
    """One digits-s precision built from the types as bench.py builds them: Triton direct
    100 img/s, p50 2 ms at one caller; the gateway as given."""
    stacks = {
        TRITON: StackRuns(({1: run_of(400.0, 2.0, 1),
                            8: run_of(100.0, 20.0, 8, {"triton": 1.0, "client": 0.2},
                                      triton_batch)},)),
        GATEWAY: StackRuns(({1: run_of(200.0, gateway_p50, 1, {"gateway": 1.5}),
                             8: run_of(gateway_items_per_s, 30.0, 8,
                                       {"triton": 2.0, "gateway": 2.5, "client": 0.3}, 2.0)},)),
    }
    precision = PrecisionResult(model_bytes=700_000, ort=OrtResult({1: 150.0, 64: 200.0}, 64,
                                                                   200.0), stacks=stacks)
    model = ModelResult(spec="digits-s", scale="digits-s", image_size=32, repository="r",
                        export_current=True, image_flops=3_900_000,
                        precisions={"fp32": precision},
                        gateways={GATEWAY: ("--workers", "1")}, profile=profile)
    return BenchResults(config={"concurrency": 8, "duration": 8.0, "latency_duration": 4.0,
                                "warmup": 1.5, "ort_batches": ["1", "64"]},
                        machine={"cpu": "Test CPU", "cores": 2, "loadavg_start": [0.1, 0, 0],
                                 "loadavg_end": [0.1, 0, 0]},
                        models={"digits-s": model}, attainable_gflops=50.0, matmul_n=256)


MEASURED = Profile(status="ok", precision="fp32", concurrency=8, samples=500, idle_samples=40,
                   top_self=(("Handle._run (events.py)", 27.5), ("decode (images.py)", 11.0)),
                   by_area=(("asyncio event loop", 41.0), ("clipserve service", 22.5),
                            ("other", 15.0), ("grpc", 12.5), ("image decode/resize (PIL)", 9.0)))


def targets_by_name(analysis):
    return {t.target.split(" (")[0]: t for t in analysis.targets}


def test_legacy_bench_json_is_read_into_the_types():
    a = bench_report.analyze(synthetic_results())
    row = a.models["ViT-B-32::none"].rows["fp32"]
    assert row.gateway_ratio == pytest.approx(72 / 90)
    assert row.added_p50 == pytest.approx(2.0)
    assert row.batching_efficiency == pytest.approx(0.9)
    assert row.ort_roofline == pytest.approx(100 * 8.8 / 50)
    int8 = a.models["ViT-B-32::none"].rows["int8"]
    assert int8.speedup == {"ort": 2.0, "triton": 2.0, "gateway": 2.0}
    assert int8.size_ratio == pytest.approx(90 / 350)
    peer = a.models["ViT-B-32::none"].peer
    fp32_peer = next(p for p in peer if p.dtype == "float32")
    # Peer's best: 42/s at p99 250 ms; clipserve's sweep stays within 250 ms up to 72/s.
    assert fp32_peer.budget_ms == 250.0 and fp32_peer.clipserve == pytest.approx(72.0)
    assert fp32_peer.ratio == pytest.approx(72 / 42)
    assert next(p for p in peer if p.dtype == "int8").status == "failed"
    by_kind = {(t.precision, t.target.split(" (")[0]): t for t in a.targets}
    gateway = by_kind[("fp32", "gateway / Triton-direct items/s")]
    # (Triton 10 + client 1) / (Triton 10 + gateway 2 + client 0.5) ms per image.
    assert not gateway.met and "expected ratio is about 88% (11.00 / 12.50 ms)" in gateway.why
    added = by_kind[("fp32", "gateway added p50, one caller")]
    assert not added.met and added.unit == "ms"
    assert by_kind[("fp32", "batching efficiency")].met
    assert by_kind[("fp32", "clipserve / peer items/s at the peer's p99")].met


def test_targets_are_met_or_missed_on_the_right_side_of_the_threshold():
    small = bench_report.SMALL_MODEL  # digits-s: 0.004 GFLOP per image
    a = bench_report.analyze(typed_results(MEASURED, gateway_items_per_s=95.0,
                                           gateway_p50=2.0 + small.added_p50_max_ms))
    t = targets_by_name(a)
    assert t["gateway / Triton-direct items/s"].value == pytest.approx(0.95)
    assert t["gateway / Triton-direct items/s"].met  # 95% >= 60%
    assert t["gateway / Triton-direct items/s"].threshold == small.gateway_throughput_min
    assert t["gateway added p50, one caller"].met  # exactly at the limit
    assert t["batching efficiency"].value == pytest.approx(0.5)
    assert not t["batching efficiency"].met
    assert t["batching efficiency"].verdict() == "missed by 30.0 points"
    assert all(target.why == "" for target in a.targets if target.met)

    a = bench_report.analyze(typed_results(MEASURED, gateway_items_per_s=40.0, gateway_p50=5.0))
    t = targets_by_name(a)
    assert not t["gateway / Triton-direct items/s"].met
    assert t["gateway / Triton-direct items/s"].shortfall == pytest.approx(0.2)
    assert t["gateway added p50, one caller"].verdict() == (
        f"missed by {3.0 - small.added_p50_max_ms:.2f} ms")


def test_the_issues_targets_depend_on_the_models_work_per_image():
    assert bench_report.thresholds_for(3_900_000) is bench_report.SMALL_MODEL
    assert bench_report.thresholds_for(4.4e9) is bench_report.LARGE_MODEL
    assert bench_report.LARGE_MODEL.gateway_throughput_min == 0.95
    assert bench_report.LARGE_MODEL.added_p50_max_ms == 1.0
    # digits-s: the gateway's CPU per single-image call (2.5 ms here) against 0.8 ms, and
    # Triton's batch behind it (2.0) against 80% of what direct clients get (6.0, then 2.4).
    t = targets_by_name(bench_report.analyze(typed_results(MEASURED, gateway_items_per_s=95.0)))
    cpu = t["gateway CPU per single-image call at N callers"]
    assert cpu.value == pytest.approx(2.5) and not cpu.met and cpu.verdict() == "missed by 1.70 ms"
    batch = t["Triton's average batch behind the gateway / direct"]
    assert batch.value == pytest.approx(2.0 / 6.0) and not batch.met
    t = targets_by_name(bench_report.analyze(typed_results(MEASURED, triton_batch=2.4)))
    assert t["Triton's average batch behind the gateway / direct"].met  # 2.0 / 2.4 = 83%
    # A ViT-B-32-sized model has no CPU-per-call target.
    vit = bench_report.analyze(synthetic_results())
    assert not any(x.target.startswith("gateway CPU") for x in vit.targets
                   if x.model.startswith("ViT"))


def test_why_names_the_profiles_top_areas_in_order_with_their_shares():
    a = bench_report.analyze(typed_results(MEASURED))
    t = targets_by_name(a)
    for name in ("gateway / Triton-direct items/s", "gateway added p50, one caller"):
        why = t[name].why
        assert ("(fp32, 8 callers, 500 busy samples) puts its self time in asyncio event loop "
                "41.0%, clipserve service 22.5%, grpc 12.5%, the rest 24.0%") in why
        assert "top function Handle._run (events.py) 27.5%" in why
        # The fourth area is not named, and nothing the profile did not measure is claimed.
        assert "decode" not in why.split("top function")[0]
        assert "protobuf" not in why and "tritonclient" not in why
    assert "the gateway spends 1.50 ms of CPU per call" in t["gateway added p50, one caller"].why
    assert "Triton formed batches of 6.0 direct vs 2.0" in t["gateway / Triton-direct items/s"].why


def test_why_mentions_decode_only_when_the_profile_measured_it():
    decode_heavy = dataclasses.replace(MEASURED, by_area=(
        ("image decode/resize (PIL)", 55.0), ("tritonclient + protobuf", 25.0),
        ("grpc", 20.0)), top_self=())
    why = targets_by_name(bench_report.analyze(typed_results(decode_heavy)))[
        "gateway added p50, one caller"].why
    assert why.endswith("image decode/resize (PIL) 55.0%, tritonclient + protobuf 25.0%, "
                        "grpc 20.0%")
    assert "asyncio" not in why and "the rest" not in why


@pytest.mark.parametrize("profile, wording", [
    (None, "no py-spy profile of the gateway was taken in this run"),
    (Profile(status="py-spy not installed", precision="fp32", concurrency=8),
     "profile is not available (py-spy not installed)")])
def test_why_without_a_profile_says_so_instead_of_guessing(profile, wording, tmp_path):
    results = typed_results(profile)
    off = bench_report.analyze(dataclasses.replace(
        results, config={**results.config, "profile": False}))
    assert all(("taken in this run (--no-profile)" in t.why) == (profile is None)
               for t in off.targets if t.target.startswith("gateway") and not t.met)
    a = bench_report.analyze(results)
    missed = [t for t in a.targets if not t.met]
    assert {t.target.split(" (")[0] for t in missed} >= {"gateway / Triton-direct items/s",
                                                         "gateway added p50, one caller"}
    for t in missed:
        if t.target.startswith("gateway"):
            assert wording in t.why and "not measured" in t.why
        for word in ("decode", "PIL", "protobuf", "asyncio", "grpc", "gRPC"):
            assert word not in t.why
    md = bench_report.markdown(results, [], tmp_path)
    assert ("No profile was taken in this run." if profile is None
            else "Not available: py-spy not installed") in md


def test_bench_json_round_trip_keeps_the_types_and_the_readers_keys():
    results = typed_results(MEASURED)
    data = json.loads(json.dumps(results.to_dict()))
    assert BenchResults.from_dict(data) == results
    entry = data["models"]["digits-s"]["precisions"]["fp32"]
    assert set(entry) == {"model_bytes", "ort", TRITON, GATEWAY}
    assert entry["ort"]["by_batch"] == {"1": 150.0, "64": 200.0}
    run = entry[GATEWAY]["runs"]["8"]
    assert run["cpu_ms_per_item"]["gateway"] == 2.5 and run["triton_stats"]["avg_batch"] == 2.0
    assert entry[GATEWAY]["rounds"] == [entry[GATEWAY]["runs"]]
    assert data["models"]["digits-s"]["gateway_profile"]["by_area"]["grpc"] == 12.5
    # loadtest.compare reads the same file.
    (row,) = [r for r in compare.rows([data]) if r["stack"] == GATEWAY and r["concurrency"] == 8]
    assert row["of_triton"] == [0.5] and row["flags"] == "--workers 1"
    # A legacy file reads, and writes back the runs it had.
    legacy = synthetic_results()["models"]["ViT-B-32::none"]
    again = BenchResults.from_dict(synthetic_results()).to_dict()["models"]["ViT-B-32::none"]
    assert again["precisions"]["fp32"]["triton"]["runs"] == legacy["precisions"]["fp32"][
        "triton"]["runs"]
    assert again["peer"]["dtypes"]["float32"] == legacy["peer"]["dtypes"]["float32"]
    assert again["gateway_profile"] == legacy["gateway_profile"]


def test_report_main_regenerates_from_a_saved_bench_json(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(typed_results(MEASURED).to_dict()))
    assert bench_report.main([str(path), str(tmp_path / "B.md")]) == 0
    md = (tmp_path / "B.md").read_text()
    assert "asyncio event loop 41.0%, clipserve service 22.5%, grpc 12.5%" in md



def test_before_after_matches_targets_and_prints_the_change(tmp_path):
    """--before: each target of this run beside the same target of an earlier bench.json,
    the change in its own unit, and the verdict of this run."""
    pytest.importorskip("matplotlib")
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(typed_results(MEASURED, gateway_items_per_s=30.0,
                                               gateway_p50=5.0).to_dict()))
    after.write_text(json.dumps(typed_results(MEASURED, gateway_items_per_s=70.0,
                                              gateway_p50=3.0).to_dict()))
    md = tmp_path / "B.md"
    assert bench_report.main([str(after), str(md), "--before", str(before),
                              "--before-name", "Main at abc123"]) == 0
    text = md.read_text()
    section = text[text.index("## Before and after"):text.index("## digits-s")]
    assert section.count("Main at abc123: ") == 1 and "on Test CPU (2 cores)" in section
    row = next(line for line in section.splitlines()
               if "| gateway / Triton-direct items/s |" in line)
    # 30 -> 70 img/s against Triton's 100: 30.0% -> 70.0%, +40 points, met (>= 60%)
    assert "| 30.0% | 70.0% | +40.0 pts | >= 60% | met |" in row
    row = next(line for line in section.splitlines() if "gateway added p50" in line)
    assert "| 3.00 ms | 1.00 ms | -2.00 ms |" in row
    assert bench_report.main([str(after), str(tmp_path / "C.md")]) == 0
    assert "Before and after" not in (tmp_path / "C.md").read_text()
    with pytest.raises(ValueError, match="no such file"):  # before the run, not after it
        BenchConfig(before=str(tmp_path / "missing.json"))

def test_run_summary_turns_cpu_seconds_into_ms_per_item_and_keeps_the_dict_form():
    from clipserve.loadtest.bench import run_summary, summarize_run
    from clipserve.loadtest.runner import RunResult
    from clipserve.loadtest.stats import Sample

    # 40 images in the 2 s window (one call before it, one failed), 0.1 s of gateway CPU.
    samples = [Sample(0.5, 0.5, 0.6, 1, "e", "OK")]
    samples += [Sample(1.0 + i / 20, 1.0 + i / 20, 1.01 + i / 20, 1, "e", "OK") for i in range(40)]
    samples.append(Sample(2.5, 2.5, 2.6, 1, "", "UNAVAILABLE"))
    run = RunResult("closed", 2, samples, warmup_s=1.0, duration_s=3.0, wall_s=3.0)
    stats = TritonStats(executions=20, items=40, avg_batch=2.0)
    summary = run_summary(run, 2, {"gateway": 0.1, "client": 0.02}, stats)
    assert summary.items == 40 and summary.items_per_s == pytest.approx(20.0)
    assert summary.cpu.ms == {"gateway": 2.5, "client": 0.5}
    assert summary.error_count == 1 and summary.triton_stats == stats
    assert summary.p50 == pytest.approx(10.0, abs=0.01)
    as_dict = summarize_run(run, 2, {"gateway": 0.1, "client": 0.02})
    assert as_dict["cpu_ms_per_item"] == {"gateway": 2.5, "client": 0.5}
    assert as_dict["errors"] == {"UNAVAILABLE": 1} and "triton_stats" not in as_dict
    assert RunSummary.from_dict(as_dict) == dataclasses.replace(summary, triton_stats=None)


def test_finish_py_spy_without_py_spy_is_a_profile_that_says_why(tmp_path):
    profile = finish_py_spy(None, tmp_path / "none.txt", "fp32", 8)
    assert not profile.ok and profile.status == "py-spy not installed"
    assert profile.to_dict() == {"precision": "fp32", "concurrency": 8,
                                 "status": "py-spy not installed"}


def test_markdown_has_tables_targets_and_misses(tmp_path):
    results = synthetic_results()
    plots = [tmp_path / "ViT-B-32-throughput.png"]
    md = bench_report.markdown(results, plots, tmp_path)
    assert md.startswith("# clipserve benchmarks")
    assert "python -m clipserve.loadtest.bench" in md
    assert "not idle" in md  # load average 2.5 at the start
    assert "| fp32 | 350.0 | 100.0 (16) | 90.0 | 72.0 | 80% |" in md
    assert "missed by 15.0 points" in md  # ViT-B-32 gateway at 80% of direct, target 95%
    assert "## Why targets were missed" in md and "failed: boom" in md
    assert "image decode/resize (PIL) 30.0%" in md.split("## Why targets were missed")[1]
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
    vocab = json.loads(vocab_path.read_text())
    assert len(vocab) == 49408  # CLIP's vocabulary size
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a0b0"] == 512
    merges = merges_path.read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "a0 b0" and len(merges) == 48895


def test_cached_export_is_reused_and_flagged_when_the_sources_changed(tmp_path):
    import hashlib

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


def test_the_benchmark_replaces_only_its_own_section_of_benchmarks_md(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench_report.write_section(path, "# clipserve benchmarks\n\nfirst run\n")
    path.write_text(path.read_text() + "\n<!-- soak:start -->\nsoak figures\n<!-- soak:end -->\n"
                    "\n## Hand-written notes\n\nkept\n")
    bench_report.write_section(path, "# clipserve benchmarks\n\nsecond run\n")
    text = path.read_text()
    assert text.startswith(bench_report.SECTION_START) and "second run" in text
    assert "first run" not in text and text.count(bench_report.SECTION_START) == 1
    assert "soak figures" in text and "## Hand-written notes\n\nkept" in text
    # A file from before the markers keeps its content after the new section.
    old = tmp_path / "old.md"
    old.write_text("# notes\n\nsomething\n")
    bench_report.write_section(old, "# clipserve benchmarks\n\nrun\n")
    assert old.read_text().startswith(bench_report.SECTION_START) and "something" in old.read_text()


def test_an_export_at_more_precisions_serves_a_run_that_asks_for_fewer(tmp_path):
    from clipserve.loadtest.bench import ensure_repository, sources_digest

    root = tmp_path / "repositories"

    def exported(folder, precisions, sources, spec="ViT-B-32::none"):
        (root / folder).mkdir(parents=True)
        (root / folder / "report.json").write_text("{}")
        (root / folder / "bench-export.json").write_text(json.dumps(
            {"spec": spec, "precisions": precisions, "sources": sources}))
        return root / folder

    older = exported("ViT-B-32-none-000000000001", ["fp32", "int8"], "old")
    lines = []
    assert ensure_repository("ViT-B-32::none", ("int8",), tmp_path, tmp_path,
                             lines.append) == (older, False)
    current = exported("ViT-B-32-none-000000000002", ["fp32", "fp16", "int8", "int4"],
                       sources_digest())
    exported("ViT-B-32-none-000000000003", ["int8"], sources_digest(), spec="other")
    assert ensure_repository("ViT-B-32::none", ("int8", "fp16"), tmp_path, tmp_path,
                             lines.append, reexport=True) == (current, True)
    assert "it has fp32, fp16, int8, int4" in lines[-1]
