"""Smoke run of the LSP latency benchmark on a tiny model: the promised fields with sane values."""

from __future__ import annotations

from tests.benchmarks.runner import ROOT, run_benchmark

FIELDS = ("p50_ms", "p95_ms", "engine_ms_p50", "overhead_ratio", "overhead_ratio_of_medians", "overhead_ms_p50",
          "stale_dropped", "cache_hits", "requests", "filled", "answered", "engine_link_ms_p50", "lsp_side_ms_p50")


def test_lsp_latency_smoke(tiny_model_dir) -> None:
    summary = run_benchmark("benchmarks.lsp_latency", "--model", str(tiny_model_dir), "--sessions", "1",
                            "--chars", "6", "--no-prefetch")
    for field in FIELDS:
        assert field in summary, field
    assert summary["requests"] == 6
    assert summary["engine_ms_p50"] is not None and summary["engine_ms_p50"] > 0
    assert 0 <= summary["stale_dropped"] <= summary["requests"]
    # every fill is paired with the engine's own time for it; without prefetch the round trip cannot beat it
    assert 1 <= summary["filled"] <= summary["requests"]
    assert summary["p50_ms"] >= summary["engine_ms_p50"] and summary["overhead_ms_p50"] >= 0
    assert summary["overhead_ratio"] >= 1 and summary["overhead_ratio_of_medians"] >= 1
    # the overhead splits into the server's round trip to the engine and the LSP side around it
    assert summary["engine_link_ms_p50"] >= 0 and summary["lsp_side_ms_p50"] >= 0
    assert summary["prefetches"] == 0


def test_lsp_latency_with_a_debounce_measures_prefetched_answers(tiny_model_dir) -> None:
    """As editor plugins ask: a debounce after each keystroke, during which the server has already filled."""
    summary = run_benchmark("benchmarks.lsp_latency", "--model", str(tiny_model_dir), "--sessions", "1",
                            "--chars", "6", "--debounce-ms", "60")
    assert summary["debounce_ms"] == 60 and summary["requests"] == 6
    # the server's counts cover two documents (the warm-up session's and the measured one's); the first keystroke
    # of each is not prefetched (nothing was asked there yet), the later ones are and their requests take over
    assert 1 <= summary["prefetches_used"] <= summary["prefetches"] <= 2 * 5
    assert summary["overhead_ratio"] is None  # the fills ran before their requests: nothing to compare
    assert summary["overhead_ratio_of_medians"] is None


def test_lsp_latency_stops_at_once_when_the_engine_cannot_start(tmp_path) -> None:
    """No polling a socket nothing will answer on for five minutes: the server's reason, and a failing exit."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "benchmarks.lsp_latency", "--model", str(tmp_path / "missing"),
                             "--sessions", "1", "--chars", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "the engine could not start" in result.stderr and "missing" in result.stderr
