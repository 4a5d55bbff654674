"""The soak benchmark's arithmetic and report plumbing on synthetic data (no servers)."""

from __future__ import annotations

import pytest

from clipserve.loadtest import soak
from clipserve.loadtest.stats import Sample

MIB = 1024 * 1024


def test_growth_reads_the_window_and_its_slope():
    rows = [{"t": float(t), "x": 100.0 + 2.0 * t} for t in range(0, 61)]
    g = soak.growth(rows, 10.0, 60.0, "x")
    assert g["start"] == 120.0 and g["end"] == 220.0 and g["change"] == 100.0
    assert g["change_pct"] == pytest.approx(100 * 100 / 120, abs=1e-3)
    assert g["slope_per_min"] == pytest.approx(120.0)
    assert soak.growth(rows, 70.0, 80.0, "x") == {}


def test_windows_count_ok_and_errors_per_bin_on_the_global_clock():
    samples = [Sample(0.1, 0.1, 0.2, 1, "e", "OK"), Sample(0.3, 0.3, 0.5, 1, "e", "OK"),
               Sample(1.1, 1.1, 1.2, 1, "e", "UNAVAILABLE"), Sample(1.3, 1.3, 1.3, 1, "", "DROPPED")]
    bins = soak.windows(samples, offset=10.0, end=2.0, bin_s=1.0)
    assert [b["t"] for b in bins] == [10.0, 11.0]
    assert bins[0]["ok_per_s"] == 2 and bins[0]["errors_per_s"] == 0
    assert bins[0]["p99_ms"] == pytest.approx(200.0)
    assert bins[1]["ok_per_s"] == 0 and bins[1]["errors_per_s"] == 1 and bins[1]["p99_ms"] is None
    assert bins[1]["dropped_per_s"] == 1


def test_recovery_needs_two_clean_windows_at_the_offered_rate():
    bins = [{"t": 10.0, "ok_per_s": 1, "errors_per_s": 5},
            {"t": 11.0, "ok_per_s": 9, "errors_per_s": 0},
            {"t": 12.0, "ok_per_s": 5, "errors_per_s": 0},  # below 80% of 10
            {"t": 13.0, "ok_per_s": 10, "errors_per_s": 0},
            {"t": 14.0, "ok_per_s": 8, "errors_per_s": 0}]
    assert soak.recovery_seconds(bins, 10.0, offered=10.0) == 3.0
    assert soak.recovery_seconds(bins[:3], 10.0, offered=10.0) is None


def test_the_reliability_section_is_replaced_and_survives_a_benchmark_rewrite(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nthroughput table\n")
    first = f"{soak.SECTION_START}\nold figures\n{soak.SECTION_END}\n"
    soak.replace_section(path, first)
    soak.replace_section(path, f"{soak.SECTION_START}\nnew figures\n{soak.SECTION_END}\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nthroughput table\n")
    assert "new figures" in text and "old figures" not in text
    assert text.count(soak.SECTION_START) == 1


@pytest.mark.parametrize("changes, fragment", [
    ({"phases": ("soak", "nap")}, "unknown phase 'nap'"),
    ({"warmup_s": 700.0}, "warmup_s must be in [0, soak_s)"),
    ({"soak_fraction": 0.0}, "soak_fraction must be positive"),
    ({"saturation_steps": ("0",)}, "saturation_steps must be whole numbers >= 1"),
    ({"precisions": ("fp8",)}, "valid precisions"),
])
def test_config_is_validated(changes, fragment):
    with pytest.raises(ValueError, match="invalid soak config") as info:
        soak.SoakConfig(**changes)
    assert fragment in str(info.value)


def test_findings_attribute_growth_to_the_store_from_the_figures():
    results = {"config": {"outcome_store_mib": 64},
               "analysis": {"soak": {
                   "gateway_rss": {"change": 40 * MIB},
                   "stored_bytes": {"change": 30 * MIB},
                   "triton_rss": {"change_pct": 0.5}}},
               "soak": {"server_faults": 0, "hung": 0}}
    text = soak.findings(results)
    assert "+40.0 MB" in text and "+30.0 MB" in text and "75% of the growth" in text
    assert "soak: 0 INTERNAL/UNKNOWN, 0 hung" in text
