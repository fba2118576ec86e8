"""The dgls language server: pygls wiring only. Handlers live in `inline` and `selection`; state in `session`.

`run_lsp` serves stdio (or TCP). Two protocol changes over pygls' defaults: `workspace/executeCommand` is an
async handler so `$/cancelRequest` reaches a running fill or rewrite, and every request that arrives after
`shutdown` is answered with an InvalidRequest error instead of being dropped (a client would wait forever).
Never imports torch: the model lives in the engine process.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.io_ import run_async
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import JsonRPCProtocol, RPCRequest
from pygls.protocol.language_server import lsp_method

from dgls import __version__, document, inline, selection
from dgls.session import Session, current_command
from engine.protocol import default_socket_path

log = logging.getLogger("dgls.server")
DID_SHOW = "dgls/didShowCompletion"
DID_PARTIALLY_ACCEPT = "dgls/didPartiallyAcceptCompletion"
COMPLETION_METHODS = (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.TEXT_DOCUMENT_COMPLETION)


class DglsProtocol(LanguageServerProtocol):
    def handle_message(self, message: Any) -> None:
        method = getattr(message, "method", None)
        if self._shutdown and method is not None and method != types.EXIT and isinstance(message, RPCRequest):
            error = JsonRpcInvalidRequest(f"the server is shutting down; {method} was not run")
            self._send_response(message.id, None, error.to_response_error())
            return
        if method not in COMPLETION_METHODS:
            self._dispatch(message, method)
            return
        # the handler's task copies this context: it can tell that the document changed before it ran
        token = inline.dispatched_version.set(self._version_of(message))
        try:
            self._dispatch(message, method)
        finally:
            inline.dispatched_version.reset(token)

    def _dispatch(self, message: Any, method: str | None) -> None:
        """pygls' dispatch of a request or notification without its `isinstance` tests against runtime-checkable
        protocols (~20 us each, two for every notification; more on a language server woken cold between
        keystrokes); responses, errors and anything unusual go through pygls' own."""
        if (method is None or self._shutdown or getattr(message, "jsonrpc", None) != JsonRPCProtocol.VERSION
                or not hasattr(message, "params")):
            super().handle_message(message)
        elif hasattr(message, "id"):
            contextvars.copy_context().run(self._handle_request, message.id, method, message.params)
        else:
            contextvars.copy_context().run(self._handle_notification, method, message.params)

    def _version_of(self, message: Any) -> int | None:
        uri = getattr(getattr(getattr(message, "params", None), "text_document", None), "uri", None)
        document = self.workspace.text_documents.get(unquote(uri)) if isinstance(uri, str) else None
        return None if document is None else document.version

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Any:
        """pygls' own didChange, with edits applied by `dgls.document.apply_change` (LSP's line breaks, one
        splice): pygls' breaks lines where Python does and copies the document line by line."""
        opened = self.workspace.text_documents.get(unquote(params.text_document.uri))
        if opened is None:  # never opened: pygls' own handling raises and reports it
            yield from super().lsp_text_document__did_change(params)
            return
        for change in params.content_changes:
            document.apply_change(opened, change)
        opened.version = params.text_document.version
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    async def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams) -> Any:  # type: ignore[override]
        handler = self.fm.commands.get(params.command)
        if handler is None:
            raise JsonRpcInvalidParams(f"unknown command {params.command!r}")
        current_command.set(params)
        result = handler(*(params.arguments or []))
        return await result if inspect.isawaitable(result) else result


class DglsServer(LanguageServer):
    session: Session

    def report_server_error(self, error: Exception, source: Any) -> None:
        """Malformed messages (e.g. invalid UTF-8) are logged, not shown: the server keeps serving."""
        log.error("%s: %s", getattr(source, "__name__", source), error)
        self.window_log_message(types.LogMessageParams(type=types.MessageType.Error, message=f"[dgls] {error}"))


def create_server(socket_path: Path | None = None) -> DglsServer:
    server = DglsServer("dgls", __version__, protocol_cls=DglsProtocol)
    session = Session(server, socket_path or default_socket_path())
    server.session = session

    @server.feature(types.INITIALIZE)
    def initialize(params: types.InitializeParams) -> None:
        session.apply_options(params.initialization_options)

    @server.feature(types.INITIALIZED)
    def initialized(params: types.InitializedParams) -> None:
        session.link.start()
        session.publish_status()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(params: types.DidChangeConfigurationParams) -> None:
        session.apply_options(params.settings)
        session.link.start()

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(params: types.DidChangeTextDocumentParams) -> None:
        inline.did_change(session, params)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(params: types.DidCloseTextDocumentParams) -> None:
        session.forget(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
        return await inline.inline_completion(session, params)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))
    async def completion(params: types.CompletionParams) -> types.CompletionList | None:
        return await inline.completion(session, params)

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite], resolve_provider=False),
    )
    def code_action(params: types.CodeActionParams) -> list[types.CodeAction]:
        return selection.code_actions(session, params)

    @server.command(selection.FILL_COMMAND)
    async def fill_selection(*arguments: Any) -> dict[str, Any]:
        return await selection.run(session, arguments, rewrite=False)

    @server.command(selection.REWRITE_COMMAND)
    async def rewrite_selection(*arguments: Any) -> dict[str, Any]:
        return await selection.run(session, arguments, rewrite=True)

    @server.command(inline.ACCEPT_COMMAND)
    def accept_completion(*arguments: Any) -> None:
        inline.accepted(session, arguments[0] if arguments else None)

    @server.command("dgls.status")
    def status(*arguments: Any) -> dict[str, Any]:
        return session.status()

    @server.feature(DID_SHOW)
    def did_show(params: Any) -> None:
        inline.did_show(session, params)

    @server.feature(DID_PARTIALLY_ACCEPT)
    def did_partially_accept(params: Any) -> None:
        inline.did_partially_accept(session, params)

    @server.feature(types.SHUTDOWN)
    async def shutdown(params: Any) -> None:
        await session.shutdown()

    return server


def run_lsp(tcp: str | None, socket_path: Path) -> int:
    """Serve LSP on stdio, or on TCP `HOST:PORT`; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="dgls %(levelname)s %(message)s")
    server = create_server(socket_path)
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not port.isdigit():
            print(f"dgls: --tcp wants HOST:PORT, got {tcp!r}", file=sys.stderr)
            return 2
        server.start_tcp(host or "127.0.0.1", int(port))
        return 0
    return serve_stdio(server)


def serve_stdio(server: LanguageServer) -> int:
    """Serve LSP on stdin/stdout with pygls' message loop, reading stdin through the event loop.

    pygls' own `start_io` reads every header line and body on a worker thread (`run_in_executor` per read): 3-4
    thread round trips per message, ~1 ms of a keystroke's latency on a loaded 2-core machine. An asyncio pipe
    reader hands the loop whole messages as they arrive. Where stdin is not a pipe or socket of its own (a
    file, a terminal, /dev/null, one socket for both directions), pygls' `start_io` serves as before. Returns
    the exit status LSP asks for: 0 after a `shutdown` request, else 1 (an `exit` without one, or the editor
    gone); pygls' `start_io` returns nothing."""
    if not _readable_by_event_loop(sys.stdin):
        server.start_io()
        return 0 if server.protocol._shutdown else 1
    server._stop_event = threading.Event()  # what pygls' `shutdown` sets to end the loop
    server.protocol.set_writer(_Stdout(sys.stdout.buffer))

    async def serve() -> None:
        stream = asyncio.StreamReader(limit=2**30)
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream),
                                                           sys.stdin.buffer)
        stop = server._stop_event
        assert stop is not None
        await run_async(stop_event=stop, reader=_EndOfInputAsEmpty(stream), protocol=server.protocol,
                        logger=log, error_handler=server.report_server_error)

    try:
        asyncio.run(serve())
    except BrokenPipeError:
        log.error("the connection to the editor is lost; stopping")
    except (KeyboardInterrupt, SystemExit):  # SystemExit: the `exit` notification
        pass
    finally:
        server.shutdown()
    return 0 if server.protocol._shutdown else 1


def _readable_by_event_loop(stream: Any) -> bool:
    """A pipe or socket of its own: the event loop makes it non-blocking, which must not reach stdout (one
    socket or terminal for both) or a device epoll cannot watch (/dev/null)."""
    try:
        stdin, stdout = os.fstat(stream.fileno()), os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    own = (stdin.st_dev, stdin.st_ino) != (stdout.st_dev, stdout.st_ino)
    return own and (stat.S_ISFIFO(stdin.st_mode) or stat.S_ISSOCK(stdin.st_mode))


class _Stdout:
    """pygls' writer on stdout that drops what is sent after `exit` closed it (answers to requests still running
    then): the editor asked to end the session and reads nothing more."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.stream.write(data)
        self.stream.flush()

    def close(self) -> None:
        self.closed = True
        self.stream.close()


class _EndOfInputAsEmpty:
    """pygls' loop reads b"" at the end of input; an asyncio stream raises there instead."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream

    async def readline(self) -> bytes:
        return await self.stream.readline()

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self.stream.readexactly(n)
        except asyncio.IncompleteReadError:
            return b""
