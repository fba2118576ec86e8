"""Smoke run of the LSP latency benchmark on a tiny model: the promised fields with sane values."""

from __future__ import annotations

from tests.benchmarks.runner import run_benchmark

FIELDS = ("p50_ms", "p95_ms", "engine_ms_p50", "overhead_ratio", "overhead_ms_p50", "stale_dropped", "cache_hits",
          "requests", "filled", "answered", "engine_link_ms_p50", "lsp_side_ms_p50")


def test_lsp_latency_smoke(tiny_model_dir) -> None:
    summary = run_benchmark("benchmarks.lsp_latency", "--model", str(tiny_model_dir), "--sessions", "1",
                            "--chars", "6")
    for field in FIELDS:
        assert field in summary, field
    assert summary["requests"] == 6
    assert summary["engine_ms_p50"] is not None and summary["engine_ms_p50"] > 0
    assert 0 <= summary["stale_dropped"] <= summary["requests"]
    # every fill is paired with the engine's own time for it, and the round trip cannot beat the engine
    assert 1 <= summary["filled"] <= summary["requests"]
    assert summary["p50_ms"] >= summary["engine_ms_p50"] and summary["overhead_ms_p50"] >= 0
    # the overhead splits into the server's round trip to the engine and the LSP side around it
    assert summary["engine_link_ms_p50"] >= 0 and summary["lsp_side_ms_p50"] >= 0
