"""`textDocument/inlineCompletion`, the `textDocument/completion` fallback, prefetching on `didChange`, and what
the client tells us about shown and accepted suggestions.

Each handler is thin: snapshot the document, look in the completion cache (typed-through suggestions are
answered without an engine call), build the context, fill, post-process, convert. Every failure is an empty
answer; only a cancelled request ends with an error (the one the protocol prescribes).

Prefetch: once an editor has asked for automatic inline completions in a document, each keystroke there starts
the suggestion for the cursor the change leaves as soon as its `didChange` arrives; the editor's request (after
its debounce) takes it over when it asks at that version and position, and any other request supersedes it as a
newer keystroke would (one fill per document runs at a time). `completion.prefetch: false` turns it off.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from lsprotocol import types

from dgls import document
from dgls.context import CompletionContext, build_context
from dgls.postprocess import Suggestion, postprocess
from dgls.session import Session
from dgls.snapshot import DocumentSnapshot
from engine.fill import FillRequest, FillResult

log = logging.getLogger("dgls.server")
ACCEPT_COMMAND = "dgls.acceptCompletion"
SNIFF_CHARS = 4096  # text around the cursor checked for NUL bytes (binary documents get no suggestions)
INLINE_CONTEXT_CHARS = 32_768  # documents up to this size get their context built on the event loop
PREFETCH_ARMED_S = 30.0  # after an automatic inline request, a document's keystrokes prefetch for this long
PREFETCH_MAX_CHARS = 64  # a change inserting more (a paste, a formatter's edit) is not typing: no prefetch
AUTO_CLOSED = ("()", "[]", "{}", '""', "''", "``")  # typed with the closer an editor adds after the cursor


@dataclass(slots=True)
class Suggested:
    snapshot: DocumentSnapshot
    offset: int
    suggestions: list[Suggestion]
    item_ids: list[int]
    cached: bool = False  # from the typed-through cache, without the engine


@dataclass(slots=True)
class Prefetch:
    version: int
    position: tuple[int, int]  # (line, character) of the cursor the change left
    task: asyncio.Task[Suggested | None]
    fill: asyncio.Task[Any] | None  # its fill in the engine, when it wrote one at once

    def usable(self, version: int, position: types.Position) -> bool:
        """Whether a request at `position` of the document at `version` can take this prefetch over: the same
        place, and not finished without an answer (the engine may have become ready since)."""
        if (self.version, self.position) != (version, (position.line, position.character)) or self.task.cancelled():
            return False
        return not self.task.done() or self.task.exception() is not None or self.task.result() is not None

    def cancel(self) -> None:
        """Stop it and its fill (the engine hears `cancel`): nobody will ask for it."""
        self.task.cancel()
        if self.fill is not None:
            self.fill.cancel()


# The document's version when an inline or completion request was read (`DglsProtocol.handle_message`): a
# request whose document changed before its handler ran is for text the editor no longer shows.
dispatched_version: contextvars.ContextVar[int | None] = contextvars.ContextVar("dispatched_version", default=None)


def suggest(
    session: Session,
    uri: str,
    position: types.Position,
    invoked: bool,
    selected: types.SelectedCompletionInfo | None = None,
    channel: str = "",
    version: int | None = None,
    prefetch: bool = False,
) -> Coroutine[Any, Any, Suggested | None]:
    """Suggestions at `position` of the open document `uri`, best first, as a coroutine to await; None when there
    is nothing to say (or, with `version`, when the document is no longer at that version).

    Begun before this returns: the document read, the typed-through cache asked and, for documents up to
    INLINE_CONTEXT_CHARS, the context built and the fill written to the engine (an incremental parse and a context
    take ~0.3-1 ms, less than a hop to a worker thread and back under load; larger documents get their context
    built on a thread, so that parsing a large file never stalls other requests). Requests on one `channel` of a
    document supersede each other (inline completions and the completion fallback use different channels, so a
    client that asks for both gets both). A `prefetch` counts nothing and publishes no status: the request that
    takes it over does (`inline_completion`)."""
    snapshot = DocumentSnapshot.of(session.server.workspace, uri)
    if snapshot is None or session.shutting_down or (version is not None and snapshot.version != version):
        return _value(None)
    if not session.options.completion.enabled_for(snapshot.language_id):
        return _value(None)
    offset = snapshot.offset_at(position)
    if offset is None:
        return _value(None)
    text = snapshot.text
    if "\x00" in text[max(0, offset - SNIFF_CHARS) : offset + SNIFF_CHARS]:
        return _value(None)  # binary data: nothing sensible to complete
    selected_text = ""
    if selected is not None:
        start = snapshot.offset_at(selected.range.start)
        if start is None or start > offset:
            return _value(None)
        selected_text = selected.text
        # The suggestion must extend the selected item: complete as if it were already inserted.
        text = text[:start] + selected.text + text[offset:]
        offset = start + len(selected.text)
    else:
        # An explicit request at the very spot of the last answer wants fresh suggestions, not the cached ones.
        hits = [hit for hit in session.cache.lookup(uri, text, offset) if hit.typed or not invoked]
        if hits:
            suggested = Suggested(snapshot, offset, [Suggestion(h.text, h.overwrite) for h in hits[:1]],
                                  [h.item_id for h in hits[:1]], cached=True)
            if not prefetch:
                _count_answer(session, suggested)
            return _value(suggested)
    ask = _Ask(snapshot, text, offset, position.line, selected is not None, selected_text, invoked, uri + channel,
               prefetch)
    if len(text) <= INLINE_CONTEXT_CHARS:
        context = ask.moded(session, build_context(text, *ask.context_args(session)))
        return _answer(session, ask, context, session.start_fill(ask.key, ask.request(session, context)))
    return _answer_later(session, ask)


@dataclass(slots=True)
class _Ask:
    """A suggestion being made: the document as the model sees it (a selected completion item inserted)."""

    snapshot: DocumentSnapshot
    text: str
    offset: int
    line: int
    selected: bool  # a selected completion item: the suggestion extends it and replaces its range
    selected_text: str
    invoked: bool
    key: str  # the document's URI plus the channel
    prefetch: bool

    def context_args(self, session: Session) -> tuple[Any, ...]:
        """`build_context`'s arguments after the text."""
        options = session.options.context
        return (self.offset, self.line, self.snapshot.language_id, self.snapshot.path, options.prefix_tokens,
                options.suffix_tokens, options.extra_tokens)

    def moded(self, session: Session, context: CompletionContext) -> CompletionContext:
        """`context` with the mode the options force, if any."""
        if session.options.completion.mode != "auto":
            context.mode = session.options.completion.mode
        return context

    def candidates(self, session: Session) -> int:
        return session.options.completion.candidates if self.invoked else 1

    def request(self, session: Session, context: CompletionContext) -> FillRequest:
        options, snapshot = session.options, self.snapshot
        return FillRequest(
            prefix=context.prefix, suffix=context.suffix, language=snapshot.language_id, path=snapshot.path,
            context=context.snippets, mode=context.mode, candidates=self.candidates(session),  # type: ignore[arg-type]
            deadline_ms=options.deadlines.invoked_ms if self.invoked else options.deadlines.automatic_ms,
            seed=options.completion.seed, document=self.key, version=snapshot.version, priority="interactive",
        )


async def _value(value: Suggested | None) -> Suggested | None:
    return value


async def _answer_later(session: Session, ask: _Ask) -> Suggested | None:
    context = ask.moded(session, await context_for(ask.text, *ask.context_args(session)))
    now = DocumentSnapshot.of(session.server.workspace, ask.snapshot.uri)
    if now is None or now.version != ask.snapshot.version:
        return None  # changed or closed while the context was built: a newer request is on its way
    return await _answer(session, ask, context, session.start_fill(ask.key, ask.request(session, context)))


async def context_for(text: str, *args: Any) -> CompletionContext:
    """`build_context` on the event loop for documents up to INLINE_CONTEXT_CHARS, else on a thread (see
    `suggest`)."""
    if len(text) <= INLINE_CONTEXT_CHARS:
        return build_context(text, *args)
    return await asyncio.to_thread(build_context, text, *args)


async def _answer(session: Session, ask: _Ask, context: CompletionContext,
                  fill: Awaitable[FillResult | None]) -> Suggested | None:
    """Wait for the fill, post-process it and remember the suggestions (typed-through cache)."""
    result = await fill
    if result is None:
        if not ask.prefetch:
            _count_answer(session, None)
        return None
    suggestions = postprocess(result.candidates or [result.text], context)[: ask.candidates(session)]
    offset = ask.offset
    if ask.selected:
        suggestions = [Suggestion(ask.selected_text + s.text, s.overwrite) for s in suggestions]
        offset -= len(ask.selected_text)
        item_ids = [0] * len(suggestions)
    else:
        uri = ask.snapshot.uri
        item_ids = session.cache.store(uri, ask.text, offset, [(s.text, s.overwrite) for s in suggestions])
    suggested = Suggested(ask.snapshot, offset, suggestions, item_ids)
    if not ask.prefetch:
        _count_answer(session, suggested)
    return suggested


def _count_answer(session: Session, suggested: Suggested | None) -> None:
    """Count an answer about to be sent and publish the status after it."""
    if suggested is None:
        session.stats["emptyAnswers"] += 1
    elif suggested.cached:
        session.stats["cacheHits"] += 1
    session.publish_status_after_answer()


def _range(suggested: Suggested, suggestion: Suggestion) -> types.Range:
    """From the cursor over what the suggestion overwrites on the cursor line (often nothing)."""
    snapshot = suggested.snapshot
    start = snapshot.position_at(suggested.offset)
    end = snapshot.position_at(suggested.offset + suggestion.overwrite) if suggestion.overwrite else start
    return types.Range(start=start, end=end)


async def inline_completion(
    session: Session, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    context = params.context
    invoked = context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    selected = context.selected_completion_info
    uri = params.text_document.uri
    snapshot = DocumentSnapshot.of(session.server.workspace, uri)
    if _stale(snapshot):
        return types.InlineCompletionList(items=[])
    prefetched = session.prefetches.pop(uri, None)
    if not invoked and selected is None:
        session.prefetch_armed[uri] = time.monotonic() + PREFETCH_ARMED_S
    if prefetched is not None and snapshot is not None and not invoked and selected is None and prefetched.usable(
            snapshot.version, params.position):
        session.stats["prefetchesUsed"] += 1
        suggested = await prefetched.task
        _count_answer(session, suggested)
    else:
        if prefetched is not None:
            prefetched.cancel()
        suggested = await suggest(session, uri, params.position, invoked, selected)
    if suggested is None or not suggested.suggestions:
        return types.InlineCompletionList(items=[])
    items = []
    for item_id, suggestion in zip(suggested.item_ids, suggested.suggestions, strict=True):
        # With a selected completion item, the suggestion replaces what that item would replace.
        span = selected.range if selected is not None else _range(suggested, suggestion)
        items.append(types.InlineCompletionItem(
            insert_text=suggestion.text, range=span,
            command=types.Command(title="dgls: accepted", command=ACCEPT_COMMAND, arguments=[item_id]),
        ))
    return types.InlineCompletionList(items=items)


async def completion(session: Session, params: types.CompletionParams) -> types.CompletionList | None:
    """One item with a `textEdit`, for clients without inline completion."""
    trigger = params.context.trigger_kind if params.context else types.CompletionTriggerKind.Invoked
    invoked = trigger == types.CompletionTriggerKind.Invoked
    if _stale(DocumentSnapshot.of(session.server.workspace, params.text_document.uri)):
        return types.CompletionList(is_incomplete=True, items=[])
    suggested = await suggest(session, params.text_document.uri, params.position, invoked, channel="#completion")
    if suggested is None or not suggested.suggestions:
        return types.CompletionList(is_incomplete=True, items=[])
    suggestion = suggested.suggestions[0]
    label = suggestion.text.strip().split("\n", 1)[0][:60] or suggestion.text[:60]
    item = types.CompletionItem(
        label=label, kind=types.CompletionItemKind.Text, detail="dgls", sort_text="0", filter_text="",
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=_range(suggested, suggestion), new_text=suggestion.text),
        command=types.Command(title="dgls: accepted", command=ACCEPT_COMMAND, arguments=[suggested.item_ids[0]]),
    )
    return types.CompletionList(is_incomplete=True, items=[item])


def _stale(snapshot: DocumentSnapshot | None) -> bool:
    """Whether the document changed after the request being handled was sent (`dispatched_version`): its answer
    would be for text the editor no longer shows."""
    return snapshot is not None and dispatched_version.get() not in (None, snapshot.version)


def did_change(session: Session, params: types.DidChangeTextDocumentParams) -> None:
    """A keystroke (pygls has applied it): in a document whose editor asks for automatic inline completions,
    start the suggestion for the cursor it leaves now; `inline_completion` takes it over."""
    uri = params.text_document.uri
    previous = session.prefetches.pop(uri, None)
    if previous is not None:
        previous.cancel()
    if (not session.options.completion.prefetch or session.shutting_down or len(params.content_changes) != 1
            or session.prefetch_armed.get(uri, 0.0) < time.monotonic()):
        return
    snapshot = DocumentSnapshot.of(session.server.workspace, uri)
    if snapshot is None or not session.options.completion.enabled_for(snapshot.language_id):
        return
    position = _cursor_after(params.content_changes[0], snapshot)
    if position is None:
        return
    try:  # begun now (the fill is written to the engine before the next message is read), awaited in a task
        before = session.latest.get(uri)
        started = suggest(session, uri, position, invoked=False, version=snapshot.version, prefetch=True)
    except Exception as exc:  # a prefetch is optional: the editor's request tries again and reports
        log.warning("prefetch failed: %s: %s", type(exc).__name__, exc)
        return
    fill = session.latest.get(uri)
    task = asyncio.ensure_future(started)
    task.add_done_callback(_log_failure)
    session.prefetches[uri] = Prefetch(snapshot.version, (position.line, position.character), task,
                                       fill if fill is not before else None)
    session.stats["prefetches"] += 1


def _cursor_after(change: Any, snapshot: DocumentSnapshot) -> types.Position | None:
    """Where typing `change` leaves the cursor: after the inserted text (inside an auto-closed pair, at the start
    of a deletion); None for a whole-document change or a long insertion."""
    if not isinstance(change, types.TextDocumentContentChangePartial) or len(change.text) > PREFETCH_MAX_CHARS:
        return None
    start, text = change.range.start, change.text
    if text in AUTO_CLOSED:  # an editor closing the pair it opened leaves the cursor inside it
        text = text[0]
    lines = document.line_number(text, len(text))
    if lines:
        last = text[document.line_start(text, lines) or 0 :]
        return types.Position(line=start.line + lines, character=snapshot.units(last))
    return types.Position(line=start.line, character=start.character + snapshot.units(text))


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("prefetch failed: %r", task.exception())


def _item_id(item: Any) -> int | None:
    """The id in an item's accept command (items come back as plain JSON in the notifications)."""
    command = _get(item, "command")
    arguments = _get(command, "arguments") or []
    return arguments[0] if arguments and isinstance(arguments[0], int) else None


def _get(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


def did_show(session: Session, params: Any) -> None:
    """`dgls/didShowCompletion {item}`: prefer this suggestion when the user types through it."""
    item_id = _item_id(_get(params, "item"))
    if item_id is not None and session.cache.mark_shown(item_id) is not None:
        session.stats["shown"] += 1


def did_partially_accept(session: Session, params: Any) -> None:
    """`dgls/didPartiallyAcceptCompletion {item, acceptedLength}`: the rest stays on offer, typed-through."""
    item_id = _item_id(_get(params, "item"))
    accepted = _get(params, "acceptedLength")
    if item_id is not None:
        session.cache.mark_shown(item_id)
    session.stats["partiallyAccepted"] += 1
    if isinstance(accepted, int) and accepted > 0:
        session.stats["acceptedChars"] += accepted


def accepted(session: Session, item_id: Any) -> None:
    """The accept command of an item: count it; the suggestion is now text, so it leaves the cache."""
    session.stats["accepted"] += 1
    entry = session.cache.entries.pop(item_id, None) if isinstance(item_id, int) else None
    if entry is not None:
        session.stats["acceptedChars"] += len(entry.text)
    session.publish_status()
