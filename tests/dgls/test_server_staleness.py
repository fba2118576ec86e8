"""End to end on the shipped default model: superseding, `$/cancelRequest` (completion and commands), the
version check of a rewrite, and the engine killed mid-request and restarted.

A default-model fill takes a fraction of a second, too short to cancel reliably while it runs, so each test
first fills the engine's single worker with slow fills sent straight to the engine (`BusyEngine`): the request
under test then waits in the engine's queue, deterministically, while it is cancelled, superseded or its document
changes. `requests_served` counts what the engine finished, so the tests can tell that a cancelled or superseded
request never ran. The kill test runs last; the engine it restarts is the session's.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable
from typing import Any

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

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
    wait_for_status,
)

URI = "file:///work/demo/slow.py"
TEXT = "def add(a, b):\n    \n"
LINE, COLUMN = 1, 4


async def queued(busy: BusyEngine, request: Awaitable[Any]) -> asyncio.Future[Any]:
    """`request` (a client call that fills through the engine), returned once it waits behind `busy`."""
    pending = asyncio.ensure_future(request)
    await busy.wait_queued()
    return pending


def inline_request(client: Any) -> Awaitable[Any]:
    """An invoked inline completion at the test's cursor."""
    return client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN, invoked=True))


async def test_a_newer_request_supersedes_the_older_one_in_the_engine(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(engine_socket)["requests_served"]
        async with BusyEngine(engine_socket) as busy:
            older = await queued(busy, inline_request(client))
            position = types.Position(LINE, COLUMN)
            change_document(client, URI, 2, "r", types.Range(position, position))
            newer = asyncio.ensure_future(client.text_document_inline_completion_async(
                inline_params(URI, LINE, COLUMN + 1, invoked=True)))
            assert not (await asyncio.wait_for(older, timeout=10)).items  # the older one answered empty at once
            await busy.wait_queued()  # the newer one waits in its place
        result = await asyncio.wait_for(newer, timeout=60)
        assert result is not None
        for item in result.items:
            assert item.range.start == types.Position(LINE, COLUMN + 1)
        status = await wait_engine(engine_socket, idle)
        assert status["requests_served"] == served + busy.finished + 1  # ...and it never ran in the engine


async def cancel_while_queued(client: Any, engine_socket: Any, method: str, params: Any, msg_id: str) -> int:
    """Send a request that waits in the engine behind blocker fills and `$/cancelRequest` it: it must end as
    cancelled and leave the engine. Returns how many blocker fills the engine served."""
    async with BusyEngine(engine_socket) as busy:
        pending = await queued(busy, client.protocol.send_request_async(method, params, msg_id=msg_id))
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wait_for(pending, timeout=10)
        await wait_engine(engine_socket, lambda s: s["queued"] + int(s["running"]) <= busy.waiting())
    return busy.finished


async def test_cancel_request_reaches_the_engine(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(engine_socket)["requests_served"]
        blockers = await cancel_while_queued(client, engine_socket, types.TEXT_DOCUMENT_INLINE_COMPLETION,
                                             inline_params(URI, LINE, COLUMN, invoked=True), "cancel-1")
        status = await wait_engine(engine_socket, idle)
        assert status["requests_served"] == served + blockers  # the cancelled fill never ran


def rewrite_params(version: int | None = None) -> types.ExecuteCommandParams:
    argument: dict[str, Any] = {"uri": URI, "range": {"start": {"line": 0, "character": 4},
                                                      "end": {"line": 0, "character": 7}}}
    if version is not None:
        argument["version"] = version
    return types.ExecuteCommandParams(command="dgls.rewriteSelection", arguments=[argument])


async def test_cancelling_a_rewrite_command_reaches_the_engine(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(engine_socket)["requests_served"]
        blockers = await cancel_while_queued(client, engine_socket, types.WORKSPACE_EXECUTE_COMMAND,
                                             rewrite_params(1), "cancel-2")
        status = await wait_engine(engine_socket, idle)
        assert status["requests_served"] == served + blockers
        assert client.recorder.edits == []
        # the work-done progress began and ended
        kinds = [type(value).__name__ for reports in client.progress_reports.values() for value in reports]
        assert "WorkDoneProgressBegin" in kinds and "WorkDoneProgressEnd" in kinds


async def progress_token(client: Any, title: str) -> Any:
    """The token of the work-done progress titled `title`, once the client has read its begin (it can trail the
    engine's queueing of the fill: the client reads its pipe on its own schedule)."""
    for _ in range(500):
        tokens = [token for token, reports in client.progress_reports.items()
                  if any(getattr(value, "title", "") == title for value in reports)]
        if tokens:
            (token,) = tokens
            return token
        await asyncio.sleep(0.01)
    raise AssertionError(f"no work-done progress {title!r} began within 5 s")


async def test_cancelling_the_work_done_progress_cancels_the_rewrite(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(engine_socket)["requests_served"]
        async with BusyEngine(engine_socket) as busy:
            pending = await queued(busy, client.workspace_execute_command_async(rewrite_params(1)))
            token = await progress_token(client, "dgls: rewriting the selection")
            client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
            with pytest.raises(JsonRpcRequestCancelled):
                await asyncio.wait_for(pending, timeout=10)
            await wait_engine(engine_socket, lambda s: s["queued"] + int(s["running"]) <= busy.waiting())
        status = await wait_engine(engine_socket, idle)
        assert status["requests_served"] == served + busy.finished
        assert client.recorder.edits == []


async def test_an_edit_is_never_applied_to_changed_text(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        served = engine_status(engine_socket)["requests_served"]
        async with BusyEngine(engine_socket) as busy:
            pending = await queued(busy, client.workspace_execute_command_async(rewrite_params(1)))
            end = types.Position(1, 4)
            change_document(client, URI, 2, "pass", types.Range(end, end))  # the user types meanwhile
            await client.workspace_execute_command_async(types.ExecuteCommandParams(command="dgls.status"))
            assert busy.waiting()  # the server has the change (it answers in order) and the rewrite still waits
        result = await asyncio.wait_for(pending, timeout=60)
        assert result["applied"] is False and "changed" in result["reason"]
        assert client.recorder.edits == []
        status = await wait_engine(engine_socket, idle)
        assert status["requests_served"] == served + busy.finished + 1  # the engine did rewrite it
        # a selection made on an older version is refused at once
        stale = await client.workspace_execute_command_async(rewrite_params(1))
        assert stale["applied"] is False and "changed" in stale["reason"]


async def test_engine_killed_mid_request_answers_empty_restarts_and_recovers(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        pid = engine_status(engine_socket)["pid"]
        async with BusyEngine(engine_socket) as busy:
            pending = await queued(busy, inline_request(client))
            os.kill(pid, signal.SIGKILL)
            result = await asyncio.wait_for(pending, timeout=10)
            assert not result.items  # answered empty, at once
        restarting = await wait_for_status(client, lambda s: s["state"] == "restarting")
        await wait_for_status(client, lambda s: s["state"] == "ready", timeout=120, after=restarting)
        assert engine_status(engine_socket)["pid"] != pid
        told = [m.message for m in client.messages if "engine stopped" in m.message]
        assert len(told) == 1
        begun = [value.title for reports in client.progress_reports.values() for value in reports
                 if isinstance(value, types.WorkDoneProgressBegin)]
        assert "dgls: restarting the engine" in begun  # work-done progress while the new engine loads
        calls = (await server_status(client))["engineCalls"]
        again = await client.text_document_inline_completion_async(inline_params(URI, LINE, COLUMN, invoked=True))
        assert again is not None
        status = await wait_for_status(client, lambda s: s["engineCalls"] == calls + 1)
        assert status["state"] == "ready"
