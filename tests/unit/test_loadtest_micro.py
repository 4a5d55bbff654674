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
    # The servicer runs in process: BLAS is capped as serve() caps it (blas_threads=1).
    assert data["blas_threads"] == 1
    assert all(p["num_threads"] == 1 for p in data["blas_pools"])


def test_micro_caps_blas_threads_as_the_server_does(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(micro, "limit_blas_threads", lambda n: seen.append(n) or [])
    assert micro.main(["--calls", "2", "--batches", "1", "--blas-threads", "2",
                       "--json", str(tmp_path / "m.json")]) == 0
    assert micro.main(["--calls", "2", "--batches", "1"]) == 0
    assert seen == [2, 1]


def test_micro_fails_loudly_when_a_call_fails(monkeypatch):
    # A servicer error must not be averaged into a number: the fake context raises on abort.
    monkeypatch.setattr(micro, "LABELS", ["only-one"])  # Classify needs two labels
    try:
        micro.main(["--calls", "2", "--batches", "1"])
    except RuntimeError as exc:
        assert "INVALID_ARGUMENT" in str(exc) or "FAILED_PRECONDITION" in str(exc)
    else:
        raise AssertionError("a failing call was measured as if it succeeded")


def test_one_command_measures_each_width_against_a_baseline_into_its_own_section(tmp_path,
                                                                                 capsys):
    baseline = tmp_path / "before.json"
    # A file from before --dim: its cells are digits-s's width, 64.
    baseline.write_text(json.dumps({"label": "before", "results": [
        {"method": "EmbedTexts", "batch": 1, "cpu_us_per_call": 1000.0}]}))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# clipserve benchmarks\n\n## Other section\n\nkept\n")
    argv = ["--calls", "3", "--batches", "1", "--dims", "64,16", "--baseline", str(baseline),
            "--markdown", str(md), "--json", str(tmp_path / "m.json")]
    assert micro.main(argv) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert {(r["method"], r["dim"]) for r in data["results"]} == {
        (m, d) for m in micro.METHODS + micro.CLIENT_METHODS for d in (64, 16)}
    text = md.read_text()
    section = text.split(micro.SECTION_START)[1].split(micro.SECTION_END)[0]
    assert "## Other section\n\nkept" in text
    assert "python -m clipserve.loadtest.micro --calls 3" in section
    texts_64 = next(r for r in data["results"] if r["method"] == "EmbedTexts" and r["dim"] == 64)
    ratio = f"{texts_64['cpu_us_per_call'] / 1000.0:.2f}"
    assert f"| EmbedTexts | 64 | 1 | {texts_64['cpu_us_per_call']:.1f} |" in section
    assert f"| 1000.0 | {ratio} |" in section
    assert "| EmbedTexts | 16 | 1 |" in section and "| - | - |" in section  # no baseline cell
    assert micro.main(argv) == 0  # a rerun replaces the section, keeps the rest
    assert md.read_text().count(micro.SECTION_START) == 1 and "kept" in md.read_text()


def test_a_bad_baseline_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert micro.main(["--calls", "2", "--baseline", str(bad)]) == 2
    assert "cannot read the baseline" in capsys.readouterr().err


def test_without_py_spy_the_section_says_there_is_no_profile(tmp_path, monkeypatch):
    import shutil
    import sys

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    md = tmp_path / "B.md"
    assert micro.main(["--calls", "2", "--batches", "1", "--profile", "--markdown", str(md),
                       "--json", str(tmp_path / "m.json")]) == 0
    assert "No profile: py-spy not installed." in md.read_text()
    assert json.loads((tmp_path / "m.json").read_text())["profile"] == {
        "status": "py-spy not installed"}


def test_repeats_keep_the_lowest_round(monkeypatch):
    import asyncio
    import itertools

    clock = itertools.count()
    monkeypatch.setattr(micro.time, "process_time", lambda: next(clock) ** 2 * 1e-6)

    async def handler(request, context):
        return None

    class Service:
        EmbedTexts = staticmethod(handler)

    # process_time reads 0,1,4,9,...: the first round spans 1 us, the second 5, the third 9;
    # each round is one call, so the lowest is the first.
    cpu_us, _ = asyncio.run(micro._measure(Service(), "EmbedTexts", None, 1, 0, repeats=3))
    assert cpu_us == 1.0
    assert micro.main(["--calls", "2", "--repeats", "0"]) == 2
