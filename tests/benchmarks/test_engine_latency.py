"""Smoke run of the engine latency benchmark on a tiny model: the promised fields with sane values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIELDS = ("cold_ms", "warm_ms", "warm_over_cold", "dgls_over_transformers", "agreement", "dgls_exact_match",
          "transformers_exact_match", "tokens_per_forward", "steps_mean", "early_commit_saved_steps", "cancel_ms",
          "cancel_steps")


def test_engine_latency_smoke(tiny_model_dir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_latency", "--model", str(tiny_model_dir), "--requests", "2",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for field in FIELDS:
        assert field in summary, field
    assert summary["cold_ms"] > 0 and summary["warm_ms"] > 0
    assert 0.0 <= summary["agreement"] <= 1.0
    assert summary["steps_mean"] >= 1 and summary["tokens_per_forward"] > 0
    assert summary["cancel_ms"] >= 0
