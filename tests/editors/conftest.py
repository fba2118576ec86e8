"""Fixtures for the real-editor tests: the model the editors' server serves, a private engine socket, the
installers of the editors, and which editors to leave out.

The model is `engine/default_model` when it ships (`config.json` exists) and, through the real `dgls lsp` (its
post-processing included), answers the typing position below with ghost text and fills one of the test's selections;
else a tiny random checkpoint (gibberish, but real model output through the real engine and server).
`DGLS_EDITOR_TEST_MODEL` overrides: `default`, `tiny`, or a checkpoint directory. The engine listens on a socket in
a temp dir (never the user's default socket) and is stopped afterwards.

`DGLS_SKIP_EDITOR_TESTS=vscode,nvim` (or `all`) leaves those editors out, for machines without network. An installer
that fails skips its tests only when its download host cannot be reached; any other failure fails them.
"""

from __future__ import annotations

import asyncio
import os
import socket as sockets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from lsprotocol import types

from tests.dgls.conftest import inline_params, lsp_client, open_document, server_options
from tests.tiny_checkpoint import build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "engine" / "default_model"
SCREENSHOTS = ROOT / "editors" / "screenshots"

# The file both editors open, and where they type (1-based line; the cursor goes to its end). The shipped model is
# not useful yet (README, "The default model"): at most typing positions its answer is empty after post-processing.
# Here, after `with open(path) as handle`, it answers, so the tests run on it (see `editor_engine`). Its answer hangs on
# the whole file (with line 18 completed it answers nothing here either): after editing SAMPLE, check the run's last
# line says the shipped model was used; if the model or engine changes, `editor_engine` falls back and says why.
SAMPLE = '''import os


def read_lines(path):
    """Return the lines of the file at path."""
    with open(path) as
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
TYPE_AT_LINE = 6  # "    with open(path) as" -> the editor types " handle" after it
TYPED = " handle"
# Selections (first and last 1-based line, whole lines) that Fill/Rewrite Selection try in order: the body of
# count_words, then the docstring line. A model may propose nothing for one gap; the next one is tried.
SELECTIONS = [(11, 12), (5, 5)]


def typed_sample() -> tuple[str, int]:
    """The sample as it reads once TYPED is typed, and the cursor's 0-based column then."""
    lines = SAMPLE.split("\n")
    lines[TYPE_AT_LINE - 1] += TYPED
    return "\n".join(lines), len(lines[TYPE_AT_LINE - 1])


def skipped_editors() -> set[str]:
    value = os.environ.get("DGLS_SKIP_EDITOR_TESTS", "")
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    return {"nvim", "vscode"} if "all" in names else names


def skip_unless_enabled(editor: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(editor in skipped_editors(), reason=f"DGLS_SKIP_EDITOR_TESTS leaves out {editor}")


@dataclass(frozen=True)
class EditorEngine:
    model: Path
    socket: Path
    kind: str  # "default" or "tiny" or "custom"


def dgls_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgls", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


async def _probe(model: Path, socket: Path) -> str:
    """Why `model` cannot serve the editor tests, '' when it can: through a real `dgls lsp` (which starts the engine
    on `socket` and leaves it running), the ghost text at the typing position and a fill of one of SELECTIONS."""
    options = server_options(model, socket)
    async with lsp_client(options) as client:
        text, column = typed_sample()
        open_document(client, "file:///dgls-editor-probe/typed.py", text)
        answer = await client.text_document_inline_completion_async(
            inline_params("file:///dgls-editor-probe/typed.py", TYPE_AT_LINE - 1, column))
        if not answer or not any(item.insert_text.strip() for item in answer.items):
            return f"no ghost text after {text.split(chr(10))[TYPE_AT_LINE - 1].strip()!r}"
        reasons = []
        for number, (first, last) in enumerate(SELECTIONS):
            uri = f"file:///dgls-editor-probe/fill{number}.py"
            open_document(client, uri, SAMPLE)
            end = len(SAMPLE.split("\n")[last - 1])
            span = {"start": {"line": first - 1, "character": 0}, "end": {"line": last - 1, "character": end}}
            result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
                command="dgls.fillSelection", arguments=[{"uri": uri, "range": span}]))
            if result and result.get("applied"):
                return ""
            reasons.append(f"lines {first}-{last}: {(result or {}).get('reason')}")
        return "Fill Selection changes nothing (" + "; ".join(reasons) + ")"


MODEL_USED: list[str] = []  # what the editor tests ran on, for the summary line


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MODEL_USED:
        terminalreporter.write_line(f"[dgls] the real-editor tests ran on {MODEL_USED[0]}")


@pytest.fixture(scope="session")
def editor_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditorEngine]:
    workdir = tmp_path_factory.mktemp("engine")
    socket = workdir / "engine.sock"
    choice = os.environ.get("DGLS_EDITOR_TEST_MODEL", "auto")
    engine: EditorEngine | None = None
    if choice in ("auto", "default") and (DEFAULT_MODEL / "config.json").exists():
        reason = "" if choice == "default" else asyncio.run(_probe(DEFAULT_MODEL, socket))
        if not reason:
            engine = EditorEngine(DEFAULT_MODEL, socket, "default")
        else:
            MODEL_USED.append(f"a tiny random model: the shipped default model cannot serve them ({reason})")
            dgls_cli("engine", "stop", "--socket", str(socket), timeout=60)
    if engine is None and choice not in ("auto", "default", "tiny"):
        engine = EditorEngine(Path(choice).resolve(), socket, "custom")
    if engine is None:
        engine = EditorEngine(build_checkpoint(workdir / "tiny-model"), socket, "tiny")
    if not MODEL_USED:
        MODEL_USED.append({"default": "the shipped default model", "tiny": "a tiny random model"}.get(
            engine.kind, str(engine.model)))
    try:
        yield engine
    finally:
        dgls_cli("engine", "stop", "--socket", str(socket), timeout=60)


def reachable(url: str) -> bool:
    """Whether a TCP connection to the URL's host and port opens within 10 s."""
    parsed = urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with sockets.create_connection((parsed.hostname or "", port), timeout=10):
            return True
    except OSError:
        return False


def install(script: str, *args: str, downloads_from: list[str], timeout: float = 1200,
            env: dict[str, str] | None = None) -> dict[str, str]:
    """Run editors/scripts/<script> and return its KEY=VALUE lines (and its last line as LAST).

    When it fails: skip, naming the reason, if one of `downloads_from` (URLs) cannot be reached (no network); fail
    otherwise, so a broken installer or lockfile is never hidden behind a skip."""
    try:
        result = subprocess.run(["bash", str(ROOT / "editors" / "scripts" / script), *args], capture_output=True,
                                text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
        failure = "" if result.returncode == 0 else (result.stderr or result.stdout).strip()[-1500:]
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s"
    if failure:
        offline = [url for url in downloads_from if not reachable(url)]
        if offline:
            pytest.skip(f"{script} could not download ({', '.join(offline)} cannot be reached): {failure[-300:]}")
        pytest.fail(f"{script} failed although {', '.join(downloads_from)} can be reached:\n{failure}")
    lines = [line for line in result.stdout.strip().splitlines() if line]
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    values.setdefault("LAST", lines[-1] if lines else "")
    return values
