"""One client's connection to the engine server, as an asyncio protocol.

Frames are cut from the byte stream as they arrive and handed to the server at once (no task per message).
Replies go out in the order they are ready, not the order of the requests (each carries its request's id). A
fill's reply is written by the scheduler's worker thread itself, the moment the fill ends, straight to the
socket: the event loop's thread is not woken in between. Only when the transport still holds unsent bytes, or
the socket takes part of the frame, does the rest go through the event loop, after what is queued there.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from engine.protocol import FrameReader, ProtocolError, encode_frame, error_reply
from engine.scheduler import Job


class Host(Protocol):
    """What a connection needs from the server."""

    connections: set[Connection]

    def handle(self, body: bytes, connection: Connection) -> None: ...

    def cancel(self, job: Job) -> None: ...

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None: ...


class Connection(asyncio.Protocol):
    """Every write and every change of `jobs` holds `lock`, on either thread. The transport's own write buffer is
    never read from the worker: `buffered`, set when the transport asks us to pause writing (its buffer is not
    empty: the write buffer limits are 0) and cleared when it asks us to resume (the buffer drained), says whether
    a direct write would overtake queued bytes. `connection_lost` takes the lock before the transport closes the
    socket, so a worker never writes to a closed (or reused) descriptor."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.frames = FrameReader()
        self.jobs: dict[int, Job | None] = {}  # fills in the scheduler, by message id (`cancel` names them)
        self.tasks: set[asyncio.Task[None]] = set()  # fills waiting for the model to load
        self.transport: asyncio.Transport | None = None
        self.lock = threading.RLock()  # re-entered by pause_writing, which the transport calls inside a write
        self.buffered = False
        self.held = b""  # the rest of a frame the worker could only partly write; goes out before anything else
        self.loop_thread = threading.get_ident()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=0, low=0)  # pause_writing as soon as anything waits in it
        self.transport = transport
        self.host.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.frames.feed(data):
                if self.transport is None:
                    return
                self.host.handle(body, self)
        except ProtocolError as exc:
            self.send(error_reply(None, exc.code, exc.message))
            self.close()

    def send(self, message: dict[str, Any]) -> None:
        """Write a reply from the event loop."""
        self.send_frame(encode_frame(message))

    def send_frame(self, frame: bytes, ends: int | None = None) -> None:
        """Write an encoded reply, from any thread; it `ends` the fill with that message id."""
        with self.lock:
            if ends is not None:
                self.jobs.pop(ends, None)
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if threading.get_ident() == self.loop_thread:
                self._write_held()
                transport.write(frame)
                return
            if not self.held and not self.buffered:
                try:
                    sent = os.write(transport.get_extra_info("socket").fileno(), frame)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:  # the client is gone: the event loop notices and cleans up
                    return
                frame = frame[sent:]
                if not frame:
                    return
            self.held += frame
        self.host.call_soon_threadsafe(self._flush_held)

    def pause_writing(self) -> None:
        with self.lock:
            self.buffered = True

    def resume_writing(self) -> None:
        with self.lock:
            self.buffered = False

    def _flush_held(self) -> None:
        with self.lock:
            if self.transport is not None and not self.transport.is_closing():
                self._write_held()

    def _write_held(self) -> None:
        if self.held and self.transport is not None:
            held, self.held = self.held, b""
            self.transport.write(held)

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task this connection cancels when it closes."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        with self.lock:
            self._write_held()
            if self.transport is not None:
                self.transport.close()  # writes what is buffered first

    def connection_lost(self, exc: Exception | None) -> None:
        with self.lock:
            self.transport = None
            jobs, self.jobs = list(self.jobs.values()), {}
        self.host.connections.discard(self)
        for task in self.tasks:
            task.cancel()
        for job in jobs:
            if job is not None:
                self.host.cancel(job)
