"""The server's mutable state, owned in one place: options, the engine link, the completion cache, counters, the
latest fill per document, and what the user has already been told.

Handlers take immutable `DocumentSnapshot`s and call `Session.fill`, which makes the newest request for a
document win (the older one is cancelled in the engine, not only here) and turns every engine error into an
empty answer plus a log line. Status goes out as `window/logMessage`, `window/showMessage` (once per kind of
trouble) and the `dgls/status` notification.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from pathlib import Path
from typing import Any

from lsprotocol import types

from dgls.completion_cache import CompletionCache
from dgls.engine_link import EngineLink, LinkEvents, LinkSettings
from dgls.options import Options, invalid_message, options_to_wire, parse_options
from engine.client import EngineError
from engine.fill import FillRequest, FillResult
from engine.protocol import ERROR_CODES

log = logging.getLogger("dgls.server")
STATUS_METHOD = "dgls/status"
# A status due after an answer goes out this long after it: a client reads on from the answer to the messages
# behind it before its waiting code runs (pygls: ~0.8 ms of a 2-core machine for a status right behind the answer).
STATUS_AFTER_ANSWER_S = 0.02
QUIET_CODES = ("superseded", "cancelled")  # the normal fate of a stale request: not worth a log line
# The `workspace/executeCommand` params of the command running in this task (for its work-done token).
current_command: contextvars.ContextVar[types.ExecuteCommandParams | None] = contextvars.ContextVar(
    "current_command", default=None
)


class Session:
    def __init__(self, server: Any, default_socket: Path) -> None:
        self.server = server
        self.default_socket = default_socket
        self.options = Options()
        self.cache = CompletionCache()
        self.stats = {"engineCalls": 0, "cacheHits": 0, "shown": 0, "accepted": 0, "partiallyAccepted": 0,
                      "acceptedChars": 0, "emptyAnswers": 0, "prefetches": 0, "prefetchesUsed": 0}
        self.latest: dict[str, asyncio.Task[FillResult]] = {}
        self.prefetches: dict[str, Any] = {}  # document -> its keystroke's prefetched suggestion (`dgls.inline`)
        self.prefetch_armed: dict[str, float] = {}  # document -> until when its keystrokes prefetch
        # {document, version, engineMs, roundTripMs} of the newest fill the engine finished (engineMs: the
        # engine's own time; roundTripMs: from sending the request to the engine to having its answer)
        self.last_fill: dict[str, Any] = {}
        self.status_due: asyncio.TimerHandle | None = None  # a status to publish shortly after an answer
        self.told: set[str] = set()
        self.progress_token: str | None = None
        self.progress_ids = itertools.count(1)
        self.shutting_down = False
        self.link = EngineLink(self._link_settings(), LinkEvents(self._on_state, self._on_progress, self._on_lost))

    # -- options -----------------------------------------------------------------------------------------------

    def apply_options(self, raw: Any) -> None:
        options, invalid = parse_options(raw)
        self.options = options
        self.cache = CompletionCache()  # suggestions made under other options (model, seed) are stale
        if invalid:
            self.show(invalid_message(invalid), types.MessageType.Warning)
        self.link.configure(self._link_settings())
        self.log(f"options: {options_to_wire(options)}", types.MessageType.Log)

    def _link_settings(self) -> LinkSettings:
        engine = self.options.engine
        args = ["--device", engine.device, "--dtype", engine.dtype]
        if engine.model:
            args += ["--model", str(Path(engine.model).expanduser().resolve())]
        if engine.idle_timeout:
            args += ["--idle-timeout", str(engine.idle_timeout)]
        socket_path = Path(engine.socket).expanduser() if engine.socket else self.default_socket
        return LinkSettings(socket_path, args, engine.start, engine.load_timeout, engine.idle_timeout)

    # -- talking to the user -----------------------------------------------------------------------------------

    def log(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        log.info(message)
        if not self.shutting_down:
            self.server.window_log_message(types.LogMessageParams(type=kind, message=message))

    def show(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        self.log(message, kind)
        if not self.shutting_down:
            self.server.window_show_message(types.ShowMessageParams(type=kind, message=message))

    def show_once(self, key: str, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        if key in self.told:
            self.log(message, kind)
        else:
            self.told.add(key)
            self.show(message, kind)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.link.state,
            "model": self.link.engine_status.get("model") or self.options.engine.model,
            "device": self.link.engine_status.get("device"),
            "socket": str(self.link.settings.socket_path),
            "lastLatencyMs": self.link.last_latency_ms,
            "lastFill": self.last_fill,
            "message": self.link.message,
            "debounceMs": self.options.completion.debounce_ms,
            **self.stats,
        }

    def publish_status(self) -> None:
        if not self.shutting_down:
            self.server.protocol.notify(STATUS_METHOD, self.status())

    def publish_status_after_answer(self) -> None:
        """Publish the status STATUS_AFTER_ANSWER_S after the answer the caller is about to send, not right behind
        it: serialising, sending and parsing the status then stay off the answer's path in the server *and* in
        the client (which reads the messages behind an answer before handing the answer over). Answers within
        that time share one status."""
        if self.status_due is None and not self.shutting_down:
            self.status_due = asyncio.get_running_loop().call_later(STATUS_AFTER_ANSWER_S, self._publish_due)

    def _publish_due(self) -> None:
        self.status_due = None
        self.publish_status()

    def _on_state(self, state: str, message: str) -> None:
        kind = types.MessageType.Error if state == "failed" else types.MessageType.Info
        self.log(f"engine {state}: {message}", kind)
        if state in ("starting", "restarting"):
            self._begin_progress(state)
        if state == "failed":
            self._end_progress("the engine could not start")
            self.show_once("engine-failed", f"[dgls] the engine could not start: {message}", types.MessageType.Error)
        if state == "ready":
            self.told.discard("engine-lost")
            self.told.discard("engine-failed")
            self._end_progress("model ready")
            self._check_model()
        self.publish_status()

    def _check_model(self) -> None:
        """An engine already running on the socket may serve another model than the options name: say so."""
        wanted, served = self.options.engine.model, self.link.engine_status.get("model")
        if wanted and served and Path(wanted).expanduser().resolve() != Path(served).resolve():
            self.show_once("model-mismatch", f"[dgls] the engine on {self.link.settings.socket_path} serves {served}, "
                           f"not {wanted}; run 'dgls engine stop' or set engine.socket to another path")

    def _on_lost(self, message: str) -> None:
        self.show_once("engine-lost", f"[dgls] the engine stopped ({message}); restarting it")

    def _begin_progress(self, state: str) -> None:
        """Work-done progress from the engine's start to its model being loaded (the client shows a spinner)."""
        if self.shutting_down or self.progress_token is not None or not self._client_has_progress():
            return
        self.progress_token = f"dgls-engine-{next(self.progress_ids)}"
        progress = self.server.work_done_progress
        progress.create(self.progress_token)
        title = "dgls: restarting the engine" if state == "restarting" else "dgls: starting the engine"
        progress.begin(self.progress_token, types.WorkDoneProgressBegin(title=title, percentage=0, cancellable=False))

    def _on_progress(self, fraction: float) -> None:
        if self.progress_token is not None and not self.shutting_down:
            self.server.work_done_progress.report(self.progress_token, types.WorkDoneProgressReport(
                message="loading the model", percentage=int(fraction * 100)))

    def _end_progress(self, message: str) -> None:
        if self.progress_token is not None:
            if not self.shutting_down:
                self.server.work_done_progress.end(self.progress_token, types.WorkDoneProgressEnd(message=message))
            self.progress_token = None

    def _client_has_progress(self) -> bool:
        window = getattr(self.server.client_capabilities, "window", None)
        return bool(window is not None and window.work_done_progress)

    # -- fills -------------------------------------------------------------------------------------------------

    async def fill(self, key: str, request: FillRequest) -> FillResult | None:
        """Fill, or None when the request was superseded, failed or the engine is away (already logged).

        The newest request per `key` wins: an older fill still running is cancelled (the engine hears `cancel`).
        Cancelling the calling task (`$/cancelRequest`) cancels the fill too and propagates.
        """
        return await self.start_fill(key, request)

    def start_fill(self, key: str, request: FillRequest) -> asyncio.Future[FillResult | None]:
        """`fill`, begun before this returns: the older fill for `key` cancelled and, with the engine ready, the
        request written to it. The task returned waits for the result; cancelling it cancels the fill."""
        if self.shutting_down:
            nothing: asyncio.Future[FillResult | None] = asyncio.get_running_loop().create_future()
            nothing.set_result(None)
            return nothing
        previous = self.latest.get(key)
        if previous is not None and not previous.done():
            previous.cancel()
        sent = time.monotonic()
        task = self.link.fill(request, request.deadline_ms / 1000.0)  # written to the engine now when it is ready
        self.latest[key] = task
        return asyncio.ensure_future(self._result(key, request, task, sent))

    async def _result(self, key: str, request: FillRequest, task: asyncio.Task[FillResult], sent: float
                      ) -> FillResult | None:
        try:
            result = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own caller was cancelled
            return None  # superseded by a newer request for this document
        except EngineError as exc:
            self._engine_error(exc)
            return None
        finally:
            if self.latest.get(key) is task:
                del self.latest[key]
        self.stats["engineCalls"] += 1
        self.last_fill = {"document": key, "version": request.version, "engineMs": result.timings.get("total_ms"),
                          "roundTripMs": round((time.monotonic() - sent) * 1000, 2)}
        return result

    def _engine_error(self, exc: EngineError) -> None:
        meaning = ERROR_CODES.get(exc.code, "the engine connection failed" if exc.code == "unavailable" else "")
        if exc.code in QUIET_CODES:
            return
        kind = types.MessageType.Error if exc.code in ("bad_request", "internal") else types.MessageType.Warning
        self.log(f"engine {exc.code}: {exc.message} ({meaning})", kind)
        if exc.code == "out_of_memory":
            self.show_once("oom", "[dgls] the model ran out of memory on a request; try smaller context sizes")

    def forget(self, uri: str) -> None:
        """A closed document: drop its suggestions and stop its fills."""
        self.cache.forget(uri)
        prefetch = self.prefetches.pop(uri, None)
        if prefetch is not None:
            prefetch.cancel()
        self.prefetch_armed.pop(uri, None)
        for key in (uri, f"{uri}#completion", f"{uri}#selection"):
            task = self.latest.get(key)
            if task is not None:
                task.cancel()

    async def shutdown(self) -> None:
        self.shutting_down = True
        if self.status_due is not None:
            self.status_due.cancel()
        for prefetch in self.prefetches.values():
            prefetch.cancel()
        for task in list(self.latest.values()):
            task.cancel()
        await self.link.close()
