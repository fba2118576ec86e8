"""Infilling quality: exact match, edit similarity and pass@1 of the engine on FIM tasks.

Usage:
    python -m benchmarks.infill --tasks ../shared/data/human-eval-infilling/HumanEval-SingleLineInfilling.jsonl.gz \
        [--limit N] [--model DIR] [--deadline-ms MS] [--device cpu] [--json-out PATH] [--seed S]

Tasks use the human-eval-infilling record shape: `task_id`, `prompt` (text before the gap), `suffix`,
`canonical_solution` (the middle), optional `test` and `entry_point`. Each task is filled by a private engine
through the same client and request path as `dgls complete` (one candidate, fixed seed). A middle of one line
is asked in line mode (the completion ends the line), a longer one in block mode. pass@1 runs
`prompt + completion + suffix + test + check(entry_point)` in its own Python subprocess with a timeout; test
code never runs in this process. Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness_engine import percentile, private_engine
from engine.client import EngineClient, EngineError
from engine.fill import FillRequest


def read_tasks(path: Path, limit: int | None) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        tasks = [json.loads(line) for line in handle if line.strip()]
    for task in tasks:
        missing = {"task_id", "prompt", "suffix", "canonical_solution"} - set(task)
        if missing:
            raise SystemExit(f"{path}: task {task.get('task_id', '?')} lacks {sorted(missing)}")
    return tasks[:limit] if limit else tasks


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer string (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def task_mode(task: dict[str, Any]) -> str:
    return "line" if task["canonical_solution"].rstrip("\n").count("\n") == 0 else "block"


def completion_text(task: dict[str, Any], text: str) -> str:
    """The text that goes into the gap: a line-mode answer ends its line like the reference does."""
    if task["canonical_solution"].endswith("\n") and not text.endswith("\n"):
        return text + "\n"
    return text


def passes(task: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
    """Run the task's tests on `prompt + completion + suffix` in a separate Python process."""
    program = task["prompt"] + completion + task["suffix"] + "\n" + task["test"] + f"\ncheck({task['entry_point']})\n"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(program)
    try:
        result = subprocess.run([sys.executable, handle.name], capture_output=True, timeout=timeout,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, stdin=subprocess.DEVNULL)
        return result.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        os.unlink(handle.name)


def fill_task(client: EngineClient, task: dict[str, Any], deadline_ms: float, seed: int) -> dict[str, Any]:
    request = FillRequest(prefix=task["prompt"], suffix=task["suffix"], language="python", path="task.py",
                          mode=task_mode(task), deadline_ms=deadline_ms, seed=seed)  # type: ignore[arg-type]
    started = time.perf_counter()
    try:
        result = client.fill(request)
    except EngineError as exc:
        return {"task_id": task["task_id"], "error": exc.code, "latency_ms": (time.perf_counter() - started) * 1000}
    latency = (time.perf_counter() - started) * 1000
    completion = completion_text(task, result.text)
    return {
        "task_id": task["task_id"],
        "completion": completion,
        "exact_match": completion.strip() == task["canonical_solution"].strip(),
        "edit_similarity": edit_similarity(completion.strip(), task["canonical_solution"].strip()),
        "latency_ms": latency,
        "steps": result.steps,
        "tokens_per_forward": result.tokens_per_forward,
        "converged": result.converged,
    }


def summarize(rows: list[dict[str, Any]], tested: bool) -> dict[str, Any]:
    ok = [row for row in rows if "error" not in row]
    mean = (lambda key: round(statistics.fmean(row[key] for row in ok), 4) if ok else None)  # noqa: E731
    latencies = [row["latency_ms"] for row in ok]
    return {
        "n": len(rows),
        "errors": len(rows) - len(ok),
        "exact_match": round(sum(row["exact_match"] for row in ok) / max(len(rows), 1), 4),
        "edit_similarity": mean("edit_similarity"),
        "pass_at_1": round(sum(row.get("passed", False) for row in ok) / max(len(rows), 1), 4) if tested else None,
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p95": percentile(latencies, 95),
        "tokens_per_forward": mean("tokens_per_forward"),
        "steps_mean": mean("steps"),
        "converged": mean("converged"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=Path, required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deadline-ms", type=float, default=10_000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="write per-task rows and the summary here")
    parser.add_argument("--plot", type=Path, help="write a PNG of exact match by denoising steps here")
    args = parser.parse_args(argv)
    if not args.tasks.is_file():
        parser.error(f"--tasks {args.tasks} does not exist")
    tasks = read_tasks(args.tasks, args.limit)
    tested = all(task.get("test") and task.get("entry_point") for task in tasks)
    rows = []
    with private_engine(args.model, args.device) as (client, status):
        fill_task(client, tasks[0], args.deadline_ms, args.seed)  # warm-up, not counted
        for index, task in enumerate(tasks, 1):
            row = fill_task(client, task, args.deadline_ms, args.seed)
            if tested and "error" not in row:
                row["passed"] = passes(task, row["completion"])
            rows.append(row)
            if index % 20 == 0 or index == len(tasks):
                done = summarize(rows, tested)
                print(f"[{index}/{len(tasks)}] exact {done['exact_match']:.3f} pass@1 {done['pass_at_1']} "
                      f"p50 {done['latency_ms_p50']} ms", file=sys.stderr)
    summary = {"tasks": str(args.tasks), "model": status.get("model"), "device": status.get("device"),
               **summarize(rows, tested)}
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if args.plot:
        from benchmarks.plots import exact_match_by_steps

        exact_match_by_steps(rows, args.plot, f"{args.tasks.name}: exact match by steps")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
