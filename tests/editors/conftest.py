"""Fixtures for the real-editor tests: the model the editors' server serves, and a private engine socket.

The model is `engine/default_model` when it ships (`config.json` exists) and answers the test's prompt with
text, else a tiny random checkpoint (gibberish, but real model output through the real engine and server).
`DGLS_EDITOR_TEST_MODEL` overrides: `default`, `tiny`, or a checkpoint directory. The engine listens on a socket in
a temp dir (never the user's default socket) and is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny_checkpoint import build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "engine" / "default_model"
SCREENSHOTS = ROOT / "editors" / "screenshots"

# The file both editors open, and where they type (1-based line; the cursor goes to its end).
SAMPLE = '''import os


def read_lines(path):
    """Return the lines of the file at path."""
    with open(path) as handle:
        return handle.read().splitlines()


def count_words(text):
    words = text.split()
    return len(words)


def main():
    total = 0
    for name in os.listdir("."):
        total +=
    print(total)
'''
TYPE_AT_LINE = 18  # "        total +=" -> the editor types " count" after it
TYPED = " count"


@dataclass(frozen=True)
class EditorEngine:
    model: Path
    socket: Path
    kind: str  # "default" or "tiny" or "custom"


def dgls_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgls", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _answers(model: Path, socket: Path, workdir: Path) -> bool:
    """Whether `model` completes the sample with some text (starts the engine on `socket`, left running)."""
    sample = workdir / "probe.py"
    lines = SAMPLE.split("\n")
    lines[TYPE_AT_LINE - 1] += TYPED
    sample.write_text("\n".join(lines))
    column = len(lines[TYPE_AT_LINE - 1]) + 1
    result = dgls_cli("complete", f"{sample}:{TYPE_AT_LINE}:{column}", "--model", str(model), "--socket", str(socket),
                      "--deadline-ms", "60000", "--json")
    if result.returncode != 0:
        return False
    return bool(json.loads(result.stdout.strip().splitlines()[-1]).get("text", "").strip())


@pytest.fixture(scope="session")
def editor_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditorEngine]:
    workdir = tmp_path_factory.mktemp("engine")
    socket = workdir / "engine.sock"
    choice = os.environ.get("DGLS_EDITOR_TEST_MODEL", "auto")
    engine: EditorEngine | None = None
    if choice in ("auto", "default") and (DEFAULT_MODEL / "config.json").exists():
        if choice == "default" or _answers(DEFAULT_MODEL, socket, workdir):
            engine = EditorEngine(DEFAULT_MODEL, socket, "default")
        else:
            print("[dgls] the shipped default model answers the sample with empty text: using a tiny random model")
            dgls_cli("engine", "stop", "--socket", str(socket), timeout=60)
    if engine is None and choice not in ("auto", "default", "tiny"):
        engine = EditorEngine(Path(choice).resolve(), socket, "custom")
    if engine is None:
        engine = EditorEngine(build_checkpoint(workdir / "tiny-model"), socket, "tiny")
    try:
        yield engine
    finally:
        dgls_cli("engine", "stop", "--socket", str(socket), timeout=60)


def install(script: str, *args: str, timeout: float = 1200,
            env: dict[str, str] | None = None) -> tuple[dict[str, str] | None, str]:
    """Run editors/scripts/<script>; its KEY=VALUE (or last) lines, or None and the reason it failed."""
    try:
        result = subprocess.run(["bash", str(ROOT / "editors" / "scripts" / script), *args], capture_output=True,
                                text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return None, f"{script} timed out after {timeout:.0f} s"
    if result.returncode != 0:
        return None, f"{script} failed: {(result.stderr or result.stdout).strip()[-600:]}"
    lines = [line for line in result.stdout.strip().splitlines() if line]
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    values.setdefault("LAST", lines[-1] if lines else "")
    return values, ""
