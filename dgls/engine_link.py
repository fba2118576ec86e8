"""The language server's one link to the resident engine: connect or start it, notice when it dies, restart it
with backoff, and report every change of state.

States: `stopped` (nothing tried yet), `starting` (connecting, or loading the model: `progress` reports 0..1),
`ready`, `restarting` (the engine was lost; a new one is being started), `failed` (it could not be started;
retried with backoff, then on the next request). The blocking `ensure_engine` runs in a daemon thread so a
loading model never blocks the event loop nor the server's exit. Knows nothing about LSP: it reports through
the `LinkEvents` callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.client import AsyncEngineClient, EngineError, EngineUnavailable, ensure_engine, wait_ready
from engine.fill import FillRequest, FillResult

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
ATTEMPTS_PER_OUTAGE = 5


@dataclass(slots=True)
class LinkEvents:
    state: Callable[[str, str], None] = lambda state, message: None  # new state, why
    progress: Callable[[float], None] = lambda fraction: None  # model loading 0..1
    lost: Callable[[str], None] = lambda message: None  # the engine went away (tell the user once)


@dataclass(slots=True)
class LinkSettings:
    socket_path: Path
    serve_args: list[str] = field(default_factory=list)
    start: bool = True
    load_timeout: float = 300.0
    idle_timeout: float | None = None


class EngineLink:
    def __init__(self, settings: LinkSettings, events: LinkEvents) -> None:
        self.settings = settings
        self.events = events
        self.state = "stopped"
        self.message = ""  # why the link is in its state
        self.client: AsyncEngineClient | None = None
        self.engine_status: dict[str, Any] = {}
        self.ready = asyncio.Event()
        self.connecting: asyncio.Task[None] | None = None
        self.retry_at = 0.0
        self.last_error = ""
        self.last_latency_ms: float | None = None
        self.calls = 0
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def configure(self, settings: LinkSettings) -> None:
        """New settings; a changed socket or model drops the current connection (the next request reconnects)."""
        if settings == self.settings:
            return
        self.settings = settings
        self._drop()
        self._set_state("stopped", "settings changed")
        self.retry_at = 0.0

    def start(self) -> None:
        """Connect (starting the engine if allowed) in the background, unless already ready or trying."""
        if self.closed or self.ready.is_set() or (self.connecting is not None and not self.connecting.done()):
            return
        if time.monotonic() < self.retry_at:
            return
        self.connecting = asyncio.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        restarting = self.state in ("restarting", "failed")
        for attempt in range(ATTEMPTS_PER_OUTAGE):
            self._set_state("restarting" if restarting else "starting", "connecting to the engine")
            try:
                status = await _in_thread(self._ensure, self._threadsafe(self.events.progress))
                client = AsyncEngineClient(self.settings.socket_path)
                await client.connect()
            except (EngineError, OSError, RuntimeError) as exc:
                self.last_error = exc.message if isinstance(exc, EngineError) else str(exc)
                self._set_state("failed", self.last_error)
                delay = min(BACKOFF_FIRST_S * 2**attempt, BACKOFF_MAX_S)
                self.retry_at = time.monotonic() + delay
                await asyncio.sleep(delay)
                restarting = True
                continue
            self.client, self.engine_status = client, status
            self.last_error = ""
            self.ready.set()
            self._set_state("ready", f"serving {status.get('model')} on {status.get('device')}")
            return

    def _ensure(self, loop_progress: Callable[[float], None]) -> dict[str, Any]:
        """Runs in a thread: connect to the engine or start one, and wait for its model."""
        settings = self.settings

        def progress(status: dict[str, Any]) -> None:
            if status.get("loading") or not status.get("ready"):
                loop_progress(float(status.get("loading_progress") or 0.0))

        if settings.start:
            return ensure_engine(settings.socket_path, settings.serve_args, settings.load_timeout, progress)
        return wait_ready(settings.socket_path, settings.load_timeout, progress)

    def _threadsafe(self, callback: Callable[..., None]) -> Callable[..., None]:
        loop = asyncio.get_running_loop()

        def call(*args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the model loaded
                loop.call_soon_threadsafe(callback, *args)

        return call

    def _set_state(self, state: str, message: str) -> None:
        changed = state != self.state
        self.state, self.message = state, message
        if changed or state == "failed":
            self.events.state(state, message)

    def _drop(self) -> None:
        self.ready.clear()
        if self.client is not None:
            client, self.client = self.client, None
            asyncio.ensure_future(client.close())

    def lost(self, message: str) -> None:
        """The engine went away: answer empty meanwhile, restart it in the background, tell the user once."""
        if self.closed:
            return
        if self.ready.is_set():
            self._drop()
            self.events.lost(message)
            self._set_state("restarting", message)
            self.retry_at = 0.0
        self.start()

    async def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        self._drop()

    # -- requests ----------------------------------------------------------------------------------------------

    def fill(self, request: FillRequest, wait_s: float) -> asyncio.Task[FillResult]:
        """One fill, as a task to await; cancelling it cancels the fill inside the engine. With the engine
        ready, the request is written to it before this returns (the fill starts now, not when a task first
        runs: on a keystroke's `didChange` that is only after the messages read with it). While the engine first
        starts, the task waits up to `wait_s` for it; while it restarts or cannot be started, it fails at once.
        The task raises EngineError with the engine's code (`unavailable`: no engine)."""
        client = self.client
        if self.ready.is_set() and client is not None and client.connected:
            with contextlib.suppress(EngineUnavailable):  # gone meanwhile: the slow path notices and reports
                message_id, future = client.submit("fill", request=request.to_dict())
                task = asyncio.ensure_future(self._reply(client, message_id, future))
                task.add_done_callback(lambda done: _cancelled(done, client, message_id, future))
                return task
        return asyncio.ensure_future(self._fill(request, wait_s))

    async def _fill(self, request: FillRequest, wait_s: float) -> FillResult:
        if not self.ready.is_set():
            self.start()
            if self.state in ("restarting", "failed"):  # answer now; the restart goes on in the background
                raise EngineError("unavailable", f"the engine is {self.state}: {self.last_error or 'restarting'}")
            try:
                await asyncio.wait_for(self.ready.wait(), timeout=max(wait_s, 0.001))
            except TimeoutError:
                raise EngineError("not_ready", f"the engine is {self.state}") from None
        client = self.client
        if client is None:
            raise EngineError("not_ready", f"the engine is {self.state}")
        if not client.connected and self.settings.idle_timeout:
            # It exited while idle, as asked: start it again quietly (nothing in flight was lost).
            self._drop()
            self._set_state("stopped", "the engine exited after its idle timeout")
            self.start()
            raise EngineError("unavailable", "the engine exited after its idle timeout; starting it again")
        return await self._settle(client.fill(request))

    async def _reply(self, client: AsyncEngineClient, message_id: int, future: asyncio.Future[dict[str, Any]]
                     ) -> FillResult:
        return await self._settle(client.fill_reply(message_id, future))

    async def _settle(self, reply: Coroutine[Any, Any, FillResult]) -> FillResult:
        try:
            result = await reply
        except EngineUnavailable as exc:
            self.lost(exc.message)
            raise
        except EngineError as exc:
            if exc.code == "shutting_down":
                self.lost(exc.message)
            raise
        self.calls += 1
        self.last_latency_ms = result.timings.get("total_ms")
        return result


def _cancelled(task: asyncio.Task[FillResult], client: AsyncEngineClient, message_id: int,
               future: asyncio.Future[dict[str, Any]]) -> None:
    """A fill task cancelled before its first step never waited for the reply: stop the fill anyway."""
    if task.cancelled():
        client.cancel_soon(message_id, future)


async def _in_thread(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a blocking call in a daemon thread (unlike `asyncio.to_thread`, exit never waits for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, Any]] = loop.create_future()

    def settle(result: dict[str, Any] | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or {})

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="dgls-engine-start", daemon=True).start()
    return await future
