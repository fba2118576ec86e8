"""Fill and rewrite a selection: code actions (`refactor.rewrite`) and the commands `dgls.fillSelection` and
`dgls.rewriteSelection`, applied with one `workspace/applyEdit`.

Fill treats the selection as a gap to fill from what surrounds it; rewrite seeds the engine's canvas with the
selected text (the engine's seeded canvas) and may change all of it, optionally guided by an instruction sent as
a context snippet. Work-done progress runs while the engine works and is cancellable, as is the request. The
document version is checked before the edit is sent and carried in the edit, so an edit is never applied to
text that changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from dgls.context import CHARS_PER_TOKEN
from dgls.inline import context_for
from dgls.postprocess import postprocess
from dgls.session import Session, current_command
from dgls.snapshot import DocumentSnapshot
from engine.fill import ContextSnippet, FillRequest

FILL_COMMAND = "dgls.fillSelection"
REWRITE_COMMAND = "dgls.rewriteSelection"
_tokens = itertools.count(1)


def code_actions(session: Session, params: types.CodeActionParams) -> list[types.CodeAction]:
    snapshot = DocumentSnapshot.of(session.server.workspace, params.text_document.uri)
    if snapshot is None or params.range.start == params.range.end:
        return []
    argument = {
        "uri": snapshot.uri, "version": snapshot.version,
        "range": session.server.protocol._converter.unstructure(params.range),
    }
    return [
        types.CodeAction(title=title, kind=types.CodeActionKind.RefactorRewrite,
                         command=types.Command(title=title, command=command, arguments=[argument]))
        for title, command in (("dgls: fill selection", FILL_COMMAND), ("dgls: rewrite selection", REWRITE_COMMAND))
    ]


def _parse_arguments(session: Session, arguments: tuple[Any, ...]) -> tuple[str, types.Range, int | None, str]:
    """`{uri, range, version?, instruction?}` (or `uri, range[, instruction]` positionally)."""
    try:
        if len(arguments) == 1 and isinstance(arguments[0], dict):
            data = arguments[0]
        else:
            extra = arguments[2] if len(arguments) > 2 else ""
            data = {"uri": arguments[0], "range": arguments[1], "instruction": extra}
        span = session.server.protocol._converter.structure(data["range"], types.Range)
        uri, version, instruction = data["uri"], data.get("version"), data.get("instruction") or ""
        if not isinstance(uri, str) or not isinstance(instruction, str):
            raise TypeError("'uri' and 'instruction' must be strings")
        if version is not None and not isinstance(version, int):
            raise TypeError("'version' must be an integer")
    except Exception as exc:
        raise JsonRpcInvalidParams(f"expected one argument {{uri, range, version?, instruction?}}: {exc}") from None
    return uri, span, version, instruction


async def run(session: Session, arguments: tuple[Any, ...], rewrite: bool) -> dict[str, Any]:
    """Fill or rewrite the selection; returns `{applied, text?, reason?}`."""
    uri, span, version, instruction = _parse_arguments(session, arguments)
    snapshot = DocumentSnapshot.of(session.server.workspace, uri)
    if snapshot is None:
        return {"applied": False, "reason": f"{uri} is not open"}
    if version is not None and version != snapshot.version:
        return {"applied": False, "reason": "the document changed since the selection was made"}
    start, end = snapshot.offset_at(span.start), snapshot.offset_at(span.end)
    if start is None or end is None or start >= end:
        return {"applied": False, "reason": "the selection is empty or outside the document"}
    selected = snapshot.text[start:end]
    canvas = int(session.link.engine_status.get("canvas_length") or 0)
    if rewrite and canvas and len(selected) / CHARS_PER_TOKEN > canvas:
        return {"applied": False, "reason": f"the selection (about {len(selected) // CHARS_PER_TOKEN} tokens) is "
                                            f"longer than the model's {canvas}-token canvas; select less"}
    gap_text = snapshot.text[:start] + snapshot.text[end:]
    options = session.options
    context = await context_for(
        gap_text, start, span.start.line, snapshot.language_id, snapshot.path,
        options.context.prefix_tokens, options.context.suffix_tokens, options.context.extra_tokens,
    )
    context.mode = "block" if "\n" in selected or not context.line_rest.strip() else "line"
    snippets = list(context.snippets)
    if instruction:
        snippets.append(ContextSnippet(path="instruction", text=instruction))
    request = FillRequest(
        prefix=context.prefix, suffix=context.suffix, language=snapshot.language_id, path=snapshot.path,
        context=snippets, mode=context.mode, candidates=1, deadline_ms=options.deadlines.rewrite_ms,  # type: ignore[arg-type]
        seed=options.completion.seed, document=f"{uri}#selection", version=snapshot.version, priority="rewrite",
        seed_canvas=selected if rewrite else None, keep_fixed=False,
    )
    title = "dgls: rewriting the selection" if rewrite else "dgls: filling the selection"
    async with _progress(session, title):
        result = await session.fill(f"{uri}#selection", request)
    session.publish_status()
    if result is None:
        return {"applied": False, "reason": "the engine gave no result (see the dgls log)"}
    suggestions = postprocess([result.text], context)
    new_text = suggestions[0].text if suggestions else ""
    if not new_text:  # an empty rewrite would delete the selection: never apply it
        reason = "the model proposed an empty rewrite; the selection is unchanged" if rewrite else \
            "the model proposed nothing to insert"
        return {"applied": False, "reason": reason}
    current = DocumentSnapshot.of(session.server.workspace, uri)
    if current is None or current.version != snapshot.version:
        session.show("[dgls] the document changed while dgls worked on the selection; nothing was applied",
                     types.MessageType.Info)
        return {"applied": False, "reason": "the document changed while dgls worked", "text": new_text}
    answer = await session.server.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(
        edit=_edit(session, uri, snapshot.version, span, new_text), label=title.replace("ing", ""),
    ))
    return {"applied": bool(answer.applied), "text": new_text, "reason": answer.failure_reason}


def _edit(session: Session, uri: str, version: int, span: types.Range, text: str) -> types.WorkspaceEdit:
    change = types.TextEdit(range=span, new_text=text)
    capabilities = session.server.client_capabilities.workspace
    edit_caps = capabilities.workspace_edit if capabilities is not None else None
    if edit_caps is not None and edit_caps.document_changes:
        return types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version), edits=[change],
        )])
    return types.WorkspaceEdit(changes={uri: [change]})


@contextlib.asynccontextmanager
async def _progress(session: Session, title: str) -> AsyncIterator[None]:
    """Work-done progress on the client's token (or one we create); cancelling it cancels the command."""
    params = current_command.get()
    token = params.work_done_token if params is not None else None
    progress = session.server.work_done_progress
    window = getattr(session.server.client_capabilities, "window", None)
    if token is None and window is not None and window.work_done_progress:
        token = f"dgls-selection-{next(_tokens)}"
        try:  # wait for the client to accept the token: only then can it cancel it
            await asyncio.wait_for(progress.create_async(token), timeout=5.0)
        except Exception:
            token = None
    if token is None:
        yield
        return
    progress.begin(token, types.WorkDoneProgressBegin(title=title, cancellable=True))
    task = asyncio.current_task()
    cancel_future = progress.tokens.get(token)
    if cancel_future is not None and task is not None:
        cancel_future.add_done_callback(lambda future: task.cancel() if future.cancelled() else None)
    try:
        yield
    finally:
        progress.end(token, types.WorkDoneProgressEnd())
        progress.tokens.pop(token, None)
