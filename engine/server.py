"""The resident engine process: an asyncio server on a Unix socket in front of one `Engine`.

Startup order: refuse if another engine answers on the socket, listen (so `status` can report loading
progress), load the model in a thread, start the scheduler's worker. Each connection may have many requests
in flight; `cancel` names a fill by its message id. Every bad frame or failing request gets an error reply
and the engine keeps serving. Optional idle timeout: the process exits after that many seconds without a
request, which frees the model (clients start it again on demand).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoint import check_checkpoint_dir, default_model_dir
from engine.connection import Connection
from engine.engine import DEFAULT_CACHE_BYTES, Engine
from engine.fill import FillRequest, FillRequestError, FillResult
from engine.loading import load_checkpoint
from engine.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_body,
    encode_frame,
    error_reply,
    ok_reply,
    prepare_socket_dir,
)
from engine.scheduler import IDLE_WAKE_S, FillError, Job, Scheduler
from engine.templates import load_template

log = logging.getLogger("dgls.engine")


@dataclass(slots=True)
class ServeOptions:
    socket_path: Path
    model: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    template: str | None = None
    idle_timeout: float | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    quantize: str = "none"
    quantize_embeddings: bool = False
    expert_dequant: str = "layer"
    fast_step: str = "auto"
    lean_forward: str = "auto"

    def __post_init__(self) -> None:
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("--idle-timeout must be a positive number of seconds")


class EngineAlreadyRunning(Exception):
    pass


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class EngineServer:
    def __init__(self, options: ServeOptions, worker_host: Callable[[Callable[[], None]], None] | None = None
                 ) -> None:
        self.options = options
        self.worker_host = worker_host  # where the scheduler's worker loop runs (see `serve`)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.model_thread: str | None = None  # where the model was loaded (status: `model_thread`)
        self.stop_requested = False  # a stop signal arrived (see `serve`)
        self.model_dir = options.model or default_model_dir()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.load_progress = 0.0
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.stopping = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[Connection] = set()

    async def run(self) -> None:
        path = self.options.socket_path
        check_checkpoint_dir(self.model_dir)  # fail before listening: a bad --model is one clear message
        if self.options.template is not None:
            load_template(self.options.template)
        prepare_socket_dir(path)
        if path.exists():
            if socket_answers(path):
                raise EngineAlreadyRunning(f"an engine already answers on {path}; run 'dgls engine stop' first")
            path.unlink()
        self.server = await asyncio.get_running_loop().create_unix_server(lambda: Connection(self), path=str(path))
        os.chmod(path, 0o600)
        loop = self.loop = asyncio.get_running_loop()
        if self.stop_requested:  # a signal came before there was a loop to tell
            self.stopping.set()
        for sig in (signal.SIGTERM, signal.SIGINT):  # only possible on the main thread; else `serve` handles them
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)
        log.info("engine listening on %s (pid %d)", path, os.getpid())
        tasks = [asyncio.create_task(self._load()), asyncio.create_task(self._idle_watch())]
        try:
            await self.stopping.wait()
            if self.scheduler is not None:
                self.scheduler.stop()
                await asyncio.sleep(0)  # queued fills are answered `shutting_down` before their connections close
        finally:
            for task in tasks:
                task.cancel()
            if self.scheduler is not None:
                self.scheduler.stop()
            self.server.close()
            for connection in list(self.connections):  # clients see the engine go, not a silent socket
                connection.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.info("engine stopped")

    async def _load(self) -> None:
        def progress(fraction: float) -> None:
            self.load_progress = fraction

        try:
            options = self.options
            loaded = await self._on_model_thread(
                load_checkpoint, self.model_dir, options.device, options.dtype, progress, options.quantize,
                options.quantize_embeddings, options.expert_dequant,
            )
            self.engine = await self._on_model_thread(
                Engine, loaded, self.options.template, self.options.cache_bytes, fast_step=self.options.fast_step,
                lean_forward=self.options.lean_forward,
            )
            self.scheduler = Scheduler(self.engine.fill, host=self.worker_host)
            warm_up = self.scheduler.start(warm_up=self.engine.warm_up)  # on the thread that will run the fills
            log.info("warm-up fill: %.0f ms", await asyncio.wrap_future(warm_up))
        except Exception as exc:  # CheckpointError or anything else: reported through status and every fill
            self.load_error = str(exc) or type(exc).__name__  # never empty: clients test it for truth
            log.error("model failed to load: %s", exc)
            if self.scheduler is not None:
                self.scheduler.stop()
                self.scheduler = None
            self.ready.set()
            return
        self.last_activity = time.monotonic()  # the idle timeout counts from ready, not from the start of loading
        self.ready.set()
        log.info("model ready: %s", self.engine.describe())

    async def _on_model_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run torch work on the thread that will run the fills (`serve`: the main thread), else on a thread of
        its own: torch's CPU kernels slowed down by ~20% for good once another thread had run parallel work."""
        if self.worker_host is None:
            self.model_thread = "a worker thread"
            return await asyncio.to_thread(function, *args, **kwargs)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            self.model_thread = threading.current_thread().name
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

        self.worker_host(work)
        return await asyncio.wrap_future(future)

    async def _idle_watch(self) -> None:
        timeout = self.options.idle_timeout
        if timeout is None:
            return
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            if not self.ready.is_set():
                continue  # never exit while the model is still loading
            busy = self.scheduler is not None and self.scheduler.status()["running"]
            if not busy and time.monotonic() - self.last_activity > timeout:
                log.info("idle for %.0f s: exiting to free the model", timeout)
                self.stopping.set()
                return

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "ready": self.ready.is_set() and self.scheduler is not None,
            "loading": not self.ready.is_set(),
            "loading_progress": round(self.load_progress, 3),
            "error": self.load_error,
            "model": str(self.model_dir),
            "device": self.options.device,
            "pid": os.getpid(),
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "socket": str(self.options.socket_path),
            "model_thread": self.model_thread,
        }
        if self.engine is not None:
            status.update(self.engine.describe())
        if self.scheduler is not None:
            status.update(self.scheduler.status())
        return status

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop, unless it does not run yet or any more (then the engine is stopping)."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # closed
                self.loop.call_soon_threadsafe(callback)

    def cancel(self, job: Job) -> None:
        """Cancel a fill of a connection that closed."""
        if self.scheduler is not None:
            self.scheduler.cancel(job)

    def handle(self, body: bytes, connection: Connection) -> None:
        """Handle one frame as it arrives, on the event loop: status, cancel and shutdown are answered at once and
        a fill goes straight to the scheduler, whose worker replies through `connection` (no task per message:
        each task and each await of a future is another turn of the event loop between the socket and the model
        thread)."""
        message_id = None
        try:
            message = decode_body(body)
            message_id = message["id"]
            kind = message["type"]
            if kind == "status":
                connection.send(ok_reply(message_id, self.status()))
            elif kind == "shutdown":
                connection.send(ok_reply(message_id, {"stopping": True}))
                self.stopping.set()
            elif kind == "cancel":
                target = connection.jobs.get(message.get("target", -1))
                if target is not None and self.scheduler is not None:
                    self.scheduler.cancel(target)
                connection.send(ok_reply(message_id, {"cancelled": target is not None}))
            else:
                request = FillRequest.from_dict(message.get("request"))
                if self.ready.is_set():
                    self._submit(request, message_id, connection)
                else:
                    connection.later(self._submit_when_ready(request, message_id, connection))
        except ProtocolError as exc:
            connection.send(error_reply(message_id, exc.code, exc.message))
        except FillRequestError as exc:
            connection.send(error_reply(message_id, "bad_request", str(exc)))
        except Exception as exc:  # never let one message take the connection or the engine down
            log.exception("message failed")
            connection.send(error_reply(message_id, "internal", f"{type(exc).__name__}: {exc}"))

    async def _submit_when_ready(self, request: FillRequest, message_id: int, connection: Connection) -> None:
        await self.ready.wait()
        self._submit(request, message_id, connection)

    def _submit(self, request: FillRequest, message_id: int, connection: Connection) -> None:
        if self.scheduler is None:
            connection.send(error_reply(message_id, "not_ready", f"the model failed to load: {self.load_error}"))
            return
        self.last_activity = time.monotonic()

        def done(result: FillResult | None, error: FillError | None) -> None:
            """On the worker thread as its fill ends (or on the event loop for a fill that never ran): the reply
            goes to the socket from here, waking no other thread of the engine."""
            try:
                reply = ok_reply(message_id, result.to_dict()) if error is None else error_reply(  # type: ignore[union-attr]
                    message_id, error.code, error.message)
                frame = encode_frame(reply)
            except Exception as exc:  # an unencodable result fails this request, not the connection
                log.exception("reply failed")
                frame = encode_frame(error_reply(message_id, "internal", f"{type(exc).__name__}: {exc}"))
            connection.send_frame(frame, ends=message_id)
            self.last_activity = time.monotonic()

        with connection.lock:
            connection.jobs[message_id] = None  # a placeholder: `done` runs inside `submit` if the scheduler stopped
        job = self.scheduler.submit(request, on_done=done)
        with connection.lock:
            if message_id in connection.jobs:
                connection.jobs[message_id] = job


def serve(options: ServeOptions) -> None:
    """Run the engine in the foreground until shutdown, a signal or the idle timeout.

    All torch work (loading, warm-up, fills) runs on this, the main, thread and the socket's event loop on
    another: torch's CPU kernels ran ~1.5 times slower when their parallel regions started from another thread
    than the main one, and ~1.2 times slower on the main thread once another thread had run any (libgomp; see
    `engine.scheduler`). The main thread runs the work the event loop hands it (the load, then the scheduler's
    worker loop until the scheduler stops), then waits for the event loop to finish and re-raises its error."""
    handoff: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
    server = EngineServer(options, worker_host=handoff.put)
    failure: list[BaseException] = []

    def event_loop() -> None:
        try:
            asyncio.run(server.run())
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)
        finally:
            handoff.put(None)

    def stop(signum: int, frame: Any) -> None:
        server.stop_requested = True  # seen by `run` if its loop does not exist yet
        server.call_soon_threadsafe(server.stopping.set)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=event_loop, name="dgls-engine-io", daemon=True)
    thread.start()
    try:
        while (work := _get_awake(handoff)) is not None:
            work()  # the scheduler's worker loop: returns once the scheduler stops
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]


def _get_awake(handoff: queue.SimpleQueue[Callable[[], None] | None]) -> Callable[[], None] | None:
    """`handoff.get()`, waking up every IDLE_WAKE_S: see `engine.scheduler.IDLE_WAKE_S`."""
    while True:
        try:
            return handoff.get(timeout=IDLE_WAKE_S)
        except queue.Empty:
            continue
