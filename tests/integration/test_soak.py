"""The soak benchmark's 30-second version against the real gateway and the real Triton.

``python -m clipserve.loadtest.soak`` runs minutes (BENCHMARKS.md, RELIABILITY); here its soak
phase runs 30 s at 70% of the measured saturation, then a short faults phase (routing file
rewritten, API key rotated; the session's Triton is shared, so it is not killed here:
tests/integration/test_faults.py does that). The ReportOutcome store is bounded to 1 MiB so it
fills within the run and the gateway's memory must level off.

Asserted: every call answered OK (zero errors, none dropped), the store never passes its bound,
the gateway's RSS after warm-up grows by no more than the store's bound plus a margin, open
file descriptors stay flat, and the routing rewrite moved traffic.
"""

from __future__ import annotations

import pytest

from clipserve.loadtest import soak

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
STORE_MIB = 1
# Beyond the store's bound: allocator arenas, gRPC buffers and the metrics registry settle
# within the warm-up but not to the byte. 0.7 KB per call unbounded (the growth the issue
# reported) over the ~1500-3000 calls after warm-up is 1-2 MB, below this margin: the test
# catches leaks of several KB per call or per-call objects kept for good, the minutes-long
# benchmark measures the rest.
RSS_MARGIN_MIB = 12
FD_MARGIN = 8  # connections of the metrics scraper and Triton's channel come and go


@pytest.fixture(scope="module")
def results(repository, triton, tmp_path_factory):
    config = soak.SoakConfig(
        phases=("soak", "faults"), saturation_steps=("1", "4"), saturation_s=2.0,
        soak_s=30.0, warmup_s=10.0, faults_s=8.0, outcome_store_mib=STORE_MIB,
        call_timeout_s=10.0, out=str(tmp_path_factory.mktemp("soak")))
    return soak.run(config, repository=repository, triton_url=triton.grpc_url,
                    triton_pgid=triton.pid, log=print)


def test_soak_answers_every_call_ok(results):
    phase = results["soak"]
    assert phase["codes"] == {"OK": phase["scheduled"]}, phase["codes"]
    assert phase["scheduled"] > 100
    assert phase["hung"] == 0


def test_soak_memory_levels_off_at_the_store_bound(results):
    rows = results["samples"]
    assert max(r.get("stored_bytes", 0) for r in rows) <= STORE_MIB * MIB
    growth = results["analysis"]["soak"]
    assert growth["gateway_rss"]["change"] <= (STORE_MIB + RSS_MARGIN_MIB) * MIB, growth
    assert growth["gateway_fds"]["change"] <= FD_MARGIN, growth
    assert growth["triton_fds"]["change"] <= FD_MARGIN, growth


def test_routing_rewrite_and_key_rotation_lose_no_call(results):
    phase = results["faults"]
    assert phase["codes"] == {"OK": phase["scheduled"]}, phase["codes"]
    events = [e["event"] for e in phase["events"]]
    assert events == ["routing file rewritten", "API key file: new key added",
                      "client switched to the new key", "API key file: old key removed"]
    # 50/50 before the rewrite, 90/10 after: the first arm's share must rise.
    before, after = phase["served_by_endpoint"]["before"], phase["served_by_endpoint"]["after"]
    first = max(after, key=after.get)
    assert after[first] / sum(after.values()) > before.get(first, 0) / sum(before.values())


def test_report_files_are_written(results, tmp_path):
    from pathlib import Path

    assert Path(results["json"]).stat().st_size > 0
    assert Path(results["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert soak.SECTION_START in results["markdown"]
