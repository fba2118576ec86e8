"""End to end, on a model whose fills run until their deadline: superseding, `$/cancelRequest` (completion and
commands), the version check of a rewrite, and the engine killed mid-request and restarted.

These tests share one engine on their own socket; the kill test runs last, and the module stops the engine.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

from tests.dgls.conftest import (
    change_document,
    engine_status,
    inline_params,
    lsp_client,
    open_document,
    server_options,
    stop_engine,
    wait_engine,
    wait_for_status,
)

URI = "file:///work/demo/slow.py"
TEXT = "def add(a, b):\n    \n"
LINE, COLUMN = 1, 4  # an empty line in a block: block mode, which runs to the deadline on this model


@pytest.fixture(scope="module")
def slow_socket(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = Path(tmp_path_factory.mktemp("slow-engine")) / "engine.sock"
    yield path
    stop_engine(path)


@pytest.fixture
def options(slow_model_dir, slow_socket) -> dict[str, Any]:
    return server_options(slow_model_dir, slow_socket, deadlines={"invokedMs": 30_000, "rewriteMs": 30_000})


def running(status: dict[str, Any]) -> bool:
    return bool(status.get("running"))


def idle(status: dict[str, Any]) -> bool:
    return not status.get("running") and not status.get("queued")


async def test_a_newer_request_supersedes_the_older_one_in_the_engine(options, slow_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(slow_socket)["requests_served"]
        older = asyncio.ensure_future(client.text_document_inline_completion_async(
            inline_params(URI, LINE, COLUMN, invoked=True)))
        await wait_engine(slow_socket, running)
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={**options, "deadlines": {"invokedMs": 500}}))  # the newer one returns quickly
        position = types.Position(LINE, COLUMN)
        change_document(client, URI, 2, "r", types.Range(position, position))
        newer = await client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN + 1, True))
        assert not (await older).items  # the older one answered empty...
        assert newer is not None
        status = await wait_engine(slow_socket, idle)
        assert status["requests_served"] == served + 1  # ...and never finished in the engine


async def test_cancel_request_reaches_the_engine(options, slow_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(slow_socket)["requests_served"]
        pending = asyncio.ensure_future(client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(URI, LINE, COLUMN, invoked=True), msg_id="cancel-1"))
        await wait_engine(slow_socket, running)
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-1"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wait_for(pending, timeout=10)
        status = await wait_engine(slow_socket, idle, timeout=10)  # long before the 30 s deadline
        assert status["requests_served"] == served


def rewrite_params(version: int | None = None) -> types.ExecuteCommandParams:
    argument: dict[str, Any] = {"uri": URI, "range": {"start": {"line": 0, "character": 4},
                                                      "end": {"line": 0, "character": 7}}}
    if version is not None:
        argument["version"] = version
    return types.ExecuteCommandParams(command="dgls.rewriteSelection", arguments=[argument])


async def test_cancelling_a_rewrite_command_reaches_the_engine(options, slow_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(slow_socket)["requests_served"]
        pending = asyncio.ensure_future(client.protocol.send_request_async(
            types.WORKSPACE_EXECUTE_COMMAND, rewrite_params(1), msg_id="cancel-2"))
        await wait_engine(slow_socket, running)
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-2"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wait_for(pending, timeout=10)
        status = await wait_engine(slow_socket, idle, timeout=10)
        assert status["requests_served"] == served
        assert client.recorder.edits == []
        # the work-done progress began and ended
        kinds = [type(value).__name__ for reports in client.progress_reports.values() for value in reports]
        assert "WorkDoneProgressBegin" in kinds and "WorkDoneProgressEnd" in kinds


async def test_cancelling_the_work_done_progress_cancels_the_rewrite(options, slow_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        pending = asyncio.ensure_future(client.workspace_execute_command_async(rewrite_params(1)))
        await wait_engine(slow_socket, running)
        (token,) = [token for token, reports in client.progress_reports.items()
                    if any(getattr(value, "title", "") == "dgls: rewriting the selection" for value in reports)]
        client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wait_for(pending, timeout=10)
        await wait_engine(slow_socket, idle, timeout=10)
        assert client.recorder.edits == []


async def test_an_edit_is_never_applied_to_changed_text(options, slow_socket) -> None:
    quick = {**options, "deadlines": {"rewriteMs": 1500}}
    async with lsp_client(quick) as client:
        open_document(client, URI, TEXT)
        pending = asyncio.ensure_future(client.workspace_execute_command_async(rewrite_params(1)))
        await wait_engine(slow_socket, running)
        end = types.Position(1, 4)
        change_document(client, URI, 2, "pass", types.Range(end, end))  # the user types meanwhile
        result = await asyncio.wait_for(pending, timeout=30)
        assert result["applied"] is False and "changed" in result["reason"]
        assert client.recorder.edits == []
        # a selection made on an older version is refused at once
        stale = await client.workspace_execute_command_async(rewrite_params(1))
        assert stale["applied"] is False and "changed" in stale["reason"]


async def test_engine_killed_mid_request_answers_empty_restarts_and_recovers(options, slow_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        pid = engine_status(slow_socket)["pid"]
        pending = asyncio.ensure_future(client.text_document_inline_completion_async(
            inline_params(URI, LINE, COLUMN, invoked=True)))
        await wait_engine(slow_socket, running)
        os.kill(pid, signal.SIGKILL)
        result = await asyncio.wait_for(pending, timeout=10)
        assert not result.items  # answered empty, at once
        restarting = await wait_for_status(client, lambda s: s["state"] == "restarting")
        await wait_for_status(client, lambda s: s["state"] == "ready", timeout=120, after=restarting)
        assert engine_status(slow_socket)["pid"] != pid
        told = [m.message for m in client.messages if "engine stopped" in m.message]
        assert len(told) == 1
        begun = [value.title for reports in client.progress_reports.values() for value in reports
                 if isinstance(value, types.WorkDoneProgressBegin)]
        assert "dgls: restarting the engine" in begun  # work-done progress while the new engine loads
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={**options, "deadlines": {"invokedMs": 500}}))
        again = await client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN, invoked=True))
        assert again is not None
        status = await wait_for_status(client, lambda s: s["engineCalls"] >= 1)
        assert status["state"] == "ready"
