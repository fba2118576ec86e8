"""End-to-end latency of `dgls lsp` while a user types, against the engine's own time for the same fills.

Usage:
    python -m benchmarks.lsp_latency [--model DIR] [--sessions 4] [--chars 24] [--typing-ms 120] [--device cpu]
                                     [--debounce-ms 0] [--no-prefetch]

A real LSP client (pygls `LanguageClient`) starts `dgls lsp` (which starts a private engine), opens real
files cut at a random line, and types the rest of that line one character at a time at typing speed: each
keystroke is a `didChange` followed by an automatic `textDocument/inlineCompletion`, without waiting for the
previous answer, as editors do: at once by default (the worst case for the server: `overhead_ratio` is read
there), or `--debounce-ms` later, as dgls' editor plugins do (75 ms by default), by when the server's prefetch
(`completion.prefetch`, on unless `--no-prefetch`) has run the keystroke's fill; latency counts from the request
(the overhead fields are null then: the fill ran before the request was sent).
Every request is paired with the engine's own `total_ms` for its fill (the `dgls/status` published after each
answer names the document version of each finished fill). Reports, over the requests whose fill ran to the end
in the engine (`filled`): the end-to-end `p50_ms`/`p95_ms`, `engine_ms_p50`,
`overhead_ratio` (the median over those requests of end-to-end / engine time, each request against its own
fill; it includes waiting for the engine to drop the previous keystroke's fill), `overhead_ratio_of_medians`
(end-to-end p50 / engine p50, what `overhead_ratio` was until 2026-11-27: it sets two different requests against
each other, and with fills of 20-100 ms it moved by +-0.04 between back-to-back runs whose per-request overhead
moved by +-0.2 ms) and `overhead_ms_p50`; also `answered` (requests answered with a suggestion after
post-processing), `stale_dropped` (answered empty without a finished fill: superseded by a newer keystroke),
`cache_hits` (answers served from the typed-through cache without the engine), `prefetches`/`prefetches_used`
(keystrokes whose fill the server started on their `didChange`, and those a request took over). Fixed seed, one
warm-up session; progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from benchmarks.harness_engine import percentile
from benchmarks.requests_from_files import default_files
from engine.client import EngineClient, EngineError, EngineUnavailable, wait_ready

# end-to-end ms, answered with an item, the engine's ms for that fill, the server's round trip to the engine
Timing = tuple[float, bool, float | None, float | None]
Answer = tuple[float, bool, str, int]  # end-to-end ms, answered with an item, document, version
Fills = dict[tuple[str, int], tuple[float, float | None]]  # (document, version) -> engine ms, round trip ms


async def typing_session(client: LanguageClient, uri: str, text: str, line: int, typed: str, pause_s: float,
                         answers: list[Answer], debounce_s: float = 0.0) -> None:
    """Open `text`, then type `typed` at the end of `line`; record an `Answer` per keystroke's request, sent
    `debounce_s` after its keystroke."""
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
    column = len(text.split("\n")[line])
    pending = []
    for index, char in enumerate(typed):
        version = index + 2
        position = types.Position(line=line, character=column + index)
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=position, end=position), text=char)]))
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=column + index + 1),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
        pending.append(asyncio.ensure_future(timed_request(client, params, version, answers, debounce_s)))
        await asyncio.sleep(pause_s)
    await asyncio.gather(*pending)
    client.text_document_did_close(types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))


async def timed_request(client: LanguageClient, params: types.InlineCompletionParams, version: int,
                        answers: list[Answer], debounce_s: float = 0.0) -> None:
    """One request's end-to-end latency; its engine time is paired later (see `pair`)."""
    if debounce_s:
        await asyncio.sleep(debounce_s)
    started = time.perf_counter()
    result = await client.text_document_inline_completion_async(params)
    elapsed = (time.perf_counter() - started) * 1000
    items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
    answers.append((elapsed, bool(items), params.text_document.uri, version))


def record_fill(fills: Fills, status: dict[str, Any]) -> None:
    """The server publishes `dgls/status` after each answer, its `lastFill` naming the document version of the
    newest fill the engine finished, with the engine's and the round trip's times."""
    last = _as_dict(status.get("lastFill") or {})
    if last.get("document") is not None and last.get("engineMs") is not None:
        fills[(last["document"], last["version"])] = (last["engineMs"], last.get("roundTripMs"))


def pair(answers: list[Answer], fills: Fills) -> list[Timing]:
    """Each answer with its own fill's times; None for a request whose fill never finished (superseded)."""
    timings: list[Timing] = []
    for elapsed, has_item, uri, version in answers:
        engine, trip = fills.get((uri, version), (None, None))
        timings.append((elapsed, has_item, engine, trip))
    return timings


def cut_sessions(count: int, chars: int, seed: int) -> list[tuple[Path, str, int, str]]:
    rng = random.Random(seed)
    sessions: list[tuple[Path, str, int, str]] = []
    files = default_files()
    while len(sessions) < count:
        path = files[rng.randrange(len(files))]
        lines = path.read_text(encoding="utf-8").split("\n")
        index = rng.randrange(10, len(lines) - 5)
        stripped = lines[index].strip()
        if len(stripped) < chars // 2 or stripped.startswith(("#", '"""')):
            continue
        indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
        text = "\n".join(lines[:index] + [indent] + lines[index + 1 :])
        sessions.append((path, text, index, stripped[:chars]))
    return sessions


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="dgls-lsp-bench-"))
    socket_path = folder / "engine.sock"
    engine_options: dict[str, Any] = {"socket": str(socket_path), "device": args.device}
    if args.model:
        engine_options["model"] = str(args.model.resolve())
    client = LanguageClient("dgls-lsp-latency", "1")
    await client.start_io(sys.executable, "-m", "dgls", "lsp", "--socket", str(socket_path))
    await client.initialize_async(types.InitializeParams(
        capabilities=types.ClientCapabilities(),
        initialization_options={"engine": engine_options, "deadlines": {"automaticMs": args.deadline_ms},
                                "completion": {"candidates": 1, "debounceMs": args.debounce_ms,
                                               "prefetch": args.prefetch}}))
    client.initialized(types.InitializedParams())
    server_status: dict[str, Any] = {}
    fills: Fills = {}

    def on_status(params: Any) -> None:
        server_status.update(_as_dict(params))
        record_fill(fills, server_status)

    client.feature("dgls/status")(on_status)
    client.feature(types.WINDOW_LOG_MESSAGE)(lambda params: None)
    sessions = cut_sessions(args.sessions + 1, args.chars, args.seed)
    answers: list[Answer] = []
    try:
        for number, (path, text, line, typed) in enumerate(sessions):
            print(f"session {number}/{args.sessions}: {path.name}:{line + 1} typing {typed!r}", file=sys.stderr)
            run_answers: list[Answer] = []
            await typing_session(client, path.resolve().as_uri() + f"?session={number}", text, line, typed,
                                 args.typing_ms / 1000, run_answers, args.debounce_ms / 1000)
            if number:  # session 0 warms up the engine and the caches
                answers.extend(run_answers)
            else:  # the server starts the engine on demand: wait until its model is loaded
                await wait_for_engine(socket_path, server_status)
        await asyncio.sleep(0.2)  # the last answer's status follows it
        timings = pair(answers, fills)
        with EngineClient(socket_path, timeout=30) as engine:
            status = engine.status()
    finally:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        try:
            with EngineClient(socket_path, timeout=10) as engine:
                engine.shutdown()
        except EngineError:
            pass
    filled = [(ms, engine) for ms, _, engine, _ in timings if engine is not None]  # fills that ran to the end
    links = [(ms, engine, trip) for ms, _, engine, trip in timings if engine is not None and trip is not None]
    answered = [ms for ms, has_item, _, _ in timings if has_item]
    end_to_end = [ms for ms, _ in filled]
    p50 = percentile(end_to_end, 50)
    # the same order statistic as `p50`: each request's end to end is at least its fill's engine time, so the
    # k-th smallest of one is at least the k-th smallest of the other (statistics.median averages the two middle
    # values of an even count, `percentile` takes one of them: compared, they could read end to end < engine)
    engine_p50 = percentile([engine for _, engine in filled], 50)
    # a fill prefetched during the debounce ran before its request was sent: no overhead to compare
    comparable = not (args.debounce_ms and args.prefetch)
    return {
        "model": status.get("model"),
        "device": status.get("device"),
        "requests": len(timings),
        "filled": len(filled),
        "answered": len(answered),
        "p50_ms": p50,
        "p95_ms": percentile(end_to_end, 95),
        "engine_ms_p50": engine_p50,
        "overhead_ratio": (round(statistics.median(ms / engine for ms, engine in filled), 3)
                           if filled and comparable else None),
        "overhead_ratio_of_medians": round(p50 / engine_p50, 3) if p50 and engine_p50 and comparable else None,
        "overhead_ms_p50": (round(statistics.median(ms - engine for ms, engine in filled), 2)
                            if filled and comparable else None),
        "engine_link_ms_p50": _median([trip - engine for _, engine, trip in links]),
        "lsp_side_ms_p50": _median([ms - trip for ms, _, trip in links]) if comparable else None,
        "answered_p50_ms": percentile(answered, 50),
        "stale_dropped": sum(1 for _, has_item, engine, _ in timings if engine is None and not has_item),
        "engine_fills": status.get("requests_served"),
        "cache_hits": server_status.get("cacheHits"),
        "debounce_ms": args.debounce_ms,
        "prefetches": server_status.get("prefetches"),
        "prefetches_used": server_status.get("prefetchesUsed"),
    }


async def wait_for_engine(socket_path: Path, server_status: dict[str, Any], timeout: float = 300.0) -> None:
    """Until the engine the server started is ready; at once, with the server's reason, if it could not start
    (rather than polling a socket nothing will ever answer on for the whole timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        if server_status.get("state") == "failed":
            raise SystemExit(f"lsp_latency: the engine could not start: {server_status.get('message')}")
        try:
            await asyncio.to_thread(wait_ready, socket_path, 1.0)
            return
        except EngineUnavailable:
            if time.monotonic() >= deadline:
                raise


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _as_dict(params: Any) -> dict[str, Any]:
    """pygls hands unknown notifications' params over as a namedtuple-like object or a dict."""
    if isinstance(params, dict):
        return params
    if hasattr(params, "_asdict"):
        return dict(params._asdict())
    return dict(vars(params)) if hasattr(params, "__dict__") else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--chars", type=int, default=24)
    parser.add_argument("--typing-ms", type=float, default=120.0)
    parser.add_argument("--deadline-ms", type=float, default=2000.0)
    parser.add_argument("--debounce-ms", type=int, default=0, help="send each request this long after its keystroke")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="completion.prefetch off: fills start when the request arrives")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.debounce_ms < args.typing_ms:
        parser.error(f"--debounce-ms must be at least 0 and below --typing-ms ({args.typing_ms:g}): each request "
                     "is sent before the next keystroke, as an editor's debounce does")
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
