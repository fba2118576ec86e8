"""VS Code (code-server from npm, Node 24) with the dgls extension installed from its .vsix, driven by headless
Chromium (@sparticuz/chromium + puppeteer-core, tests/editors/vscode_driver.mjs) against the real `dgls lsp` and
engine: ghost text (`.ghost-text-decoration`) appears while typing, Tab accepts it and the saved file changes;
"dgls: Fill Selection" replaces the selection; "dgls: Rewrite Selection…" (with an instruction) rewrites it into
other, non-empty text; "dgls: Show Log" shows the output channel and "dgls: Restart Engine" brings up a new engine.
Where to type and which lines to select come from the scenario `editor_engine` chose for the model
(tests/editors/conftest.py).

Part of the default run (so of CI): editors/scripts/install-code-server.sh installs everything from the npm
registry with lockfiles (`npm ci`), cached under .work/editors (a few minutes the first time); each test starts a
VS Code workbench. Skips, naming the reason, when the npm registry cannot be reached (a failed install with the
network up fails), or with DGLS_SKIP_EDITOR_TESTS=vscode.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.editors.conftest import (
    SAMPLE,
    SCREENSHOTS,
    EditorEngine,
    install,
    replacement,
    skip_unless_enabled,
    split_at,
)

pytestmark = skip_unless_enabled("vscode")
DRIVER = Path(__file__).with_name("vscode_driver.mjs")


def npm_registry() -> str:
    if shutil.which("npm") is None:
        return "https://registry.npmjs.org/"
    result = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or "https://registry.npmjs.org/"


@dataclass
class Harness:
    node: Path
    code_server: Path
    harness: Path
    vsix: Path


@pytest.fixture(scope="module")
def harness() -> Harness:
    values = install("install-code-server.sh", downloads_from=[npm_registry()], timeout=1500)
    return Harness(Path(values["NODE"]), Path(values["CODE_SERVER"]), Path(values["HARNESS"]), Path(values["VSIX"]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class CodeServer:
    url: str
    workspace: Path
    out: Path


@pytest.fixture
def code_server(harness: Harness, editor_engine: EditorEngine, tmp_path: Path) -> Iterator[CodeServer]:
    workspace, data, extensions, out = (tmp_path / name for name in ("workspace", "data", "extensions", "out"))
    for directory in (workspace, data / "User", extensions, out):
        directory.mkdir(parents=True)
    (workspace / "sample.py").write_text(SAMPLE)
    settings = {
        "dgls.server.pythonPath": sys.executable,
        "dgls.engine.model": str(editor_engine.model),
        "dgls.engine.socket": str(editor_engine.socket),
        "dgls.deadlines.automaticMs": 60000,
        "dgls.deadlines.invokedMs": 60000,
        "dgls.deadlines.rewriteMs": 120000,
        "dgls.completion.seed": editor_engine.seed,
        "editor.inlineSuggest.enabled": True,
        "editor.quickSuggestions": {"other": False, "comments": False, "strings": False},
        "editor.suggestOnTriggerCharacters": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "security.workspace.trust.enabled": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "chat.disableAIFeatures": True,
        "update.mode": "none",
        "workbench.secondarySideBar.defaultVisibility": "hidden",
        "editor.stickyScroll.enabled": False,
        "editor.minimap.enabled": False,
    }
    (data / "User" / "settings.json").write_text(json.dumps(settings, indent=2))
    env = dict(os.environ, PATH=f"{harness.node.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    common = [str(harness.node), str(harness.code_server), "--user-data-dir", str(data), "--extensions-dir",
              str(extensions), "--config", str(tmp_path / "config.yaml")]
    installed = subprocess.run([*common, "--install-extension", str(harness.vsix)], capture_output=True, text=True,
                               env=env, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    port = free_port()
    log = (tmp_path / "code-server.log").open("w")
    process = subprocess.Popen(
        [*common, "--bind-addr", f"127.0.0.1:{port}", "--auth", "none", "--disable-telemetry",
         "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
         str(workspace)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workspace)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError("code-server did not listen: " + (tmp_path / "code-server.log").read_text()[-2000:])
        yield CodeServer(f"http://127.0.0.1:{port}/?folder={workspace}", workspace, out)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def drive(harness: Harness, server: CodeServer, scenario: str, **env: str) -> dict[str, object]:
    result = subprocess.run(
        [str(harness.node), str(DRIVER), str(harness.harness), server.url, scenario, str(server.out)],
        capture_output=True, text=True, timeout=560, env=dict(os.environ, **env))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    outcome: dict[str, object] = json.loads(lines[-1])
    assert result.returncode == 0 and outcome.get("ok"), "\n".join(lines) + result.stderr[-3000:]
    return outcome


def test_ghost_text_appears_and_tab_accepts_it(harness: Harness, code_server: CodeServer,
                                                editor_engine: EditorEngine) -> None:
    scenario = editor_engine.scenario
    outcome = drive(harness, code_server, "ghost", DGLS_LINE=str(scenario.type_line), DGLS_TYPED=scenario.typed)
    ghost = str(outcome["ghost"]).replace("\u00a0", " ")  # VS Code draws spaces as no-break spaces
    assert ghost.strip()
    # The typing position asks for one line (the rest of it): Tab inserts exactly the ghost text shown there, and
    # nothing else in the file changes.
    expected, _ = scenario.typed_sample()
    lines = expected.split("\n")
    lines[scenario.type_line - 1] += ghost
    assert (code_server.workspace / "sample.py").read_text() == "\n".join(lines)
    if os.environ.get("DGLS_EDITOR_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(code_server.out / "vscode-ghost-text.png", SCREENSHOTS / "vscode-ghost-text.png")


def check_replaced(saved: str, selection: tuple[int, int], what: str, outcome: dict[str, object]) -> None:
    """`saved` is the sample with the selection replaced by other, non-empty text, and nothing else changed."""
    first, last = selection
    new = replacement(selection, saved)
    assert new is not None, f"{what} changed text outside lines {first}-{last}: {outcome.get('toasts')}\n{saved}"
    assert new.strip(), f"{what} left lines {first}-{last} empty: {outcome.get('toasts')}"
    assert new != split_at(selection)[1], f"{what} did not change lines {first}-{last}: {outcome.get('toasts')}"


def test_fill_selection_edits_the_selection(harness: Harness, code_server: CodeServer,
                                            editor_engine: EditorEngine) -> None:
    first, last = editor_engine.scenario.fill_selection
    outcome = drive(harness, code_server, "fill", DGLS_RANGE=f"{first}-{last}")
    check_replaced((code_server.workspace / "sample.py").read_text(), (first, last), "Fill Selection", outcome)


def test_rewrite_show_log_and_restart_engine(harness: Harness, code_server: CodeServer,
                                             editor_engine: EditorEngine) -> None:
    scenario = editor_engine.scenario
    first, last = scenario.rewrite_selection
    outcome = drive(harness, code_server, "commands", DGLS_INSTRUCTION=scenario.instruction,
                    DGLS_RANGE=f"{first}-{last}")
    saved = (code_server.workspace / "sample.py").read_text()
    assert saved != SAMPLE, f"the rewrite changed nothing: {outcome.get('toasts')}"
    check_replaced(saved, (first, last), "Rewrite Selection", outcome)
    assert "starting" in str(outcome["logText"])
    assert outcome["sawRestart"], "the status bar never left 'ready' during the restart"
