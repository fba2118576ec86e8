"""Talking to the resident engine: a blocking client (CLI), an asyncio client (language server), and
`ensure_engine`, which starts the engine in the background when nothing answers on the socket.

No torch here. Errors arrive as `EngineError(code, message)` with the engine's own codes;
`EngineUnavailable` means nothing answers on the socket (or the connection dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.fill import FillRequest, FillResult
from engine.protocol import HEADER, PROTOCOL_VERSION, FrameReader, ProtocolError, encode_frame, prepare_socket_dir


class EngineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EngineUnavailable(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


def _result(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return dict(reply.get("result") or {})
    error = reply.get("error") or {}
    raise EngineError(str(error.get("code", "internal")), str(error.get("message", "")))


def _reply_id(body: bytes) -> tuple[int | None, dict[str, Any]]:
    import json

    reply = json.loads(body.decode("utf-8"))
    return reply.get("id"), reply


class EngineClient:
    """Blocking client: one request at a time over one connection."""

    def __init__(self, socket_path: Path, timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.ids = itertools.count(1)
        self.sock: socket.socket | None = None

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise EngineUnavailable(f"no engine answers on {self.socket_path} ({exc.strerror or exc})") from None
            self.sock = sock
        return self.sock

    def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        sock = self._connect()
        message_id = next(self.ids)
        try:
            sock.sendall(encode_frame({"v": PROTOCOL_VERSION, "id": message_id, "type": kind, **fields}))
            while True:
                (length,) = HEADER.unpack(self._read(sock, HEADER.size))
                reply_id, reply = _reply_id(self._read(sock, length))
                if reply_id in (message_id, None):
                    return _result(reply)
        except (OSError, ConnectionError) as exc:
            self.close()
            raise EngineUnavailable(f"lost the engine on {self.socket_path}: {exc}") from None

    @staticmethod
    def _read(sock: socket.socket, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            chunk = sock.recv(remaining)
            if not chunk:
                raise ConnectionError("engine closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def fill(self, request: FillRequest) -> FillResult:
        return FillResult.from_dict(self.request("fill", request=request.to_dict()))

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def shutdown(self) -> None:
        self.request("shutdown")


class AsyncEngineClient:
    """asyncio client: many requests in flight over one connection, replies matched by id."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.connection: _Replies | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.open

    async def connect(self) -> None:
        pending: dict[int, asyncio.Future[dict[str, Any]]] = {}  # this connection's own: losing it fails only them
        try:
            _, self.connection = await asyncio.get_running_loop().create_unix_connection(
                lambda: _Replies(pending), str(self.socket_path))
        except OSError as exc:
            raise EngineUnavailable(f"no engine answers on {self.socket_path} ({exc.strerror or exc})") from None
        self.pending = pending

    def submit(self, kind: str, **fields: Any) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Write a request on the open connection now, before returning; its reply arrives on the future."""
        connection = self.connection
        if connection is None or not connection.open:
            raise EngineUnavailable("not connected to the engine")
        message_id = next(self.ids)
        frame = encode_frame({"v": PROTOCOL_VERSION, "id": message_id, "type": kind, **fields})
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        connection.write(frame)
        return message_id, future

    async def send(self, kind: str, **fields: Any) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        if not self.connected:
            await self.connect()
        message_id, future = self.submit(kind, **fields)
        await self._drain(message_id, future)
        return message_id, future

    async def _drain(self, message_id: int, future: asyncio.Future[dict[str, Any]]) -> None:
        assert self.connection is not None
        try:
            await self.connection.drain()
        except (ConnectionError, OSError) as exc:
            self.pending.pop(message_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # the connection's loss failed it too: this error is the one reported
            else:
                future.cancel()
            raise EngineUnavailable(f"lost the engine: {exc}") from None

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        _, future = await self.send(kind, **fields)
        return _result(await future)

    async def fill(self, request: FillRequest) -> FillResult:
        """Fill; cancelling the awaiting task also cancels the fill inside the engine."""
        message_id, future = await self.send("fill", request=request.to_dict())
        return await self.fill_reply(message_id, future)

    async def fill_reply(self, message_id: int, future: asyncio.Future[dict[str, Any]]) -> FillResult:
        """The result of a fill already written (`submit`); cancelling the awaiting task cancels the fill inside
        the engine."""
        try:
            await self._drain(message_id, future)
            return FillResult.from_dict(_result(await future))
        except asyncio.CancelledError:
            self.cancel_soon(message_id, future)
            raise

    def cancel_soon(self, message_id: int, future: asyncio.Future[dict[str, Any]]) -> None:
        """Tell the engine to stop a request whose reply nobody waits for any more (written now; a request
        already answered is left alone). The reply's future may already be cancelled: cancelling the task that
        awaits it cancels it first."""
        if future.done() and not future.cancelled():
            return
        if self.pending.pop(message_id, None) is None:
            return  # told already, or the connection is gone
        future.cancel()
        with contextlib.suppress(EngineError):
            _, reply = self.submit("cancel", target=message_id)
            reply.add_done_callback(_ignore)  # nobody reads it, not even a lost connection's error

    async def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


class _Replies(asyncio.Protocol):
    """The client's end of one connection: each reply settles its request's future as soon as its frame is in
    (no reader task between the socket and the future). A frame that is not a reply, or the connection's end,
    fails every request still waiting with EngineUnavailable."""

    def __init__(self, pending: dict[int, asyncio.Future[dict[str, Any]]]) -> None:
        self.pending = pending
        self.frames = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.writable: asyncio.Future[None] | None = None  # while the transport asks us to stop writing
        self.lost: Exception | None = None

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.frames.feed(data):
                reply_id, reply = _reply_id(body)
                future = self.pending.pop(reply_id, None) if isinstance(reply_id, int) else None
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ProtocolError, ValueError, AttributeError):  # not a frame of JSON objects: no longer trusted
            self.close()

    def write(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)

    async def drain(self) -> None:
        if self.lost is not None:
            raise ConnectionResetError(str(self.lost))
        if self.writable is not None:
            await asyncio.shield(self.writable)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the engine closed the connection")
        self.transport = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ConnectionResetError(str(self.lost)))
            self.writable.exception()  # retrieved: drain raises its own error
        for future in self.pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable("the engine connection was lost"))
        self.pending.clear()


def engine_log_path(socket_path: Path) -> Path:
    return socket_path.with_suffix(".log")


def ensure_engine(
    socket_path: Path,
    serve_args: list[str],
    timeout: float = 300.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Return the status of the engine on `socket_path`, starting one in the background if none answers.

    `serve_args` are extra `dgls engine serve` arguments (--model, --device, ...). Waits until the model is
    loaded; raises EngineError with the engine's own message if it fails to start.
    """
    prepare_socket_dir(socket_path)
    with open(socket_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clients starting at once start one engine
        try:
            with EngineClient(socket_path, timeout=10.0) as client:
                client.status()
        except EngineUnavailable:
            pass  # nothing answers: start one below
        else:  # an engine answers, perhaps still loading its model: wait for it
            return wait_ready(socket_path, timeout=timeout, on_progress=on_progress)
        log_file = open(engine_log_path(socket_path), "ab")
        process = subprocess.Popen(
            # -P: the working directory (an editor's workspace) stays off sys.path, so a project of the user's
            # with its own `engine` or `dgls` package cannot shadow ours
            [sys.executable, "-P", "-m", "dgls", "engine", "serve", "--socket", str(socket_path), *serve_args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log_file.close()
        return wait_ready(socket_path, timeout=timeout, on_progress=on_progress, process=process)


def wait_ready(
    socket_path: Path,
    timeout: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Poll `status` until the model is ready; EngineUnavailable if nothing answers within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with EngineClient(socket_path, timeout=10.0) as client:
                status = client.status()
            if status.get("error"):
                with contextlib.suppress(EngineError):
                    EngineClient(socket_path, timeout=5.0).shutdown()
                raise EngineError("not_ready", f"the engine could not load its model: {status['error']}")
            if on_progress is not None:
                on_progress(status)
            if status.get("ready"):
                return status
        except EngineUnavailable:
            if process is not None and process.poll() is not None:
                tail = _log_tail(engine_log_path(socket_path))
                raise EngineError("not_ready", f"the engine exited with code {process.returncode}: {tail}") from None
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise EngineUnavailable(f"the engine on {socket_path} was not ready within {timeout:.0f} s")
        time.sleep(0.1)


def _log_tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
