"""The benchmark's workloads: names and GPU rates checked with clear errors, the JPEG photos
look like camera photos to a decoder, and the report sizes gateway cores from what was
measured and says which rate it assumed."""

from __future__ import annotations

import io
import json

import pytest

from clipserve.loadtest import bench_report
from clipserve.loadtest import bench_workloads as bw
from clipserve.loadtest import workload as wl
from clipserve.loadtest.bench import BenchConfig
from clipserve.loadtest.bench_results import (GATEWAY, TRITON, BenchResults, CpuPerItem,
                                              ModelResult, RunSummary, StackRuns,
                                              WorkloadResult)


def test_unknown_workload_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown workload.*jpg.*valid: png, jpeg, text, "
                                         "classify"):
        BenchConfig(workloads=("png", "jpg"))
    with pytest.raises(ValueError, match="unknown precision|precision"):
        BenchConfig(workload_precision="int3")
    assert BenchConfig(workloads=("text",)).workloads == ("text",)


@pytest.mark.parametrize("entry", ["ViT-B-32", "ViT-B-32=", "ViT-B-32=-5", "=300",
                                   "ViT-B-32:gif=300", "ViT-B-32=fast", "ViT-B-32=x",
                                   "ViT-B-32=x0"])
def test_bad_gpu_rates_are_rejected_with_the_expected_form(entry):
    with pytest.raises(ValueError, match="SCALE\\[:WORKLOAD\\]=ITEMS_PER_S|unknown workload"):
        BenchConfig(gpu_items_per_s=(entry,))


def test_a_workload_specific_gpu_rate_wins_over_the_models():
    rates = bw.parse_gpu_rates(["ViT-B-32=2500", "ViT-B-32:text=x40"])
    assert bw.gpu_rate(rates, "ViT-B-32", "jpeg") == bw.GpuRate(2500.0)
    text = bw.gpu_rate(rates, "ViT-B-32", "text")
    assert text == bw.GpuRate(40.0, factor=True) and text.items_per_s(30.0) == 1200.0
    assert text.items_per_s(None) is None  # a factor of nothing measured is no rate
    assert bw.gpu_rate(rates, "digits-s", "png") is None


def test_photo_jpegs_are_distinct_deterministic_640x480_photos_of_camera_size():
    from PIL import Image

    photos = wl.photo_jpegs(3)
    assert photos == wl.photo_jpegs(3)  # the same run to run
    assert len(set(photos)) == 3
    for data in photos:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (640, 480) and img.mode == "RGB"
        # Sized like a camera photo at quality 90, not like a flat test card (a few KB).
        assert 80_000 <= len(data) <= 200_000, len(data)


def test_prep_is_measured_per_item_for_images_and_texts():
    images = bw.inputs("jpeg", [], photo_count=2)
    assert bw.prep_ms_per_item(images, 224, min_seconds=0.01) > 0
    with pytest.raises(ValueError, match="tokenizer"):
        bw.prep_ms_per_item(bw.inputs("text", []), 224)

    class Tokenizer:
        calls = 0

        def encode(self, texts):
            Tokenizer.calls += len(texts)

    assert bw.prep_ms_per_item(bw.inputs("text", []), 224, Tokenizer(), min_seconds=0.0) >= 0
    assert Tokenizer.calls >= len(wl.builtin_texts())


def _run(items_per_s, concurrency, cpu):
    return RunSummary(concurrency=concurrency, requests=100, ok=100, items=100, duration_s=8.0,
                      items_per_s=items_per_s, error_rate=0.0, latency_ms={"p50": 5.0},
                      cpu=CpuPerItem(cpu))


def _results(gpu_items_per_s=()):
    jpeg = WorkloadResult(
        "jpeg", "image", "int8", "EmbedImages, photos", prep_ms_per_item=3.0,
        input_bytes_mean=120_000.0,
        stacks={TRITON: StackRuns(({8: _run(80.0, 8, {"triton": 20.0, "client": 3.5})},)),
                GATEWAY: StackRuns(({8: _run(60.0, 8, {"triton": 21.0, GATEWAY: 4.0,
                                                      "client": 0.3})},))})
    skipped = WorkloadResult("classify", "classify", "int8", "Classify", status="skipped",
                             reason="no default label set")
    model = ModelResult(spec="ViT-B-32::none", scale="ViT-B-32", image_size=224, repository="r",
                        export_current=True, image_flops=8.8e9,
                        workloads={"jpeg": jpeg, "classify": skipped})
    return BenchResults(config={"concurrency": 8, "duration": 8.0, "latency_duration": 4.0,
                                "warmup": 1.5, "ort_batches": ["1"], "direct_decode": True,
                                "gpu_items_per_s": list(gpu_items_per_s)},
                        machine={"cores": 2}, models={"ViT-B-32::none": model})


def test_cores_come_from_the_measured_triton_rate_unless_a_gpu_rate_is_given(tmp_path):
    (row, skipped) = bench_report.analyze(_results()).models["ViT-B-32::none"].workloads
    assert row.gateway_ratio == pytest.approx(0.75)
    assert row.gateway_cpu_excl_prep_ms == pytest.approx(1.0)
    assert not row.rate_given and row.rate == 80.0
    assert row.cores(row.gateway_cpu_ms) == pytest.approx(4.0 * 80 / 1000)
    md = bench_report.markdown(_results(), [], tmp_path)
    assert "measured in this run on this CPU (no GPU figure given" in md
    assert "| jpeg | EmbedImages, photos, 120.0 KB | 80.0 | 60.0 | 75% |" in md
    assert "| 3.000 | 3.50 / 20.00 | 4.00 / 21.00 / 0.30 | 1.00 | 80 (measured) | 0.32 (0.08) |" \
        in md
    assert "skipped: no default label set" in md
    assert "decodes and resizes every call's itself" in md

    given = _results(["ViT-B-32=2500"])
    (row, _) = bench_report.analyze(given).models["ViT-B-32::none"].workloads
    assert row.rate_given and row.cores(row.gateway_cpu_ms) == pytest.approx(10.0)
    md = bench_report.markdown(given, [], tmp_path)
    assert "**assumed** rate: jpeg 2500 items/s (given with `--gpu-items-per-s`" in md
    assert "2500 (given) | 10.00 (2.50) |" in md
    factor = _results(["ViT-B-32:jpeg=x10"])
    (row, _) = bench_report.analyze(factor).models["ViT-B-32::none"].workloads
    assert row.rate == 800.0 and row.cores(row.gateway_cpu_ms) == pytest.approx(3.2)
    assert "jpeg 10x the Triton-direct rate measured here" in bench_report.markdown(
        factor, [], tmp_path)


def test_workloads_round_trip_through_bench_json():
    results = _results(["ViT-B-32=2500"])
    again = BenchResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert again == results
    legacy = results.to_dict()
    del legacy["models"]["ViT-B-32::none"]["workloads"]
    assert BenchResults.from_dict(legacy).models["ViT-B-32::none"].workloads == {}


def test_the_cpu_targets_why_separates_the_measured_decode():
    import dataclasses

    from tests.unit.test_loadtest_bench import MEASURED, targets_by_name, typed_results

    results = typed_results(MEASURED)
    model = results.models["digits-s"]
    png = WorkloadResult("png", "image", "fp32", prep_ms_per_item=0.07)
    with_png = dataclasses.replace(results, models={"digits-s": dataclasses.replace(
        model, workloads={"png": png})})
    why = targets_by_name(bench_report.analyze(with_png))[
        "gateway CPU per single-image call at N callers"].why
    assert "of the gateway's 2.50 ms, decoding the PNG takes 0.070 ms" in why
    assert "so 2.43 ms is serving" in why
    why = targets_by_name(bench_report.analyze(results))[
        "gateway CPU per single-image call at N callers"].why
    assert "decoding the PNG" not in why  # not measured: not claimed
