"""The engine process over its Unix socket: protocol errors, superseding, cancellation, failures, lifecycle."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from engine.client import AsyncEngineClient, EngineClient, EngineError
from engine.fill import FillRequest
from engine.server import EngineServer, ServeOptions

PREFIX = "def add(a, b):\n    return "


@pytest.fixture(scope="module")
def running_engine(tiny_model_dir, tmp_path_factory):
    """A real engine server on a private socket, in a background thread with its own event loop."""
    socket_path = Path(tmp_path_factory.mktemp("sock")) / "engine.sock"
    server = EngineServer(ServeOptions(socket_path=socket_path, model=tiny_model_dir, device="cpu"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.run(),), daemon=True)
    thread.start()
    from engine.client import wait_ready

    wait_ready(socket_path, timeout=120)
    yield server, socket_path
    loop.call_soon_threadsafe(server.stopping.set)
    thread.join(timeout=30)


def raw_exchange(socket_path: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        (length,) = struct.unpack(">I", sock.recv(4))
        data = b""
        while len(data) < length:
            data += sock.recv(length - len(data))
    return json.loads(data)


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_message"),
        (b'{"id": 1, "type": "explode"}', "bad_message"),
        (b'{"id": "x", "type": "status"}', "bad_message"),
        (b'{"v": 99, "id": 1, "type": "status"}', "bad_version"),
        (b'{"id": 1, "type": "fill", "request": {"suffix": "x"}}', "bad_request"),
        (b'{"id": 1, "type": "fill", "request": {"prefix": "x", "candidates": 0}}', "bad_request"),
        (b'{"id": 1, "type": "fill", "request": {"prefix": "x", "bogus": 1}}', "bad_request"),
    ],
)
def test_bad_messages_get_error_replies_and_the_engine_keeps_serving(running_engine, payload, code) -> None:
    _, socket_path = running_engine
    reply = raw_exchange(socket_path, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    with EngineClient(socket_path) as client:
        assert client.status()["ready"] is True


def test_oversized_frame_is_refused(running_engine) -> None:
    _, socket_path = running_engine
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(struct.pack(">I", 2**31))
        (length,) = struct.unpack(">I", sock.recv(4))
        reply = json.loads(sock.recv(length))
    assert reply["error"]["code"] == "too_large"
    with EngineClient(socket_path) as client:
        assert client.status()["ready"] is True


def test_fill_and_status_over_the_socket(running_engine) -> None:
    _, socket_path = running_engine
    with EngineClient(socket_path) as client:
        result = client.fill(FillRequest(prefix=PREFIX, deadline_ms=30_000))
        status = client.status()
    assert result.steps >= 1 and result.prompt_tokens > 0
    assert status["ready"] and status["requests_served"] >= 1
    assert status["canvas_length"] == 16 and status["noise"] == "uniform"


def test_engine_survives_a_failing_request(running_engine) -> None:
    server, socket_path = running_engine
    original = server.engine.denoiser.run

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    server.engine.denoiser.run = boom
    try:
        with EngineClient(socket_path) as client, pytest.raises(EngineError) as failure:
            client.fill(FillRequest(prefix=PREFIX))
    finally:
        server.engine.denoiser.run = original
    assert failure.value.code == "internal" and "kaboom" in failure.value.message
    with EngineClient(socket_path) as client:
        assert client.fill(FillRequest(prefix=PREFIX, deadline_ms=30_000)).steps >= 1


def test_out_of_memory_is_an_error_reply(running_engine) -> None:
    import torch

    server, socket_path = running_engine
    original = server.engine.denoiser.run

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    server.engine.denoiser.run = oom
    try:
        with EngineClient(socket_path) as client, pytest.raises(EngineError) as failure:
            client.fill(FillRequest(prefix=PREFIX))
    finally:
        server.engine.denoiser.run = original
    assert failure.value.code == "out_of_memory"
    with EngineClient(socket_path) as client:
        assert client.status()["ready"] is True


def slow_request(document: str, version: int, **extra) -> FillRequest:
    return FillRequest(prefix=PREFIX, document=document, version=version, deadline_ms=60_000,
                       early_commit=False, **extra)


async def test_newer_version_supersedes_queued_and_running_fills(running_engine) -> None:
    server, socket_path = running_engine
    gate = threading.Event()
    original = server.engine.fill

    def gated_fill(request, cancelled):
        gate.wait(timeout=30)  # hold the worker so v1 is running and v2 is queued when v3 arrives
        return original(request, cancelled)

    server.scheduler.fill = gated_fill
    client = AsyncEngineClient(socket_path)
    try:
        v1 = asyncio.create_task(client.fill(slow_request("doc-a", 1)))
        await asyncio.sleep(0.3)
        v2 = asyncio.create_task(client.fill(slow_request("doc-a", 2)))
        other = asyncio.create_task(client.fill(slow_request("doc-b", 1)))
        await asyncio.sleep(0.3)
        v3 = asyncio.create_task(client.fill(slow_request("doc-a", 3)))
        await asyncio.sleep(0.3)
        gate.set()
        results = await asyncio.gather(v1, v2, other, v3, return_exceptions=True)
    finally:
        server.scheduler.fill = original
        await client.close()
    assert isinstance(results[0], EngineError) and results[0].code == "superseded"
    assert isinstance(results[1], EngineError) and results[1].code == "superseded"
    assert not isinstance(results[2], Exception)  # another document is untouched
    assert not isinstance(results[3], Exception) and results[3].steps >= 1


async def test_cancel_stops_a_running_fill_within_one_step(running_engine) -> None:
    server, socket_path = running_engine
    steps_seen = []
    original_run = server.engine.denoiser.run
    started = threading.Event()

    def observed_run(*args, **kwargs):
        control = kwargs["control"]
        inner = control.cancelled

        def cancelled() -> bool:
            started.set()
            state = inner()
            steps_seen.append(state)
            return state

        control.cancelled = cancelled
        import time

        time.sleep(0.5)  # make the first step boundary come after the cancel message
        return original_run(*args, **kwargs)

    server.engine.denoiser.run = observed_run
    client = AsyncEngineClient(socket_path)
    try:
        task = asyncio.create_task(client.fill(slow_request("doc-c", 1)))
        await asyncio.sleep(0.2)
        task.cancel()  # the client sends `cancel` for the in-flight fill
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.5)
    finally:
        server.engine.denoiser.run = original_run
        await client.close()
    assert steps_seen and steps_seen[0] is True  # stopped at the first step boundary after the cancel


async def test_interactive_fills_run_before_queued_rewrites(running_engine) -> None:
    server, socket_path = running_engine
    gate = threading.Event()
    served: list[str] = []
    original = server.engine.fill

    def recording_fill(request, cancelled):
        gate.wait(timeout=30)
        served.append(request.document)
        return original(request, cancelled)

    server.scheduler.fill = recording_fill
    client = AsyncEngineClient(socket_path)
    try:
        first = asyncio.create_task(client.fill(slow_request("busy", 1)))
        await asyncio.sleep(0.3)
        rewrite = asyncio.create_task(client.fill(slow_request("rewrite-doc", 1, priority="rewrite")))
        await asyncio.sleep(0.1)
        interactive = asyncio.create_task(client.fill(slow_request("typing-doc", 1)))
        await asyncio.sleep(0.3)
        gate.set()
        await asyncio.gather(first, rewrite, interactive)
    finally:
        server.scheduler.fill = original
        await client.close()
    assert served == ["busy", "typing-doc", "rewrite-doc"]


async def test_idle_timeout_exits_and_removes_the_socket(tiny_model_dir, tmp_path) -> None:
    socket_path = tmp_path / "idle.sock"
    server = EngineServer(ServeOptions(socket_path=socket_path, model=tiny_model_dir, device="cpu",
                                       idle_timeout=1.0))
    await asyncio.wait_for(server.run(), timeout=60)  # returns by itself once idle
    assert not socket_path.exists()


def test_bad_idle_timeout_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="--idle-timeout"):
        ServeOptions(socket_path=tmp_path / "s.sock", idle_timeout=0)


async def test_warm_up_and_fills_run_on_the_same_worker_thread(tiny_model_dir) -> None:
    """torch's CPU thread team belongs to the thread that first runs parallel work: fills on another thread
    than the warm-up ran ~1.7x slower, so the scheduler's worker runs both. A failing warm-up is reported
    through its future and the worker still serves."""
    from engine.engine import Engine
    from engine.loading import load_checkpoint
    from engine.scheduler import Scheduler

    engine = Engine(load_checkpoint(tiny_model_dir, device="cpu"))
    threads: list[int] = []

    def fill(request, cancelled):
        threads.append(threading.get_ident())
        return engine.fill(request, cancelled)

    def warm_up() -> float:
        threads.append(threading.get_ident())
        return engine.warm_up()

    scheduler = Scheduler(fill)
    assert await asyncio.wrap_future(scheduler.start(warm_up=warm_up)) > 0
    await scheduler.submit(FillRequest(prefix=PREFIX, deadline_ms=30_000)).future
    scheduler.stop()
    assert len(threads) == 2 and threads[0] == threads[1] != threading.get_ident()

    def broken() -> float:
        raise RuntimeError("warm-up failed")

    scheduler = Scheduler(fill)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        await asyncio.wrap_future(scheduler.start(warm_up=broken))
    assert (await scheduler.submit(FillRequest(prefix=PREFIX, deadline_ms=30_000)).future).steps >= 1
    scheduler.stop()


def test_a_fill_ending_after_the_engine_stopped_settles_nothing() -> None:
    """The engine may stop (shutdown, a signal) while a fill still runs on the main thread; when that fill
    returns, its event loop is closed: settling its future must neither raise nor be attempted."""
    from engine.scheduler import Job, Scheduler

    loop = asyncio.new_event_loop()
    job = Job((0, 0), FillRequest(prefix=PREFIX), loop.create_future(), loop)
    loop.close()
    Scheduler._resolve(job, error=None, result=None)  # raised "Event loop is closed" on the main thread before
    assert not job.future.done()


def test_replies_stay_whole_frames_when_the_client_reads_late(running_engine) -> None:
    """Fill replies are written from the worker thread straight to the socket only while nothing waits in the
    event loop's write buffer; a client that stops reading gets every reply later, in whole frames."""
    _, socket_path = running_engine
    fill = json.dumps({"id": 1, "type": "fill", "request": {"prefix": PREFIX, "deadline_ms": 30_000}}).encode()
    status = json.dumps({"id": 2, "type": "status"}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(str(socket_path))
        frames = [struct.pack(">I", len(fill)) + fill] + [struct.pack(">I", len(status)) + status] * 400
        sock.sendall(b"".join(frames))  # ~400 status replies fill the socket while the fill runs
        import time

        time.sleep(2.0)  # the fill ends while its reply cannot be written straight away
        replies = []
        data = b""
        while len(replies) < 401:
            chunk = sock.recv(65536)
            assert chunk, "the engine closed the connection"
            data += chunk
            while len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
                (length,) = struct.unpack(">I", data[:4])
                replies.append(json.loads(data[4 : 4 + length]))
                data = data[4 + length :]
    assert sorted(reply["id"] for reply in replies) == [1] + [2] * 400
    assert all(reply["ok"] for reply in replies)
    assert next(reply for reply in replies if reply["id"] == 1)["result"]["steps"] >= 1


def test_requests_and_results_travel_as_their_dataclass_fields() -> None:
    """What the language server and the engine write is every field, nested snippets included, and reads back
    as the same object."""
    import dataclasses

    from engine.fill import ContextSnippet, FillResult

    request = FillRequest(prefix="a", suffix="b", context=[ContextSnippet(path="p", text="t")], mode="block",
                          candidates=3, document="doc", version=7, seed_canvas="x", keep_fixed=True)
    assert request.to_dict() == dataclasses.asdict(request)
    assert FillRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    result = FillResult(text="x", candidates=["x", "y"], steps=2, prompt_tokens=5, cached_prompt_tokens=1,
                        converged=True, timings={"total_ms": 1.5})
    data = result.to_dict()
    assert data == dataclasses.asdict(result)
    data["candidates"].append("z")
    data["timings"]["total_ms"] = 0.0
    assert result.candidates == ["x", "y"] and result.timings == {"total_ms": 1.5}  # copies, not the same lists
    assert FillResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_frames_are_cut_from_a_stream_however_it_arrives() -> None:
    from engine.protocol import MAX_FRAME_BYTES, FrameReader, ProtocolError, encode_frame

    stream = b"".join(encode_frame({"id": n, "text": "é" * n}) for n in range(5))
    for size in (1, 3, 7, len(stream)):
        reader = FrameReader()
        bodies = [body for start in range(0, len(stream), size) for body in reader.feed(stream[start : start + size])]
        assert [json.loads(body)["id"] for body in bodies] == [0, 1, 2, 3, 4]
        assert not reader.buffer
    reader = FrameReader()
    seen = []
    with pytest.raises(ProtocolError) as refused:
        for body in reader.feed(encode_frame({"id": 9}) + struct.pack(">I", MAX_FRAME_BYTES + 1)):
            seen.append(json.loads(body)["id"])
    assert seen == [9] and refused.value.code == "too_large"  # the frames before it still count


async def test_a_client_whose_engine_stops_reading_fails_every_request_once(tmp_path) -> None:
    """Requests stuck behind a full socket (the writer paused) all fail with EngineUnavailable when the connection
    drops, leaving no future behind whose error nobody reads."""
    import gc

    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    writers: list[asyncio.StreamWriter] = []

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_unix_server(never_reads, path=str(tmp_path / "deaf.sock"))
    client = AsyncEngineClient(tmp_path / "deaf.sock")
    try:
        await client.connect()
        assert client.connection is not None and client.connection.transport is not None
        client.connection.transport.set_write_buffer_limits(high=1000)
        fills = [asyncio.create_task(client.fill(FillRequest(prefix="x" * 200_000))) for _ in range(20)]
        await asyncio.sleep(0.3)
        assert client.connection.writable is not None and not any(fill.done() for fill in fills)  # paused
        writers[0].transport.abort()
        outcomes = await asyncio.gather(*fills, return_exceptions=True)
    finally:
        await client.close()
        server.close()
    assert all(isinstance(outcome, EngineError) and outcome.code == "unavailable" for outcome in outcomes)
    assert not client.pending and not client.connected
    del fills, outcomes
    gc.collect()
    await asyncio.sleep(0)
    assert not errors, errors
