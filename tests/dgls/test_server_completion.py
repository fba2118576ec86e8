"""End to end: `dgls lsp` with a pytest-lsp client and the real engine on a tiny real model.

The tiny model writes gibberish (deterministic per seed), so these tests check behaviour: item shapes and
ranges, candidates per trigger, the fallback, the typed-through cache, accept notifications, options.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lsprotocol import types

from tests.dgls.conftest import (
    change_document,
    engine_status,
    inline_params,
    lsp_client,
    open_document,
    server_options,
    wait_for_status,
)

PY_URI = "file:///work/demo/stack.py"
PY_TEXT = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        \n"
PY_LINE, PY_COLUMN = 5, 8


@pytest.fixture
def options(lsp_model_dir, engine_socket) -> dict[str, Any]:
    return server_options(lsp_model_dir, engine_socket)


def check_items(result: types.InlineCompletionList | None, line: int, column: int, most: int) -> None:
    assert result is not None
    assert len(result.items) <= most
    for item in result.items:
        assert isinstance(item.insert_text, str) and item.insert_text.strip()
        assert item.range is not None
        assert item.range.start == types.Position(line, column)
        assert item.range.end.line == line and item.range.end.character >= column  # same line
        assert item.command is not None and item.command.command == "dgls.acceptCompletion"


async def find_seed(client: Any, uri: str, line: int, column: int, minimum: int = 2) -> str:
    """Try seeds until the (gibberish) model suggests at least `minimum` characters; returns the suggestion."""
    for seed in range(12):
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={
            **client.test_options, "completion": {**client.test_options.get("completion", {}), "seed": seed},
        }))
        result = await client.text_document_inline_completion_async(inline_params(uri, line, column))
        if result is not None and result.items and len(result.items[0].insert_text) >= minimum:
            return result.items[0].insert_text
    raise AssertionError("no seed gave a suggestion")


async def test_capabilities_are_advertised(options) -> None:
    async with lsp_client(options) as client:
        capabilities = client.init_result.capabilities
        assert capabilities.inline_completion_provider is not None
        assert capabilities.completion_provider is not None
        assert capabilities.code_action_provider is not None
        assert {"dgls.fillSelection", "dgls.rewriteSelection"} <= set(capabilities.execute_command_provider.commands)
        sync = capabilities.text_document_sync
        assert sync.change == types.TextDocumentSyncKind.Incremental
        assert capabilities.position_encoding in (None, types.PositionEncodingKind.Utf16)


@pytest.mark.parametrize(
    "uri, language, text, line, column",
    [
        (PY_URI, "python", PY_TEXT, PY_LINE, PY_COLUMN),
        ("file:///work/demo/app.js", "javascript", "function add(a, b) {\n  return \n}\n", 1, 9),
    ],
)
async def test_inline_completion(options, uri, language, text, line, column) -> None:
    async with lsp_client(options) as client:
        open_document(client, uri, text, language)
        invoked = await client.text_document_inline_completion_async(inline_params(uri, line, column, invoked=True))
        check_items(invoked, line, column, most=3)
        automatic = await client.text_document_inline_completion_async(inline_params(uri, line, column))
        check_items(automatic, line, column, most=1)
        status = await wait_for_status(client, lambda s: s["engineCalls"] + s["cacheHits"] >= 2)
        assert status["lastLatencyMs"] > 0 and status["state"] == "ready"


async def test_completion_fallback_returns_one_text_edit(options) -> None:
    async with lsp_client(options) as client:
        open_document(client, PY_URI, PY_TEXT)
        await find_seed(client, PY_URI, PY_LINE, PY_COLUMN, minimum=1)  # a seed with something to say
        result = await client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=PY_URI), position=types.Position(PY_LINE, PY_COLUMN),
            context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked),
        ))
        assert isinstance(result, types.CompletionList) and result.is_incomplete
        assert len(result.items) == 1
        edit = result.items[0].text_edit
        assert isinstance(edit, types.TextEdit) and edit.new_text.strip()
        assert edit.range.start == types.Position(PY_LINE, PY_COLUMN) and edit.range.end.line == PY_LINE


async def test_typing_through_a_suggestion_is_answered_from_the_cache(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, PY_URI, PY_TEXT)
        suggestion = await find_seed(client, PY_URI, PY_LINE, PY_COLUMN)
        served = engine_status(engine_socket)["requests_served"]
        calls = client.recorder.statuses[-1]["engineCalls"]  # sent before the reply: up to date
        position = types.Position(PY_LINE, PY_COLUMN)
        change_document(client, PY_URI, 2, suggestion[0], types.Range(position, position))
        result = await client.text_document_inline_completion_async(inline_params(PY_URI, PY_LINE, PY_COLUMN + 1))
        assert [item.insert_text for item in result.items] == [suggestion[1:]]
        assert result.items[0].range.start == types.Position(PY_LINE, PY_COLUMN + 1)
        status = await wait_for_status(client, lambda s: s["cacheHits"] >= 1)
        assert status["engineCalls"] == calls
        assert engine_status(engine_socket)["requests_served"] == served  # no engine call at all


async def test_accept_notifications_are_counted(options) -> None:
    async with lsp_client(options) as client:
        open_document(client, PY_URI, PY_TEXT)
        await find_seed(client, PY_URI, PY_LINE, PY_COLUMN)
        result = await client.text_document_inline_completion_async(inline_params(PY_URI, PY_LINE, PY_COLUMN))
        item = client.protocol._converter.unstructure(result.items[0])
        client.protocol.notify("dgls/didShowCompletion", {"item": item})
        client.protocol.notify("dgls/didPartiallyAcceptCompletion", {"item": item, "acceptedLength": 1})
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="dgls.acceptCompletion", arguments=result.items[0].command.arguments))
        status = await wait_for_status(client, lambda s: s["accepted"] == 1)
        assert status["shown"] == 1 and status["partiallyAccepted"] == 1 and status["acceptedChars"] >= 1


async def test_options_languages_and_invalid_keys(options, engine_socket) -> None:
    bad = {**options, "completion": {"languages": ["go"], "candidates": 0}, "deadlines": {"automaticMs": "soon"}}
    async with lsp_client(bad) as client:
        shown = [m.message for m in client.messages if "invalid option" in m.message]
        assert len(shown) == 1 and "completion.candidates" in shown[0] and "deadlines.automaticMs" in shown[0]
        open_document(client, PY_URI, PY_TEXT)
        served = engine_status(engine_socket)["requests_served"]
        result = await client.text_document_inline_completion_async(inline_params(PY_URI, PY_LINE, PY_COLUMN))
        assert not result.items  # python is not enabled
        assert engine_status(engine_socket)["requests_served"] == served
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"dgls": options}))
        result = await client.text_document_inline_completion_async(inline_params(PY_URI, PY_LINE, PY_COLUMN))
        assert engine_status(engine_socket)["requests_served"] == served + 1


async def test_the_suggestion_extends_the_selected_completion_item(options) -> None:
    uri, text = "file:///work/demo/sel.py", "class Stack:\n    def size(self):\n        return len(self.it\n"
    selected = types.SelectedCompletionInfo(range=types.Range(types.Position(2, 24), types.Position(2, 26)),
                                            text="items")
    async with lsp_client(options) as client:
        open_document(client, uri, text)
        items: tuple[types.InlineCompletionItem, ...] = ()
        for seed in range(8):  # until the gibberish model has something to add
            client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={**options, "completion": {"seed": seed}}))
            params = inline_params(uri, 2, 26)
            params.context.selected_completion_info = selected
            items = (await client.text_document_inline_completion_async(params)).items
            if items:
                break
        assert items
        for item in items:
            assert item.insert_text.startswith("items") and len(item.insert_text) > len("items")
            assert item.range == selected.range


async def test_tcp_transport(tmp_path) -> None:
    import json
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dgls", "lsp", "--tcp", f"127.0.0.1:{port}", "--socket", str(tmp_path / "e.sock"))
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "capabilities": {}, "initializationOptions": {"engine": {"start": False}}}}).encode()
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        reply: dict[str, Any] = {}
        while reply.get("id") != 1:  # notifications (log messages) may come first
            length = 0
            while (header := await asyncio.wait_for(reader.readline(), 30)) != b"\r\n":
                if header.lower().startswith(b"content-length:"):
                    length = int(header.split(b":")[1])
            reply = json.loads(await reader.readexactly(length))
        assert "inlineCompletionProvider" in reply["result"]["capabilities"]
        writer.close()
    finally:
        server.kill()
        await server.wait()
