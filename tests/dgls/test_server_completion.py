"""End to end: `dgls lsp` with a pytest-lsp client and the real engine on the shipped default model.

The default model writes poor code, so these tests never expect particular text: items are compared with what the
engine answers for the same request, and tests that need a suggestion look for a place where one survives
post-processing. They check item shapes and ranges, candidates per trigger, the fallback, the typed-through
cache, accept notifications, options.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from lsprotocol import types

from tests.dgls.conftest import (
    DEFAULT_MODEL,
    _as_dict,
    change_document,
    engine_status,
    engine_suggestions,
    inline_params,
    lsp_client,
    open_document,
    server_status,
    wait_for_status,
)

PY_URI = "file:///work/demo/stack.py"
PY_TEXT = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        \n"
PY_LINE, PY_COLUMN = 5, 8
# Places where a completion model has something to say on the cursor line: (language, text, line, column).
PLACES = {
    "python": [
        ("python", "def main():\n    print(\n", 1, 10),
        ("python", "with open(path) as f:\n    data = \n", 1, 11),
        ("python", "import os\n\nfor name in os.listdir(path):\n    if name.endswith(\n", 3, 21),
        ("python", "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n", 1, 11),
    ],
    "javascript": [
        ("javascript", "const path = require(\n", 0, 21),
        ("javascript", "function add(a, b) {\n  return \n}\n", 1, 9),
        ("javascript", "for (let i = 0; i < n; i++) {\n  console.log(\n}\n", 1, 14),
    ],
}
SEEDS = range(3)


@dataclass(slots=True)
class Found:
    uri: str
    text: str
    line: int
    column: int
    suggestion: str


def check_items(result: types.InlineCompletionList | None, line: int, column: int, most: int) -> None:
    assert result is not None
    assert len(result.items) <= most
    for item in result.items:
        assert isinstance(item.insert_text, str) and item.insert_text.strip()
        assert item.range is not None
        assert item.range.start == types.Position(line, column)
        assert item.range.end.line == line and item.range.end.character >= column  # same line
        assert item.command is not None and item.command.command == "dgls.acceptCompletion"


def set_seed(client: Any, seed: int, **completion: Any) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={
        **client.test_options, "completion": {**client.test_options.get("completion", {}), "seed": seed, **completion},
    }))


async def find_suggestion(client: Any, tag: str, minimum: int = 1) -> Found:
    """The first place and seed (of `PLACES`, `SEEDS`) where an automatic completion survives post-processing
    with at least `minimum` characters; the seed is left set. Documents are opened as `.../{tag}N`."""
    places = [place for group in PLACES.values() for place in group]
    uris = []
    for index, (language, text, _, _) in enumerate(places):
        uris.append(f"file:///work/demo/{tag}{index}.{'py' if language == 'python' else 'js'}")
        open_document(client, uris[-1], text, language)
    tried = []
    for seed in SEEDS:
        set_seed(client, seed)
        for uri, (_, text, line, column) in zip(uris, places, strict=True):
            result = await client.text_document_inline_completion_async(inline_params(uri, line, column))
            suggestion = result.items[0].insert_text if result is not None and result.items else ""
            if len(suggestion) >= minimum:
                return Found(uri, text, line, column, suggestion)
            tried.append(f"{uri}@{line}:{column} seed {seed}: {suggestion!r}")
    raise AssertionError(f"no suggestion of {minimum}+ characters survived post-processing on the default model; "
                         f"tried {tried}")


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


@pytest.mark.parametrize("language", ["python", "javascript"])
async def test_inline_completion(options, engine_socket, language) -> None:
    """Invoked and automatic completion at places in one language until the default model's suggestion
    survives post-processing; every answer is what the engine returns for that request, post-processed."""
    async with lsp_client(options) as client:
        tried = []
        for index, (_, text, line, column) in enumerate(PLACES[language]):
            uri = f"file:///work/demo/inline{index}.{'py' if language == 'python' else 'js'}"
            open_document(client, uri, text, language)
            invoked = await client.text_document_inline_completion_async(inline_params(uri, line, column, True))
            check_items(invoked, line, column, most=3)
            texts = [item.insert_text for item in invoked.items]
            expected, context = await asyncio.to_thread(
                engine_suggestions, engine_socket, uri, language, text, line, column, 3)
            assert texts == expected  # nothing lost or added between the engine and the client
            assert context.mode == "line" and all("\n" not in t for t in texts)  # mid-line: one line each
            automatic = await client.text_document_inline_completion_async(inline_params(uri, line, column))
            check_items(automatic, line, column, most=1)
            tried.append(f"{uri}: {texts}")
            if texts:
                break
        else:
            raise AssertionError(f"no {language} suggestion survived post-processing on the default model: {tried}")
        status = await wait_for_status(client, lambda s: s["engineCalls"] + s["cacheHits"] >= 2)
        assert status["lastLatencyMs"] > 0 and status["state"] == "ready"
        assert status["model"] == str(DEFAULT_MODEL)  # no `engine.model` option: the shipped model


async def test_completion_fallback_returns_one_text_edit(options) -> None:
    async with lsp_client({**options, "completion": {"candidates": 1}}) as client:
        found = await find_suggestion(client, "fallback")
        calls = (await server_status(client))["engineCalls"]
        result = await client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=found.uri),
            position=types.Position(found.line, found.column),
            context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked),
        ))
        assert isinstance(result, types.CompletionList) and result.is_incomplete
        assert len(result.items) == 1
        edit = result.items[0].text_edit
        assert isinstance(edit, types.TextEdit)
        # its own engine call (one candidate, like the automatic completion) gives the same suggestion
        assert edit.new_text == found.suggestion
        assert edit.range.start == types.Position(found.line, found.column) and edit.range.end.line == found.line
        status = await wait_for_status(client, lambda s: s["engineCalls"] == calls + 1)
        assert status["cacheHits"] == 0


async def test_typing_through_a_suggestion_is_answered_from_the_cache(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        found = await find_suggestion(client, "typed", minimum=2)
        served = engine_status(engine_socket)["requests_served"]
        calls = (await server_status(client))["engineCalls"]
        position = types.Position(found.line, found.column)
        change_document(client, found.uri, 2, found.suggestion[0], types.Range(position, position))
        result = await client.text_document_inline_completion_async(
            inline_params(found.uri, found.line, found.column + 1))
        assert [item.insert_text for item in result.items] == [found.suggestion[1:]]
        assert result.items[0].range.start == types.Position(found.line, found.column + 1)
        status = await wait_for_status(client, lambda s: s["cacheHits"] >= 1)
        assert status["engineCalls"] == calls
        assert engine_status(engine_socket)["requests_served"] == served  # no engine call at all


async def test_accept_notifications_are_counted(options) -> None:
    async with lsp_client(options) as client:
        found = await find_suggestion(client, "accept")
        result = await client.text_document_inline_completion_async(
            inline_params(found.uri, found.line, found.column))
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


async def test_the_suggestion_extends_the_selected_completion_item(options, engine_socket) -> None:
    uri, text = "file:///work/demo/sel.py", "class Stack:\n    def size(self):\n        return len(self.it\n"
    selected = types.SelectedCompletionInfo(range=types.Range(types.Position(2, 24), types.Position(2, 26)),
                                            text="items")
    completed = text.replace("self.it\n", "self.items\n")  # as if the selected item were inserted
    async with lsp_client(options) as client:
        open_document(client, uri, text)
        items: list[types.InlineCompletionItem] = []
        for seed in range(8):  # until the default model's suggestion survives post-processing
            set_seed(client, seed)
            params = inline_params(uri, 2, 26, invoked=True)
            params.context.selected_completion_info = selected
            items = (await client.text_document_inline_completion_async(params)).items
            expected, _ = await asyncio.to_thread(
                engine_suggestions, engine_socket, uri, "python", completed, 2, 29, 3, seed)
            assert [item.insert_text for item in items] == ["items" + rest for rest in expected]
            if items:
                break
        assert items, "no suggestion after a selected completion item survived post-processing on any seed"
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


def test_the_status_of_a_fill_follows_its_answer(options) -> None:
    """On the wire, the `dgls/status` naming a fill (`lastFill`: document, version, engine and round-trip times)
    comes after that request's answer, not before it: its serialising and parsing stay off the answer's path.
    Read as raw frames, since a client library may hand over a reply after messages that followed it."""
    import json
    import subprocess
    import sys

    from tests.dgls.test_stdio import frame

    uri = "file:///work/demo/order.py"
    process = subprocess.Popen([sys.executable, "-m", "dgls", "lsp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None

    def send(message: dict[str, Any]) -> None:
        process.stdin.write(frame({"jsonrpc": "2.0", **message}))  # type: ignore[union-attr]
        process.stdin.flush()  # type: ignore[union-attr]

    def receive() -> dict[str, Any]:
        length = 0
        while (line := process.stdout.readline().strip()) != b"":  # type: ignore[union-attr]
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return json.loads(process.stdout.read(length))  # type: ignore[union-attr]

    try:
        send({"id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None,
                                                          "initializationOptions": options}})
        send({"method": "initialized", "params": {}})
        while receive().get("params", {}).get("state") != "ready":
            pass
        send({"method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 3, "text": PY_TEXT}}})
        send({"id": 2, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": 5, "character": 8},
            "context": {"triggerKind": 1}}})
        arrived: list[str] = []
        while "status" not in arrived:
            message = receive()
            if message.get("id") == 2:
                arrived.append("answer")
            elif message.get("method") == "dgls/status" and (message["params"].get("lastFill") or {}).get(
                    "version") == 3:
                arrived.append("status")
                fill = message["params"]["lastFill"]
        assert arrived == ["answer", "status"]
        assert fill["document"].startswith(uri) and fill["roundTripMs"] >= fill["engineMs"] > 0
    finally:
        process.kill()
        process.wait()


def last_fill(status: dict[str, Any]) -> dict[str, Any]:
    """A status's `lastFill` as a dict (pygls hands nested objects over as attribute objects)."""
    fill = status.get("lastFill") or {}
    return fill if isinstance(fill, dict) else _as_dict(fill)
