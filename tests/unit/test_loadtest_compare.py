"""The variants table: medians over runs, ratios to Triton direct from the same run."""

from clipserve.loadtest import compare


def run(load: float, triton: float, gateway: float, batch: float) -> dict:
    def entry(items, b):
        return {"runs": {"8": {"items_per_s": items, "latency_ms": {"p50": 10.0},
                               "triton_stats": {"avg_batch": b},
                               "cpu_ms_per_item": {"gateway": 2.0}}}}
    return {"machine": {"loadavg_start": [load, 0, 0], "cores": 2, "cpu": "test"},
            "models": {"m": {"gateways": {"gateway": ["--workers", "1"]}, "precisions": {
                "fp32": {"ort": {}, "triton": entry(triton, 6.0),
                         "gateway": entry(gateway, batch)}}}}}


def test_cells_are_medians_over_runs_and_ratios_come_from_the_same_run():
    results = [run(1.0, 100.0, 50.0, 2.0), run(2.0, 200.0, 60.0, 3.0),
               run(3.0, 100.0, 90.0, 4.0)]
    (gateway,) = [r for r in compare.rows(results) if r["stack"] == "gateway"]
    assert gateway["items_per_s"] == [50.0, 60.0, 90.0]
    assert gateway["of_triton"] == [0.5, 0.3, 0.9]
    assert gateway["flags"] == "--workers 1"
    table = compare.markdown(results)
    assert "| m | fp32 | gateway | --workers 1 | 8 | 60.0 (50.0-90.0) | 0.50 (0.30-0.90) |" in table
    assert "| 3.00 (2.00-4.00) | 2.00 (2.00-2.00) |" in table
    assert "1.0, 2.0, 3.0" in table


def test_rounds_are_samples_compared_with_their_own_triton_run():
    result = run(1.0, 100.0, 50.0, 2.0)
    entry = result["models"]["m"]["precisions"]["fp32"]
    second = run(1.0, 400.0, 100.0, 2.0)["models"]["m"]["precisions"]["fp32"]
    for stack in ("triton", "gateway"):
        entry[stack]["rounds"] = [entry[stack]["runs"], second[stack]["runs"]]
    (gateway,) = [r for r in compare.rows([result]) if r["stack"] == "gateway"]
    assert gateway["of_triton"] == [0.5, 0.25]
    assert "1 run(s) of 2 round(s)" in compare.markdown([result])
