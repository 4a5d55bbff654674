"""The servicer microbenchmark runs every method end to end and writes its JSON (no timings
asserted: the machine is shared)."""

from __future__ import annotations

import json

from clipserve.loadtest import micro


def test_micro_writes_every_cell_with_the_machine(tmp_path, capsys):
    out = tmp_path / "micro.json"
    assert micro.main(["--calls", "4", "--batches", "1,3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = {(r["method"], r["batch"]) for r in data["results"]}
    assert cells == {(m, b) for m in micro.METHODS + micro.CLIENT_METHODS for b in (1, 3)}
    assert all(r["calls"] >= 4 and r["cpu_us_per_call"] > 0 for r in data["results"])
    assert data["cpu"]["model"] and len(data["loadavg_before"]) == 3
    assert "EmbedImages" in capsys.readouterr().out


def test_micro_fails_loudly_when_a_call_fails(monkeypatch):
    # A servicer error must not be averaged into a number: the fake context raises on abort.
    monkeypatch.setattr(micro, "LABELS", ["only-one"])  # Classify needs two labels
    try:
        micro.main(["--calls", "2", "--batches", "1"])
    except RuntimeError as exc:
        assert "INVALID_ARGUMENT" in str(exc) or "FAILED_PRECONDITION" in str(exc)
    else:
        raise AssertionError("a failing call was measured as if it succeeded")
