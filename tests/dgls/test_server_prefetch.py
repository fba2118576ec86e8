"""Prefetch, end to end on the shipped default model: once the editor has asked for an automatic inline completion
in a document, a keystroke's `didChange` starts the fill its request will ask for, and that request takes it over
instead of filling again. A request anywhere else supersedes the prefetch; documents the editor never asked about,
and `completion.prefetch: false`, start nothing. The engine's worker is kept busy (`BusyEngine`) so that what the
server sends waits in the engine's queue, where the tests can see it before the editor has asked anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

from dgls.inline import _cursor_after
from dgls.snapshot import DocumentSnapshot
from tests.dgls.conftest import (
    BusyEngine,
    change_document,
    engine_status,
    idle,
    inline_params,
    lsp_client,
    open_document,
    server_status,
    wait_engine,
)

URI = "file:///work/demo/prefetch.py"
TEXT = "def add(a, b):\n    return a\n"
LINE, COLUMN = 1, 12  # after "return a"


def type_char(client: Any, version: int, column: int, char: str = " ") -> None:
    at = types.Position(LINE, column)
    change_document(client, URI, version, char, types.Range(at, at))


@contextlib.asynccontextmanager
async def keystroke_prefetched(options: dict[str, Any], engine_socket: Any) -> AsyncIterator[tuple[Any, BusyEngine,
                                                                                                     int]]:
    """A server whose editor has asked once automatically (elsewhere than where the test types, so that typing
    never continues a cached suggestion), then a keystroke whose prefetched fill waits in the busy engine before
    anyone asks. Yields the client, the blockers and the engine's `requests_served` before the keystroke."""
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        await client.text_document_inline_completion_async(inline_params(URI, 0, 14))
        await wait_engine(engine_socket, idle)
        served = engine_status(engine_socket)["requests_served"]
        async with BusyEngine(engine_socket) as busy:
            type_char(client, 2, COLUMN)
            await busy.wait_queued()  # the keystroke's fill waits in the engine: nobody has asked yet
            yield client, busy, served


async def test_the_request_after_a_keystroke_takes_over_the_fill_its_didchange_started(options, engine_socket) -> None:
    async with keystroke_prefetched(options, engine_socket) as (client, busy, served):
        result = await asyncio.wait_for(client.text_document_inline_completion_async(
            inline_params(URI, LINE, COLUMN + 1)), timeout=60)
        stats = await server_status(client)
    for item in result.items:
        assert item.range.start == types.Position(LINE, COLUMN + 1)
    assert stats["prefetches"] == 1 and stats["prefetchesUsed"] == 1
    status = await wait_engine(engine_socket, idle)
    assert status["requests_served"] == served + busy.finished + 1  # one fill for the keystroke, not two


async def test_a_request_elsewhere_supersedes_the_prefetch(options, engine_socket) -> None:
    async with keystroke_prefetched(options, engine_socket) as (client, busy, served):
        # the editor asks at another place (its cursor moved): that request replaces the prefetch
        elsewhere = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(URI, 0, 9)))
        await busy.wait_queued()
        result = await asyncio.wait_for(elsewhere, timeout=60)
        stats = await server_status(client)
    for item in result.items:
        assert item.range.start == types.Position(0, 9)
    assert stats["prefetches"] == 1 and stats["prefetchesUsed"] == 0
    status = await wait_engine(engine_socket, idle)
    assert status["requests_served"] == served + busy.finished + 1  # the superseded prefetch never ran


@pytest.mark.parametrize("prefetch", [True, False])
async def test_keystrokes_prefetch_only_where_the_editor_asks_automatically(options, prefetch) -> None:
    options = {**options, "completion": {**options.get("completion", {}), "prefetch": prefetch}}
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        type_char(client, 2, COLUMN)
        await client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN + 1, invoked=True))
        type_char(client, 3, COLUMN + 1)
        # invoked requests do not arm it; the status command is handled after the didChange before it
        assert (await server_status(client))["prefetches"] == 0
        await client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN + 2))
        type_char(client, 4, COLUMN + 2)
        assert (await server_status(client))["prefetches"] == (1 if prefetch else 0)


async def test_cancelling_a_request_that_took_over_a_prefetch_stops_its_fill(options, engine_socket) -> None:
    async with keystroke_prefetched(options, engine_socket) as (client, busy, served):
        pending = asyncio.ensure_future(client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(URI, LINE, COLUMN + 1), msg_id="cancel-me"))
        await asyncio.sleep(0)  # sent before the status command below
        assert (await server_status(client))["prefetchesUsed"] == 1  # taken over, still waiting in the engine
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wait_for(pending, timeout=10)
        await wait_engine(engine_socket, lambda s: s["queued"] + int(s["running"]) <= busy.waiting())
    status = await wait_engine(engine_socket, idle)
    assert status["requests_served"] == served + busy.finished  # the prefetched fill never ran


async def test_a_request_whose_document_changed_before_it_ran_is_answered_empty(tmp_path) -> None:
    """pygls reads every message already buffered before a request's handler runs: a request asked at version
    N whose handler finds version N+1 is for text the editor no longer shows, and is answered empty without a
    fill (counted nowhere). Run in-process, with no engine (a fill would end empty and be counted)."""
    import json

    from dgls.server import create_server

    server = create_server(tmp_path / "no-engine.sock")
    written: list[dict[str, Any]] = []
    server.protocol.set_writer(type("Capture", (), {"write": lambda self, data: written.append(
        json.loads(data.split(b"\r\n\r\n", 1)[1]))})())
    session = server.session

    def receive(message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message})
        server.protocol.handle_message(json.loads(body, object_hook=server.protocol.structure_message))

    def ask(request_id: int, character: int) -> None:
        receive({"id": request_id, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": URI}, "position": {"line": LINE, "character": character},
            "context": {"triggerKind": 2}}})

    def change(version: int, character: int) -> None:
        receive({"method": "textDocument/didChange", "params": {
            "textDocument": {"uri": URI, "version": version}, "contentChanges": [{"range": {
                "start": {"line": LINE, "character": character}, "end": {"line": LINE, "character": character}},
                "text": " "}]}})

    async def answers(count: int) -> list[dict[str, Any]]:
        while len([m for m in written if m.get("id") in (1, 2)]) < count:
            await asyncio.sleep(0.01)
        return [m for m in written if m.get("id") in (1, 2)]

    receive({"id": 0, "method": "initialize", "params": {"capabilities": {}, "processId": None,
             "initializationOptions": {"engine": {"start": False, "loadTimeout": 1},
                                       "deadlines": {"automaticMs": 100}}}})
    receive({"method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": URI, "languageId": "python", "version": 1, "text": TEXT}}})
    ask(1, COLUMN)
    change(2, COLUMN)  # read with the request, before its handler runs
    (stale,) = await asyncio.wait_for(answers(1), timeout=10)
    assert stale["result"] == {"items": []} and session.stats["emptyAnswers"] == 0
    ask(2, COLUMN + 1)  # the control: asked at the current version, it tries the (absent) engine
    await asyncio.wait_for(answers(2), timeout=10)
    assert session.stats["emptyAnswers"] == 1
    await session.shutdown()


def snapshot(text: str) -> DocumentSnapshot:
    return DocumentSnapshot(uri=URI, version=1, text=text, language_id="python", path="")


def partial(line: int, start: int, end: int, text: str) -> types.TextDocumentContentChangePartial:
    return types.TextDocumentContentChangePartial(
        range=types.Range(types.Position(line, start), types.Position(line, end)), text=text)


def test_the_cursor_a_change_leaves() -> None:
    view = snapshot("x = 1\n")
    assert _cursor_after(partial(0, 5, 5, "0"), view) == types.Position(0, 6)  # typed
    assert _cursor_after(partial(0, 4, 5, ""), view) == types.Position(0, 4)  # backspace
    assert _cursor_after(partial(0, 5, 5, "\n    "), view) == types.Position(1, 4)  # Enter, auto-indented
    assert _cursor_after(partial(0, 5, 5, "😋"), view) == types.Position(0, 7)  # two UTF-16 code units
    assert _cursor_after(partial(0, 5, 5, "()"), view) == types.Position(0, 6)  # inside an auto-closed pair
    assert _cursor_after(types.TextDocumentContentChangeWholeDocument(text="y = 2\n"), view) is None
    assert _cursor_after(partial(0, 5, 5, "z" * 200), view) is None  # a paste is not typing
