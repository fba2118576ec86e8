"""One worker thread owns the model; requests wait in a priority queue and newer ones supersede older ones.

Interactive fills run before rewrites; within a priority, first come first served. A fill for a document
supersedes every queued or running fill of the same document with an older or equal version (editors such as
Neovim never cancel automatic requests): queued ones are answered `superseded` at once, a running one stops
before its next layer (its next denoising step with transformers' forward). Results are handed back to the
asyncio loop that submitted them.

All model work happens on the worker thread, the warm-up fill included: on a CPU, torch's OpenMP thread team
belongs to the thread that first runs parallel work, and fills on another thread than the warm-up's ran
about 1.7 times slower (measured on the shipped model, 2 cores). The worker is best the process's main thread:
torch's parallel regions started from any other thread were 1.4-1.7 times slower again (libgomp; fills of the
shipped model 26 ms on the main thread, 36-45 ms on a worker thread, 2 cores), so the engine server hands
`Scheduler.start` a host that runs the worker loop on its main thread (`engine.server.serve`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.fill import FillRequest, FillRequestError, FillResult

log = logging.getLogger("dgls.engine")
PRIORITY = {"interactive": 0, "rewrite": 1}
# An idle worker wakes up this often. On the engine's main thread that is what lets a SIGINT or SIGTERM through:
# CPython runs signal handlers on the main thread only, between bytecodes, and a signal that lands after the
# thread let go of the interpreter but before it blocked in the lock is seen at its next wake-up (a client that
# sent the signal right after its reply stopped the engine only after that; without a timeout, never).
IDLE_WAKE_S = 0.5


class FillError(Exception):
    """A fill that ended without a result; `code` is one of `engine.protocol.ERROR_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(order=True)
class Job:
    sort_key: tuple[int, int]
    request: FillRequest = field(compare=False)
    future: asyncio.Future[FillResult] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    cancel_event: threading.Event = field(default_factory=threading.Event, compare=False)
    cancel_code: str = field(default="cancelled", compare=False)
    # Called once with (result, None) or (None, error) instead of settling `future` (which then stays pending), on
    # the thread that ends the job: the worker's for a fill that ran, else the submitter's (superseded or cancelled
    # while queued, or the scheduler stopping). The engine server writes its reply from there.
    on_done: Callable[[FillResult | None, FillError | None], None] | None = field(default=None, compare=False)

    def cancel(self, code: str) -> None:
        self.cancel_code = code
        self.cancel_event.set()


class Scheduler:
    """Runs `fill(request, cancelled)` for queued jobs on a single worker thread."""

    def __init__(
        self,
        fill: Callable[[FillRequest, Callable[[], bool]], FillResult],
        host: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """`host(loop)` runs the worker loop on a thread of the caller's choosing (it returns once the scheduler
        stops); by default a new daemon thread."""
        self.fill = fill
        self.queue: list[Job] = []
        self.running: Job | None = None
        self.counter = itertools.count()
        self.lock = threading.Condition()
        self.stopped = False
        self.served = 0
        self.last_latency_ms: float | None = None
        self.recent_ms: deque[float] = deque(maxlen=256)  # engine-side total_ms of the latest fills
        self.host = host or (lambda loop: threading.Thread(target=loop, name="dgls-engine-worker", daemon=True).start())
        self.warm_up: Callable[[], Any] | None = None
        self.worker_thread: str | None = None  # the name of the thread that runs the fills, once started
        self.warmed: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def start(self, warm_up: Callable[[], Any] | None = None) -> concurrent.futures.Future[Any]:
        """Start the worker; it runs `warm_up` first. The future holds warm_up's result (or its exception)."""
        self.warm_up = warm_up
        self.host(self._work)
        return self.warmed

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for job in self.queue:
                self._resolve(job, error=FillError("shutting_down", "the engine is stopping"))
            self.queue.clear()
            if self.running is not None:
                self.running.cancel("shutting_down")
            self.lock.notify_all()

    def submit(self, request: FillRequest,
               on_done: Callable[[FillResult | None, FillError | None], None] | None = None) -> Job:
        """Queue `request`; its outcome settles the job's future, or goes to `on_done` (see `Job`)."""
        loop = asyncio.get_running_loop()
        job = Job((PRIORITY[request.priority], next(self.counter)), request, loop.create_future(), loop,
                  on_done=on_done)
        with self.lock:
            if self.stopped:
                self._resolve(job, error=FillError("shutting_down", "the engine is stopping"))
                return job
            if request.document:
                self._supersede(request)
            heapq.heappush(self.queue, job)
            self.lock.notify()
        return job

    def _supersede(self, newer: FillRequest) -> None:
        def older(job: Job) -> bool:
            return job.request.document == newer.document and job.request.version <= newer.version

        kept = []
        for job in self.queue:
            if older(job):
                self._resolve(job, error=FillError("superseded", f"superseded by version {newer.version}"))
            else:
                kept.append(job)
        if len(kept) != len(self.queue):
            self.queue = kept
            heapq.heapify(self.queue)
        if self.running is not None and older(self.running):
            self.running.cancel("superseded")

    def cancel(self, job: Job) -> None:
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)
                heapq.heapify(self.queue)
                self._resolve(job, error=FillError("cancelled", "the request was cancelled"))
            else:
                job.cancel("cancelled")

    def status(self) -> dict[str, Any]:
        with self.lock:
            recent = sorted(self.recent_ms)
            return {
                "queued": len(self.queue),
                "running": self.running is not None,
                "requests_served": self.served,
                "last_latency_ms": self.last_latency_ms,
                "latency_ms_p50": round(statistics.median(recent), 2) if recent else None,
                "latency_ms_p95": recent[min(len(recent) - 1, round(0.95 * (len(recent) - 1)))] if recent else None,
                "recent_latencies_ms": list(self.recent_ms),
                "worker_thread": self.worker_thread,
            }

    def _work(self) -> None:
        self.worker_thread = threading.current_thread().name
        try:
            self.warmed.set_result(self.warm_up() if self.warm_up is not None else None)
        except Exception as exc:  # reported through the future; the worker still serves
            self.warmed.set_exception(exc)
        while True:
            with self.lock:
                while not self.queue and not self.stopped:
                    self.lock.wait(timeout=IDLE_WAKE_S)
                if self.stopped:
                    return
                job = heapq.heappop(self.queue)
                self.running = job
            self._run(job)
            with self.lock:
                self.running = None

    def _run(self, job: Job) -> None:
        try:
            result = self.fill(job.request, job.cancel_event.is_set)
        except FillRequestError as exc:
            self._resolve(job, error=FillError("bad_request", str(exc)))
            return
        except torch.OutOfMemoryError as exc:
            log.warning("out of memory on a request: %s", exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._resolve(job, error=FillError("out_of_memory", f"out of memory: {str(exc)[:200]}"))
            return
        except Exception as exc:  # the engine must outlive any one request
            log.exception("fill failed")
            self._resolve(job, error=FillError("internal", f"{type(exc).__name__}: {exc}"))
            return
        if result.cancelled or job.cancel_event.is_set():
            self._resolve(job, error=FillError(job.cancel_code, f"request {job.cancel_code}"))
            return
        with self.lock:
            self.served += 1
            self.last_latency_ms = result.timings.get("total_ms")
            if self.last_latency_ms is not None:
                self.recent_ms.append(self.last_latency_ms)
        self._resolve(job, result=result)

    @staticmethod
    def _resolve(job: Job, result: FillResult | None = None, error: FillError | None = None) -> None:
        """Hand a job's outcome over, once: to its `on_done` at once, on this thread; else to its future, on its
        event loop (nothing when that loop is closed: the engine stopped while the fill ran)."""
        if job.on_done is not None:
            on_done, job.on_done = job.on_done, None
            try:
                on_done(result, error)
            except Exception:  # the worker must outlive any one reply
                log.exception("handing over a fill's outcome failed")
            return

        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)  # type: ignore[arg-type]

        if job.loop.is_closed():
            return
        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # closed between the check and the call
            pass
