"""The quality harness scores known-good and known-bad completions correctly and never runs test code in
its own process; a smoke run on a tiny model prints the promised JSON fields."""

from __future__ import annotations

import builtins
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.infill import completion_text, edit_similarity, passes, read_tasks, task_mode

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "human-eval-infilling"
TASK = {
    "task_id": "toy/0",
    "prompt": "def add(a, b):\n",
    "suffix": "\n\ndef twice(x):\n    return add(x, x)\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


def test_known_good_completion_passes_and_matches() -> None:
    completion = completion_text(TASK, "    return a + b")
    assert completion == "    return a + b\n"
    assert passes(TASK, completion)
    assert edit_similarity(completion.strip(), TASK["canonical_solution"].strip()) == 1.0


def test_known_bad_completions_fail() -> None:
    assert not passes(TASK, "    return a - b\n")
    assert not passes(TASK, "    return (\n")  # syntax error
    assert not passes(TASK, "    while True: pass\n", timeout=2.0)  # hangs: killed by the timeout
    assert edit_similarity("return a - b", "return a + b") == 1 - 1 / 12


def test_test_code_never_runs_in_the_harness_process(tmp_path) -> None:
    marker = tmp_path / "pid"
    task = dict(TASK, test=f"import builtins, os\nbuiltins.DGLS_RAN = True\nopen({str(marker)!r}, 'w').write("
                           "str(os.getpid()))\ndef check(candidate):\n    pass\n")
    assert passes(task, "    return a + b\n")
    assert not hasattr(builtins, "DGLS_RAN")
    assert int(marker.read_text()) != os.getpid()


def test_modes_follow_the_middle() -> None:
    assert task_mode(TASK) == "line"
    assert task_mode(dict(TASK, canonical_solution="    x = 1\n    return x\n")) == "block"


def test_reads_the_public_sets() -> None:
    path = DATA / "HumanEval-SingleLineInfilling.jsonl.gz"
    if not path.exists():
        import pytest

        pytest.skip("public HumanEval infilling data not present")
    tasks = read_tasks(path, limit=5)
    assert len(tasks) == 5 and all(task["test"] for task in tasks)


def test_smoke_run_prints_the_summary_fields(tiny_model_dir, tmp_path) -> None:
    tasks = tmp_path / "tasks.jsonl.gz"
    with gzip.open(tasks, "wt") as handle:
        for index in range(3):
            handle.write(json.dumps(dict(TASK, task_id=f"toy/{index}")) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.infill", "--tasks", str(tasks), "--model", str(tiny_model_dir),
         "--device", "cpu", "--json-out", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("n", "exact_match", "edit_similarity", "pass_at_1", "latency_ms_p50", "latency_ms_p95",
                "tokens_per_forward", "steps_mean"):
        assert key in summary
    assert summary["n"] == 3 and 0.0 <= summary["pass_at_1"] <= 1.0
    assert summary["latency_ms_p50"] > 0 and summary["steps_mean"] >= 1
    assert len(json.loads((tmp_path / "out.json").read_text())["rows"]) == 3
