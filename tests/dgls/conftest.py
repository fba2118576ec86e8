"""Fixtures for the language server tests: one real engine on a tiny real model, shared by the session, and a
helper that starts `dgls lsp` (a real subprocess) with a real pytest-lsp client.

The engine is started by the first server (through `ensure_engine`, as in production) on a socket in a
temporary directory, so tests never touch the user's engine; it is shut down at the end of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from engine.client import EngineClient, EngineError
from tests.tiny_checkpoint import build_checkpoint

GENEROUS_MS = 60_000  # CPU fills are slow; deadlines never cut a test's fill short (results stay deterministic)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "engine" / "default_model"


@pytest.fixture(scope="session")
def lsp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffusionGemma with few denoising steps: gibberish, deterministic per seed, fast on a CPU."""
    return build_checkpoint(tmp_path_factory.mktemp("lsp-model"), max_denoising_steps=2)


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose fills run until their deadline (long canvas, many steps): something to cancel."""
    return build_checkpoint(tmp_path_factory.mktemp("lsp-slow-model"), max_denoising_steps=256, canvas_length=64)


@pytest.fixture(scope="session")
def engine_socket(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = Path(tmp_path_factory.mktemp("lsp-engine")) / "engine.sock"
    yield path
    stop_engine(path)


def stop_engine(path: Path) -> None:
    """Shut the engine on `path` down; one still starting (a restart in flight) is waited for, briefly."""
    for _ in range(20):
        try:
            with EngineClient(path, timeout=10.0) as client:
                client.shutdown()
            return
        except EngineError:
            if not path.exists():  # a clean engine removes its socket on exit
                return
            time.sleep(0.5)


def engine_status(path: Path) -> dict[str, Any]:
    with EngineClient(path, timeout=10.0) as client:
        return client.status()


async def wait_engine(path: Path, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    """Poll the engine's own status until `predicate` holds (e.g. a fill is running)."""
    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(engine_status, path)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"engine status never matched: {status}")
        await asyncio.sleep(0.05)


def server_options(model: Path, socket: Path, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "engine": {"model": str(model), "socket": str(socket), "device": "cpu"},
        "deadlines": {"automaticMs": GENEROUS_MS, "invokedMs": GENEROUS_MS, "rewriteMs": GENEROUS_MS},
        "completion": {"candidates": 3},
    }
    for key, value in overrides.items():
        options.setdefault(key, {}).update(value)
    return options


CAPABILITIES = types.ClientCapabilities(
    window=types.WindowClientCapabilities(work_done_progress=True),
    workspace=types.WorkspaceClientCapabilities(
        apply_edit=True, workspace_edit=types.WorkspaceEditClientCapabilities(document_changes=True),
        configuration=False,
    ),
    text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities(),
        completion=types.CompletionClientCapabilities(),
        code_action=types.CodeActionClientCapabilities(),
    ),
)


class Recorder:
    """What the server sent the client besides replies."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.edits: list[types.ApplyWorkspaceEditParams] = []
        self.apply_delay = 0.0


@contextlib.asynccontextmanager
async def lsp_client(options: dict[str, Any] | None, wait_ready: bool = True) -> AsyncIterator[LanguageClient]:
    """A `dgls lsp` subprocess, initialized with `options`, ready to complete; shut down cleanly after."""
    config = ClientServerConfig(server_command=[sys.executable, "-m", "dgls", "lsp"])
    client = await config.start()
    recorder = Recorder()
    client.recorder = recorder  # type: ignore[attr-defined]
    client.test_options = options or {}  # type: ignore[attr-defined]

    @client.feature("dgls/status")
    def on_status(params: Any) -> None:
        recorder.statuses.append(params if isinstance(params, dict) else _as_dict(params))

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    async def on_apply_edit(params: types.ApplyWorkspaceEditParams) -> types.ApplyWorkspaceEditResult:
        await asyncio.sleep(recorder.apply_delay)
        recorder.edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    client.init_result = await client.initialize_session(types.InitializeParams(  # type: ignore[attr-defined]
        capabilities=CAPABILITIES, initialization_options=options, process_id=None,
    ))
    try:
        if wait_ready:
            await wait_for_status(client, lambda status: status.get("state") == "ready", timeout=180)
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.shutdown_session(), timeout=30)
        await stop_client(client)


async def stop_client(client: LanguageClient) -> None:
    """Stop the client; a server that did not exit by itself is killed (a test must never hang)."""
    server = client._server
    if server is not None and server.returncode is None:
        try:
            await asyncio.wait_for(server.wait(), timeout=10)
        except TimeoutError:
            server.kill()
    await client.stop()


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    return dict(getattr(value, "__dict__", {}))


async def wait_for_status(
    client: LanguageClient, predicate: Any, timeout: float = 60, after: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The first dgls/status notification (received or coming, later than `after`) that satisfies `predicate`."""
    recorder: Recorder = client.recorder  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    seen = 0 if after is None else next(i for i, s in enumerate(recorder.statuses) if s is after) + 1
    while True:
        for status in recorder.statuses[seen:]:
            if predicate(status):
                return status
        seen = len(recorder.statuses)
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching dgls/status within {timeout} s; got {recorder.statuses[-3:]}")
        await asyncio.sleep(0.05)


def open_document(client: LanguageClient, uri: str, text: str, language: str = "python", version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)
    ))


def change_document(client: LanguageClient, uri: str, version: int, text: str, at: types.Range) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(range=at, text=text)],
    ))


def inline_params(uri: str, line: int, character: int, invoked: bool = False) -> types.InlineCompletionParams:
    kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=kind),
    )
