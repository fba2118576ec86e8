"""End to end on the shipped default model: every bad input gets an empty result or a JSON-RPC error, never a
crash or a hang; an engine that cannot be reached or started is reported once and answered empty."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig

from tests.dgls.conftest import (
    CAPABILITIES,
    DEFAULT_MODEL,
    engine_status,
    inline_params,
    lsp_client,
    open_document,
    server_options,
    stop_client,
    wait_for_status,
)

URI = "file:///work/demo/bad.py"
TEXT = "def f(a):\n    return \n"


async def complete(client: Any, uri: str, line: int, character: int) -> types.InlineCompletionList:
    result = await asyncio.wait_for(
        client.text_document_inline_completion_async(inline_params(uri, line, character, invoked=True)), timeout=60)
    assert isinstance(result, types.InlineCompletionList)
    return result


async def test_bad_positions_uris_languages_and_text(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        # past the end of a line: clamped to the line's end, as the protocol says
        for item in (await complete(client, URI, 1, 500)).items:
            assert item.range.start == types.Position(1, 11)
        served = engine_status(engine_socket)["requests_served"]
        assert not (await complete(client, URI, 50, 0)).items  # past the end of the file
        assert not (await complete(client, "file:///never/opened.py", 0, 0)).items  # unopened URI
        open_document(client, "file:///work/demo/blob.bin", "\x00\x01\x02ELF\x00" * 100, "plaintext")
        assert not (await complete(client, "file:///work/demo/blob.bin", 0, 5)).items  # binary data
        assert engine_status(engine_socket)["requests_served"] == served  # none of these reached the engine
        # an unknown language id is completed as plain text; lone surrogates in the text do not break anything
        open_document(client, "file:///work/demo/x.weird", "grok \ud800 blorp\nzz", "klingon")
        await complete(client, "file:///work/demo/x.weird", 1, 2)
        assert engine_status(engine_socket)["requests_served"] == served + 1
        # a percent-encoded URI is the same document as pygls stores it
        open_document(client, "file:///work/demo/my%20file.py", TEXT)
        await complete(client, "file:///work/demo/my%20file.py", 1, 11)
        assert engine_status(engine_socket)["requests_served"] == served + 2


async def test_a_20_mb_document(options) -> None:
    line = "value = compute(value, 12345)  # padding padding padding\n"
    text = line * (20 * 2**20 // len(line))
    async with lsp_client(options) as client:
        open_document(client, URI, text)
        started = time.monotonic()
        middle = text.count("\n") // 2
        result = await complete(client, URI, middle, 8)
        assert time.monotonic() - started < 60
        for item in result.items:
            assert item.range.start.line == middle


async def test_invalid_utf8_on_the_wire_is_survived(options) -> None:
    async with lsp_client(options) as client:
        body = json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": "file:///work/demo/latin1.py", "languageId": "python", "version": 1, "text": "XX"}}}).encode()
        body = body.replace(b"XX", b"caf\xe9 \xff\xfe")
        client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await client._server.stdin.drain()
        assert not (await complete(client, "file:///work/demo/latin1.py", 0, 3)).items  # never opened
        open_document(client, URI, TEXT)
        await complete(client, URI, 1, 11)  # still serving
        assert client._server.returncode is None


async def test_requests_during_shutdown_get_an_error_and_the_server_exits(options) -> None:
    client = await ClientServerConfig(server_command=[sys.executable, "-m", "dgls", "lsp"]).start()
    try:
        await client.initialize_session(types.InitializeParams(capabilities=CAPABILITIES,
                                                                initialization_options=options))
        open_document(client, URI, TEXT)
        in_flight = asyncio.ensure_future(client.text_document_inline_completion_async(
            inline_params(URI, 1, 11, invoked=True)))
        await client.shutdown_async(None)
        try:  # answered one way or the other: a result, or the cancellation error
            await asyncio.wait_for(in_flight, timeout=30)
        except JsonRpcException:
            pass
        with pytest.raises(JsonRpcException, match="shutting down"):
            await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(URI, 1, 11)), 10)
        client.exit(None)
        assert await asyncio.wait_for(client._server.wait(), timeout=30) == 0
    finally:
        await stop_client(client)


async def test_no_engine_answers_empty_and_tells_the_user_once(tmp_path) -> None:
    options = server_options(None, tmp_path / "nobody.sock", engine={"start": False, "loadTimeout": 1})
    async with lsp_client(options, wait_ready=False) as client:
        await wait_for_status(client, lambda s: s["state"] == "failed")
        open_document(client, URI, TEXT)
        for _ in range(2):
            assert not (await complete(client, URI, 1, 11)).items
        told = [m for m in client.messages if "could not start" in m.message]
        assert len(told) == 1 and told[0].type == types.MessageType.Error


async def test_a_broken_model_is_reported(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    options = server_options(tmp_path / "model", tmp_path / "e.sock")
    async with lsp_client(options, wait_ready=False) as client:
        status = await wait_for_status(client, lambda s: s["state"] == "failed", timeout=120)
        assert status["message"]
        assert any("could not start" in m.message for m in client.messages)


async def test_an_engine_serving_another_model_is_reported(options, tmp_path) -> None:
    async with lsp_client(options):
        pass  # the shared engine runs, serving the default model
    another = tmp_path / "another-model"  # never loaded: the engine on the socket keeps its own model
    other = {**options, "engine": {**options["engine"], "model": str(another)}}
    async with lsp_client(other) as client:
        await wait_for_status(client, lambda s: s["state"] == "ready")
        told = [m.message for m in client.messages if "serves" in m.message]
        assert len(told) == 1 and str(another) in told[0] and str(DEFAULT_MODEL) in told[0]


async def test_an_engine_that_exits_when_idle_is_started_again_quietly(engine_socket) -> None:
    """Stops the session's engine; this server starts it again (with an idle timeout no test reaches)."""
    options = server_options(None, engine_socket, engine={"idleTimeout": 600})
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        pid = engine_status(engine_socket)["pid"]
        os.kill(pid, signal.SIGTERM)  # a clean exit while idle, as its idle timeout would do
        deadline = time.monotonic() + 30
        while engine_socket.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not engine_socket.exists()
        assert not (await complete(client, URI, 1, 11)).items  # answered at once, empty
        stopped = await wait_for_status(client, lambda s: s["state"] == "stopped" and "idle" in s["message"])
        await wait_for_status(client, lambda s: s["state"] == "ready", timeout=120, after=stopped)
        await complete(client, URI, 1, 11)
        assert engine_status(engine_socket)["pid"] != pid
        assert not [m for m in client.messages if "engine" in m.message]  # nothing to tell the user
