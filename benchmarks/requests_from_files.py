"""Realistic fill requests cut from real source files, deterministically.

A request puts the cursor inside a non-blank line of a file and removes the rest of that line, which is the
expected middle; the suffix starts at that line's line break. `mode` is passed through to the fill request.
By default the files are a frozen copy of ten flask 3.1.3 modules (`benchmarks/data/latency_sources/`), from the
held-out split the shipped model was never trained on, so that runs of different commits cut the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class CutRequest:
    path: str
    prefix: str
    suffix: str
    middle: str
    mode: str


SOURCES = PROJECT / "benchmarks" / "data" / "latency_sources"


def default_files() -> list[Path]:
    return sorted(SOURCES.rglob("*.py"))


def cut_requests(files: list[Path], count: int, seed: int = 0, mode: str = "line") -> list[CutRequest]:
    rng = random.Random(seed)
    requests: list[CutRequest] = []
    texts = [(path, path.read_text(encoding="utf-8")) for path in files]
    while len(requests) < count:
        path, text = texts[rng.randrange(len(texts))]
        lines = text.split("\n")
        index = rng.randrange(10, len(lines) - 5)
        line = lines[index]
        stripped = line.strip()
        if len(stripped) < 12 or stripped.startswith(("#", '"""', "'")):
            continue
        indent = len(line) - len(stripped)
        column = indent + rng.randrange(1, max(2, len(stripped) // 2))
        before = "\n".join(lines[:index]) + "\n" + line[:column]
        after = "\n" + "\n".join(lines[index + 1:])  # the middle (rest of the line) is what the model must write
        requests.append(CutRequest(str(path.relative_to(PROJECT)), before, after, line[column:], mode))
    return requests
