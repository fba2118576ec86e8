"""Held-out infilling tasks: ``benchmarks/data/heldout_{single,multi}_line.jsonl``.

Owns cutting benchmark tasks from the held-out split (never trained on) in the human-eval-infilling record
shape (``task_id``, ``prompt``, ``suffix``, ``canonical_solution``), with where each came from and its
license. Single-line tasks are whole lines (indentation and newline included); multi-line tasks are whole
statements of 2-6 lines found with tree-sitter. Every middle fits the canvas (31 tokens). Prompts and
suffixes are clipped to character windows well beyond the engine's token windows.

``python -m engine.training.heldout_tasks [--corpus runs/corpus] [--tokenizer DIR] [--out benchmarks/data]``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.training import corpus, spans
from engine.training.examples import CANVAS_LENGTH

PROMPT_CHARS = 4000
SUFFIX_CHARS = 2000


def _interesting(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 8 and not stripped.startswith(("#", '"""', "'''")) and stripped not in ("else:", "try:")


def _fits(tokenizer: PreTrainedTokenizerBase, middle: str) -> bool:
    return len(tokenizer(middle, add_special_tokens=False)["input_ids"]) <= CANVAS_LENGTH - 1


def _record(source: corpus.SourceFile, kind: str, index: int, start: int, end: int) -> dict[str, Any]:
    text = source.text
    return {
        "task_id": f"heldout/{kind}/{source.path}/{index}",
        "prompt": text[max(0, start - PROMPT_CHARS) : start],
        "suffix": text[end : end + SUFFIX_CHARS],
        "canonical_solution": text[start:end],
        "source": source.path,
        "license": source.license,
    }


def single_line_tasks(sources: list[corpus.SourceFile], tokenizer: PreTrainedTokenizerBase, count: int,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Whole-line tasks, at most a few per file, spread over the held-out files."""
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    for source in sources:
        lines = source.text.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        candidates = [i for i, line in enumerate(lines) if i > 5 and line.endswith("\n") and _interesting(line)]
        for i in rng.sample(candidates, min(4, len(candidates))):
            if _fits(tokenizer, lines[i]):
                pool.append(_record(source, "single", i, offsets[i], offsets[i + 1]))
    rng.shuffle(pool)
    return sorted(pool[:count], key=lambda r: r["task_id"])


def multi_line_tasks(sources: list[corpus.SourceFile], tokenizer: PreTrainedTokenizerBase, count: int,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Whole-statement tasks of 2-6 lines at syntax boundaries."""
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    for source in sources:
        if source.language != "python":
            continue
        lines = source.text.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        blocks = [(a, b) for a, b in spans.statement_lines(source.text) if 1 <= b - a <= 5 and a > 5
                  and b + 1 < len(lines)]
        for a, b in rng.sample(blocks, min(8, len(blocks))):
            middle = "".join(lines[a : b + 1])
            if _fits(tokenizer, middle) and _interesting(lines[a]):
                pool.append(_record(source, "multi", a, offsets[a], offsets[b + 1]))
    rng.shuffle(pool)
    return sorted(pool[:count], key=lambda r: r["task_id"])


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("engine/default_model"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data"))
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    heldout = corpus.load(args.corpus / "heldout.jsonl")
    single = single_line_tasks(heldout, tokenizer, args.count)
    multi = multi_line_tasks(heldout, tokenizer, args.count)
    write_jsonl(single, args.out / "heldout_single_line.jsonl")
    write_jsonl(multi, args.out / "heldout_multi_line.jsonl")
    print(json.dumps({"single_line": len(single), "multi_line": len(multi)}))


if __name__ == "__main__":
    main()
