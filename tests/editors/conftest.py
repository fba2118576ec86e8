"""Fixtures for the real-editor tests: the model the editors' server serves and the scenario they run (where to
type, which lines to fill and to rewrite), a private engine socket, the installers of the editors, and which
editors to leave out.

`_probe` asks a real `dgls lsp` (its post-processing included) what a model does with the sample below: the first
of TYPINGS where it gives ghost text, the first of FILL_SELECTIONS that Fill Selection changes and the first of
REWRITE_SELECTIONS that Rewrite Selection changes (to non-empty text). The tests run on the first model that serves
all three: `engine/default_model` when it ships (`config.json` exists), under completion seeds 0, 1, 2; else a tiny
random checkpoint (gibberish, but real model output through the real engine and server), a few checkpoints and
seeds. When none serves, the tests fail with every try and its reason. `DGLS_EDITOR_TEST_MODEL` narrows the tries:
`default`, `tiny`, or a checkpoint directory. The engine listens on a socket in a temp dir (never the user's
default socket) and is stopped afterwards. The run's summary says which model, seed and scenario the tests ran on.

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
from pytest_lsp import LanguageClient

from dgls.selection import FILL_COMMAND, REWRITE_COMMAND
from tests.dgls.conftest import inline_params, lsp_client, open_document, server_options
from tests.tiny_checkpoint import build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "engine" / "default_model"
SCREENSHOTS = ROOT / "editors" / "screenshots"

# The file both editors open. Some of its lines are being written (the comments, `with open(path) as`,
# `total +=`): the editors type at the end of one of them. Keep it under ~1000 characters: the whole file then fits
# the server's prefix window, so no context snippet (which would name the file's path) reaches the model, and the
# probe's answers under its own URIs are the editors' answers.
SAMPLE = '''import os


def read_lines(path):
    """Return the lines of the file at path."""
    # Open the file and split it
    with open(path) as
        return handle.read().splitlines()


def count_words(text):
    # Split on whitespace and count the
    words = text.split()
    return len(words)


def main():
    # Add up the words of every file in the
    total = 0
    for name in os.listdir("."):
        total +=
    print(total)
'''


@dataclass(frozen=True)
class Typing:
    """At the end of (1-based) `line`, the editor types `typed`."""

    line: int
    typed: str

    def text(self) -> tuple[str, int]:
        """The sample as it reads once `typed` is typed, and the cursor's 0-based column then."""
        lines = SAMPLE.split("\n")
        lines[self.line - 1] += self.typed
        return "\n".join(lines), len(lines[self.line - 1])


# Where the editors may type, tried in this order. The shipped model is not useful yet (README, "The default
# model"): at most positions its answer is empty once the server has post-processed it, and which positions it
# answers hangs on its sampler's draws and on the whole file; hence candidates, not one position. Each one stays
# mid-line (the server asks for one line there, which the VS Code test relies on) and types no bracket or quote
# (VS Code would close it, Neovim would not).
TYPINGS = [
    Typing(7, " handle"), Typing(6, " into lines"), Typing(12, " words"), Typing(18, " current directory"),
    Typing(21, " count_words"), Typing(12, " number of words"), Typing(6, " on newlines"), Typing(21, " len"),
    Typing(18, " working directory"), Typing(6, " into"),
]
# Whole-line selections (first, last 1-based line) for Fill Selection and for Rewrite Selection, tried in this
# order: a model may propose nothing for one, or (rewrite) give the selected text back unchanged.
FILL_SELECTIONS = [(13, 14), (5, 5), (8, 8), (19, 19), (22, 22), (13, 13), (14, 14), (7, 8)]
REWRITE_SELECTIONS = [(13, 14), (5, 5), (8, 8), (22, 22), (14, 14), (13, 13), (19, 19), (7, 8)]
REWRITE_INSTRUCTION = "use fewer lines"  # what the tests type as the rewrite's instruction


def split_at(selection: tuple[int, int], text: str = SAMPLE) -> tuple[str, str, str]:
    """`text` around a whole-line selection, as both editors send it ((first, 0) to the end of the last line):
    the text before it, the selected text, the text after it."""
    first, last = selection
    lines = text.split("\n")
    before = "".join(line + "\n" for line in lines[: first - 1])
    selected = "\n".join(lines[first - 1 : last])
    return before, selected, text[len(before) + len(selected) :]


@dataclass(frozen=True)
class Scenario:
    """What the editor tests do, as `_probe` chose it for the model they run on."""

    type_line: int  # 1-based; the cursor goes to its end and the editor types `typed`
    typed: str
    ghost: str  # the probe's ghost text there (the tests compare the editors with their own server, not with this)
    explicit: bool  # only an explicit request got it, not the automatic ones while typing (the tests ask after 15 s)
    fill_selection: tuple[int, int]  # (first, last) 1-based lines
    rewrite_selection: tuple[int, int]
    instruction: str = REWRITE_INSTRUCTION

    def typed_sample(self) -> tuple[str, int]:
        """The sample once `typed` is typed, and the cursor's 0-based column then."""
        return Typing(self.type_line, self.typed).text()

    def describe(self) -> str:
        line = SAMPLE.split("\n")[self.type_line - 1].strip()
        how = "on an explicit request" if self.explicit else "while typing"
        (fill_first, fill_last), (rewrite_first, rewrite_last) = self.fill_selection, self.rewrite_selection
        return (f"typing {self.typed!r} after {line!r} (line {self.type_line}; the probe got ghost text "
                f"{self.ghost!r} {how}), Fill on lines {fill_first}-{fill_last}, Rewrite on lines "
                f"{rewrite_first}-{rewrite_last}")


def replacement(selection: tuple[int, int], text: str) -> str | None:
    """What replaced the whole-line `selection` of SAMPLE in `text`, or None when `text` differs from SAMPLE
    elsewhere too (before or after the selection)."""
    before, _, after = split_at(selection)
    if len(text) < len(before) + len(after) or not text.startswith(before) or not text.endswith(after):
        return None
    return text[len(before) : len(text) - len(after)]


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
    seed: int  # the server option completion.seed: the editors pass it too (the probe's answers depend on it)
    scenario: Scenario


def dgls_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgls", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


async def _probe_typing(client: LanguageClient) -> tuple[Scenario | None, str]:
    """The first of TYPINGS where the automatic request (what the editors send while typing) gets one line of
    ghost text, else the first where an explicit one does (what the tests send after 15 s without any); as a
    Scenario without selections yet, or None and why."""
    found: Scenario | None = None
    for number, typing in enumerate(TYPINGS):
        uri = f"file:///dgls-editor-probe/typed{number}.py"
        text, column = typing.text()
        open_document(client, uri, text)
        for invoked in (False, True) if found is None else (False,):
            answer = await client.text_document_inline_completion_async(
                inline_params(uri, typing.line - 1, column, invoked))
            ghost = answer.items[0].insert_text if answer and answer.items else ""
            if ghost.strip() and "\n" not in ghost:
                found = Scenario(typing.line, typing.typed, ghost, invoked, (0, 0), (0, 0))
                if not invoked:
                    return found, ""
                break
    if found is not None:
        return found, ""
    return None, "no ghost text at any typing position, even on an explicit request (" + ", ".join(
        f"{typing.typed!r} at line {typing.line}" for typing in TYPINGS) + ")"


async def _probe_selections(client: LanguageClient, command: str,
                            selections: list[tuple[int, int]]) -> tuple[tuple[int, int] | None, str]:
    """The first of `selections` that `command` changes (into non-empty text), else None and why."""
    reasons = []
    for number, selection in enumerate(selections):
        uri = f"file:///dgls-editor-probe/{command}{number}.py"
        open_document(client, uri, SAMPLE)
        first, last = selection
        span = {"start": {"line": first - 1, "character": 0},
                "end": {"line": last - 1, "character": len(SAMPLE.split("\n")[last - 1])}}
        instruction = REWRITE_INSTRUCTION if command == REWRITE_COMMAND else ""
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=command, arguments=[{"uri": uri, "range": span, "instruction": instruction}])) or {}
        text = result.get("text") or ""
        if result.get("applied") and text.strip() and text != split_at(selection)[1]:
            return selection, ""
        unchanged = result.get("applied") and text == split_at(selection)[1]
        reasons.append(f"{first}-{last}: {'it gave the selected text back' if unchanged else result.get('reason')}")
    name = "Rewrite" if command == REWRITE_COMMAND else "Fill"
    return None, f"{name} Selection changes no selection (lines " + "; ".join(reasons) + ")"


async def _probe(model: Path, socket: Path, seed: int) -> tuple[Scenario | None, str]:
    """The scenario the editor tests can run on `model` under completion seed `seed`, or None and why not; asked
    of a real `dgls lsp`, which starts the engine on `socket` and leaves it running."""
    async with lsp_client(server_options(model, socket, completion={"seed": seed})) as client:
        typing, why_not_typing = await _probe_typing(client)
        fill, why_not_fill = await _probe_selections(client, FILL_COMMAND, FILL_SELECTIONS)
        rewrite, why_not_rewrite = await _probe_selections(client, REWRITE_COMMAND, REWRITE_SELECTIONS)
    if typing is None or fill is None or rewrite is None:
        return None, "; ".join(reason for reason in (why_not_typing, why_not_fill, why_not_rewrite) if reason)
    return Scenario(typing.type_line, typing.typed, typing.ghost, typing.explicit, fill, rewrite), ""


DEFAULT_SEEDS = (0, 1, 2)  # completion seeds tried on the shipped model (and on a checkpoint given by path)
TINY_TRIES = ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0))  # tiny models: (checkpoint seed, completion seed)
RAN_ON: list[str] = []  # what the editor tests ran on, for the summary lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in RAN_ON:
        terminalreporter.write_line(f"[dgls] {line}")


def _tries(choice: str) -> list[tuple[str, Path | int, int]]:
    """(kind, model or tiny checkpoint seed, completion seed), in the order they are probed."""
    if choice not in ("auto", "default", "tiny"):
        return [("custom", Path(choice).resolve(), seed) for seed in DEFAULT_SEEDS]
    tries: list[tuple[str, Path | int, int]] = []
    if choice in ("auto", "default"):
        if (DEFAULT_MODEL / "config.json").exists():
            tries += [("default", DEFAULT_MODEL, seed) for seed in DEFAULT_SEEDS]
        elif choice == "default":
            pytest.fail(f"DGLS_EDITOR_TEST_MODEL=default, but {DEFAULT_MODEL} has no config.json", pytrace=False)
    if choice in ("auto", "tiny"):
        tries += [("tiny", checkpoint, seed) for checkpoint, seed in TINY_TRIES]
    return tries


def _describe(kind: str, model: Path, seed: int) -> str:
    what = {"default": "the shipped default model", "tiny": f"a tiny random model ({model.name})"}.get(
        kind, str(model))
    return f"{what}, completion seed {seed}"


def _choose(choice: str, workdir: Path, socket: Path) -> tuple[EditorEngine, list[str]]:
    """The first model and seed that can serve the editor tests, and why the ones before could not; fails the
    tests, listing every try and its reason, when none can."""
    failures = []
    for kind, model, seed in _tries(choice):
        if isinstance(model, int):
            directory = workdir / f"tiny-model-seed{model}"
            model = directory if (directory / "config.json").exists() else build_checkpoint(directory, seed=model)
        try:
            scenario, reason = asyncio.run(_probe(model, socket, seed))
        except Exception as error:  # e.g. the engine could not load the model: try the next one
            scenario, reason = None, f"the probe failed: {type(error).__name__}: {error}"
        if scenario is not None:
            return EditorEngine(model, socket, kind, seed, scenario), failures
        failures.append(f"{_describe(kind, model, seed)}: {reason}")
        dgls_cli("engine", "stop", "--socket", str(socket), timeout=60)  # the next try may load another model
    pytest.fail(f"no model can serve the real-editor tests (DGLS_EDITOR_TEST_MODEL={choice}); tried:\n  "
                + "\n  ".join(failures), pytrace=False)


@pytest.fixture(scope="session")
def editor_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditorEngine]:
    workdir = tmp_path_factory.mktemp("engine")
    socket = workdir / "engine.sock"
    try:
        try:
            engine, failures = _choose(os.environ.get("DGLS_EDITOR_TEST_MODEL", "auto"), workdir, socket)
        except BaseException:
            RAN_ON.append("the real-editor tests found no model to run on (their errors list what was tried)")
            raise
        RAN_ON.append(f"the real-editor tests ran on {_describe(engine.kind, engine.model, engine.seed)}")
        RAN_ON.extend(f"  instead of {failure}" for failure in failures)
        RAN_ON.append(f"  scenario: {engine.scenario.describe()}")
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
