"""The decode benchmark runs every path and writes its JSON (no timings asserted: the machine is
shared); its fidelity half is exercised by tests/unit/test_image_fidelity.py."""

from __future__ import annotations

import json

import pytest


def test_decode_bench_writes_every_path_and_the_machine(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from clipserve.loadtest import decode_bench

    out = tmp_path / "decode.json"
    assert decode_bench.main(["--no-fidelity", "--rounds", "1", "--reps", "1",
                              "--sizes", "640x480", "--dispatch-calls", "10",
                              "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    paths = {r["path"] for r in data["results"]}
    assert {"exact", "reduced"} <= paths
    by_path = {r["path"]: r for r in data["results"]}
    assert by_path["exact"]["max_abs_pixel_diff"] == 0 and by_path["exact"]["cpu_ratio"] == 1
    assert by_path["reduced"]["mean_abs_pixel_diff"] > 0  # 640x480 >= 2 x 224: reduced ran
    assert all(r["cpu_ms"] > 0 and r["cosine_min"] is None for r in data["results"])
    assert {r["dispatch"] for r in data["dispatch"]} == {
        "job per image", "job per call", "default (inline when tiny)"}
    assert data["cpu"]["model"] and len(data["loadavg_before"]) == 3
    assert data["versions"]["pillow"]
    assert "reduced" in capsys.readouterr().out
