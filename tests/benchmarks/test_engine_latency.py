"""Smoke run of the engine latency benchmark on a tiny model: the promised fields with sane values."""

from __future__ import annotations

from tests.benchmarks.runner import run_benchmark

FIELDS = ("cold_ms", "warm_ms", "warm_over_cold", "dgls_over_transformers", "agreement", "dgls_exact_match",
          "transformers_exact_match", "tokens_per_forward", "steps_mean", "early_commit_saved_steps", "cancel_ms",
          "cancel_steps", "typed_through_requests", "typed_through_ms", "typed_through_over_cold", "forward",
          "decoder_step_ms", "transformers_decoder_step_ms", "warm_over_cold_transformers_forward",
          "dgls_edit_similarity", "transformers_edit_similarity", "forward_agreement")


def test_engine_latency_smoke(tiny_model_dir) -> None:
    summary = run_benchmark("benchmarks.engine_latency", "--model", str(tiny_model_dir), "--requests", "2",
                            "--repeats", "1")
    for field in FIELDS:
        assert field in summary, field
    assert summary["cold_ms"] > 0 and summary["warm_ms"] > 0
    assert 0.0 <= summary["agreement"] <= 1.0
    assert summary["steps_mean"] >= 1 and summary["tokens_per_forward"] > 0
    assert summary["cancel_ms"] is not None and summary["cancel_ms"] >= 0  # a fill was really cancelled
    assert summary["forward_agreement"] >= 0.5  # the same algorithm through either forward
    assert 0.0 <= summary["dgls_edit_similarity"] <= 1.0 and 0.0 <= summary["transformers_edit_similarity"] <= 1.0
    assert 0 <= summary["typed_through_requests"] <= 2
    assert (summary["typed_through_ms"] is None) == (summary["typed_through_requests"] == 0)
    assert summary["forward"] == "lean"  # and side by side with transformers' forward:
    assert summary["decoder_step_ms"] > 0 and summary["transformers_decoder_step_ms"] > 0
    assert summary["warm_over_cold_transformers_forward"] > 0


def test_engine_latency_cancels_a_fill_of_the_shipped_absorbing_noise_model() -> None:
    """The shipped model converges in 1-2 steps, so a cancel sent mid-fill usually arrives after the fill ended:
    the benchmark makes its cancelled fills long and counts only fills that really stopped (it once reported 0 ms,
    then nothing, on this model while the tiny uniform-noise model above measured fine)."""
    summary = run_benchmark("benchmarks.engine_latency", "--requests", "2", "--repeats", "1")
    assert summary["cancel_ms"] is not None and summary["cancel_steps"] is not None
    assert summary["cancel_ms"] > 0
