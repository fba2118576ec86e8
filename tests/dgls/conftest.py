"""Fixtures for the language server tests: one real engine on the shipped default model, shared by the session,
and a helper that starts `dgls lsp` (a real subprocess) with a real pytest-lsp client.

The engine is started by the first server (through `ensure_engine`, as in production, with no `engine.model`
option so the real default path is used) on a socket in a temporary directory, so tests never touch the user's
engine; it is shut down at the end of the session. The default model writes poor code, so the tests never expect
particular text: they compare what the server answers with what the engine itself answers for the same request
(`engine_suggestions`), and look for places where a suggestion survives post-processing instead of hard-coding
one. `BusyEngine` keeps the engine's single worker busy, so a request can be cancelled or superseded while it
still waits in the engine's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pygls.workspace import TextDocument
from pytest_lsp import ClientServerConfig, LanguageClient

from dgls.context import CompletionContext, build_context
from dgls.options import ContextOptions
from dgls.postprocess import postprocess
from dgls.snapshot import DocumentSnapshot
from engine.client import AsyncEngineClient, EngineClient, EngineError
from engine.fill import ContextSnippet, FillRequest

GENEROUS_MS = 60_000  # CPU fills are slow; deadlines never cut a test's fill short (results stay deterministic)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "engine" / "default_model"


@pytest.fixture(scope="session")
def engine_socket(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The socket of the session's engine on the shipped default model (started by the first server)."""
    path = Path(tmp_path_factory.mktemp("lsp-engine")) / "engine.sock"
    yield path
    stop_engine(path)


@pytest.fixture
def options(engine_socket: Path) -> dict[str, Any]:
    return server_options(None, engine_socket)


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


def idle(status: dict[str, Any]) -> bool:
    """An engine status with nothing running or queued."""
    return not status.get("running") and not status.get("queued")


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


def server_options(model: Path | None, socket: Path, **overrides: Any) -> dict[str, Any]:
    """Options for a test server; `model` None leaves `engine.model` unset: the shipped default model."""
    options: dict[str, Any] = {
        "engine": {"socket": str(socket), "device": "cpu", **({"model": str(model)} if model else {})},
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


async def server_status(client: LanguageClient) -> dict[str, Any]:
    """The server's status as of now (the `dgls.status` command; the notification follows each answer, so the
    last one recorded may not be in yet)."""
    status = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="dgls.status"))
    return status if isinstance(status, dict) else _as_dict(status)


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


def offset_of(text: str, line: int, character: int) -> int:
    """The offset of an LSP position (UTF-16) in `text`."""
    snapshot = DocumentSnapshot(uri="", version=0, text=text, language_id="", path="")
    offset = snapshot.offset_at(types.Position(line, character))
    assert offset is not None
    return offset


def server_context(uri: str, language: str, text: str, offset: int, line: int) -> tuple[CompletionContext, str]:
    """The context the server builds at `offset` of `text` with default options, and the document's path."""
    defaults = ContextOptions()
    path = TextDocument(uri, text).path or ""
    context = build_context(text, offset, line, language, path, defaults.prefix_tokens, defaults.suffix_tokens,
                            defaults.extra_tokens)
    return context, path


def engine_answers(
    socket: Path, context: CompletionContext, language: str, path: str, candidates: int, seed: int = 0,
    extra: list[ContextSnippet] | None = None, seed_canvas: str | None = None,
) -> list[str]:
    """What the engine itself answers, post-processed, for the request the server makes from `context`: the
    oracle for the server's answers. It is sent without a `document`, so the engine neither supersedes nor
    warm-starts it, and after the server's own request, so it reuses the very prompt encoding that request left
    in the engine's cache."""
    request = FillRequest(
        prefix=context.prefix, suffix=context.suffix, language=language, path=path,
        context=[*context.snippets, *(extra or [])], mode=context.mode, candidates=candidates,  # type: ignore[arg-type]
        deadline_ms=GENEROUS_MS, seed=seed, seed_canvas=seed_canvas,
    )
    with EngineClient(socket, timeout=120.0) as client:
        result = client.fill(request)
    return [answer.text for answer in postprocess(result.candidates or [result.text], context)[:candidates]]


def engine_suggestions(
    socket: Path, uri: str, language: str, text: str, line: int, character: int, candidates: int, seed: int = 0
) -> tuple[list[str], CompletionContext]:
    """The oracle for an inline completion at (`line`, `character`) of `text`, and its context."""
    context, path = server_context(uri, language, text, offset_of(text, line, character), line)
    return engine_answers(socket, context, language, path, candidates, seed), context


BLOCKER = FillRequest(  # 16 candidates of a block, to convergence: about 2 s of the engine's worker on a CPU
    prefix="def main():\n", suffix="\n", mode="block", candidates=16, deadline_ms=GENEROUS_MS,
    early_commit=False, use_cache=False,
)


class BusyEngine:
    """Keep the engine's one worker busy with `count` slow fills sent straight to it, so that what a test sends
    next waits in the engine's queue (FIFO within a priority; rewrites come after interactive fills) until the
    blockers are done: a request the test cancels or supersedes meanwhile is deterministically still queued
    (the blockers give seconds of margin for a step that takes milliseconds). On exit the blockers still in the
    engine are cancelled, and `finished` counts those the engine served (so `requests_served` can be checked).
    """

    def __init__(self, socket: Path, count: int = 3) -> None:
        self.socket = socket
        self.count = count
        self.client = AsyncEngineClient(socket)
        self.sent: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []
        self.finished = 0

    def waiting(self) -> int:
        """Blockers not answered yet."""
        return sum(not future.done() for _, future in self.sent)

    async def __aenter__(self) -> BusyEngine:
        for index in range(self.count):
            request = dataclasses.replace(BLOCKER, document=f"dgls-test-blocker-{index}")
            self.sent.append(await self.client.send("fill", request=request.to_dict()))
        await wait_engine(self.socket, lambda s: s["running"] and s["queued"] + 1 >= self.count)
        return self

    async def wait_queued(self, requests: int = 1) -> None:
        """Until `requests` more requests than the blockers still pending wait in the engine, behind a blocker."""

        def behind(status: dict[str, Any]) -> bool:
            pending = self.waiting()
            assert pending, "the blockers finished before the test's request arrived: raise BusyEngine's count"
            return status["queued"] + int(status["running"]) >= pending + requests

        await wait_engine(self.socket, behind)

    async def __aexit__(self, *exc: object) -> None:
        for message_id, future in self.sent:
            if not future.done():
                with contextlib.suppress(EngineError):
                    await self.client.request("cancel", target=message_id)
        replies = await asyncio.gather(*(future for _, future in self.sent), return_exceptions=True)
        self.finished = sum(isinstance(reply, dict) and bool(reply.get("ok")) for reply in replies)
        await self.client.close()
