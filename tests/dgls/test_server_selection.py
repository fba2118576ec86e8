"""End to end: fill and rewrite a selection through code actions, `workspace/executeCommand` and the client's
`workspace/applyEdit` (answered by the test client), on the shipped default model. Every applied edit is checked
against what the engine itself answers for the request the server makes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lsprotocol import types

from engine.fill import ContextSnippet
from tests.dgls.conftest import engine_answers, lsp_client, offset_of, open_document, server_context

URI = "file:///work/demo/calc.py"
TEXT = (
    'def add(a, b):\n    """Add two numbers, integers or floats, and return their sum."""\n'
    "    total = a + b\n    return total\n\n\ndef mean(values):\n    return sum(values) / len(values)\n"
)
SELECTION = types.Range(types.Position(2, 4), types.Position(2, 17))  # "total = a + b"
FILL_SELECTIONS = [  # gaps to fill until the default model proposes something that survives post-processing
    SELECTION,
    types.Range(types.Position(7, 11), types.Position(7, 36)),  # "sum(values) / len(values)"
    types.Range(types.Position(2, 12), types.Position(2, 17)),  # "a + b"
]


def expected_edit(
    socket: Any, span: types.Range, rewrite: bool, seed: int = 0, instruction: str = "", uri: str = URI
) -> str:
    """The oracle: the engine's answer, post-processed, for the request the server makes for `span` of TEXT (the
    first for its document, so the engine does not warm-start it from an earlier one)."""
    start = offset_of(TEXT, span.start.line, span.start.character)
    end = offset_of(TEXT, span.end.line, span.end.character)
    selected = TEXT[start:end]
    context, path = server_context(uri, "python", TEXT[:start] + TEXT[end:], start, span.start.line)
    context.mode = "block" if "\n" in selected or not context.line_rest.strip() else "line"
    extra = [ContextSnippet(path="instruction", text=instruction)] if instruction else []
    answers = engine_answers(socket, context, "python", path, 1, seed, extra, selected if rewrite else None)
    return answers[0] if answers else ""


def set_seed(client: Any, seed: int) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={**client.test_options, "completion": {"seed": seed}}))


async def code_action_commands(client: Any, span: types.Range) -> dict[str, types.Command]:
    """The commands of the code actions at `span`, read from the raw reply (lsprotocol's client-side hook
    mistakes any CodeAction that has a command for a Command)."""
    params = types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=URI), range=span,
        context=types.CodeActionContext(diagnostics=[]),
    )
    message_id = f"code-action-{id(span)}"
    future = client.protocol.send_request(types.TEXT_DOCUMENT_CODE_ACTION, params, msg_id=message_id)
    client.protocol._result_types[message_id] = None  # keep the reply as plain JSON
    actions = await asyncio.wrap_future(future)
    commands = {}
    for action in actions or []:
        assert action["kind"] == types.CodeActionKind.RefactorRewrite
        command = action["command"]
        commands[command["command"]] = types.Command(
            title=command["title"], command=command["command"], arguments=command["arguments"]
        )
    return commands


def edit_of(params: types.ApplyWorkspaceEditParams) -> tuple[int | None, types.TextEdit]:
    (change,) = params.edit.document_changes
    (edit,) = change.edits
    return change.text_document.version, edit


async def test_code_actions_only_for_a_non_empty_selection(options) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        commands = await code_action_commands(client, SELECTION)
        assert set(commands) == {"dgls.fillSelection", "dgls.rewriteSelection"}
        empty = types.Range(SELECTION.start, SELECTION.start)
        assert await code_action_commands(client, empty) == {}


async def test_rewrite_selection_applies_one_versioned_edit(options, engine_socket) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT, version=7)
        command = (await code_action_commands(client, SELECTION))["dgls.rewriteSelection"]
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=command.command, arguments=command.arguments))
        assert result["applied"] is True
        (params,) = client.recorder.edits
        version, edit = edit_of(params)
        assert version == 7 and edit.range == SELECTION and edit.new_text == result["text"]
        assert edit.new_text == await asyncio.to_thread(expected_edit, engine_socket, SELECTION, rewrite=True)


async def test_fill_selection_with_an_instruction(options, engine_socket) -> None:
    instruction = "sum the arguments"
    async with lsp_client(options) as client:
        tried: list[tuple[types.Range, int, dict[str, Any]]] = []
        for seed in range(3):
            set_seed(client, seed)
            for index, span in enumerate(FILL_SELECTIONS):
                uri = f"file:///work/demo/fill{seed}-{index}.py"  # a document per fill: no warm start from another
                open_document(client, uri, TEXT)
                argument = {"uri": uri, "range": client.protocol._converter.unstructure(span), "version": 1,
                            "instruction": instruction}
                result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
                    command="dgls.fillSelection", arguments=[argument]))
                expected = await asyncio.to_thread(
                    expected_edit, engine_socket, span, False, seed, instruction, uri)
                tried.append((span, seed, result))
                if result["applied"]:
                    break
                assert result["reason"] == "the model proposed nothing to insert" and expected == "", tried
            if result["applied"]:
                break
        assert result["applied"] is True, f"no fill survived post-processing on the default model: {tried}"
        (params,) = client.recorder.edits  # refused fills sent no edit
        version, edit = edit_of(params)
        assert version == 1 and edit.range == span and edit.new_text == result["text"] == expected
        assert edit.new_text.strip()


@pytest.mark.parametrize(
    "arguments, reason",
    [
        ([{"uri": "file:///not/open.py", "range": {"start": {"line": 0, "character": 0},
                                                  "end": {"line": 0, "character": 1}}}], "not open"),
        ([{"uri": URI, "range": {"start": {"line": 0, "character": 3}, "end": {"line": 0, "character": 3}}}],
         "empty"),
        ([{"uri": URI, "range": {"start": {"line": 90, "character": 0}, "end": {"line": 91, "character": 0}}}],
         "outside"),
        ([{"uri": URI, "version": 99, "range": {"start": {"line": 0, "character": 0},
                                                "end": {"line": 0, "character": 3}}}], "changed"),
        ([{"uri": URI, "range": {"start": {"line": 0, "character": 0}, "end": {"line": 8, "character": 0}}}],
         "canvas"),  # the whole file: longer than the default model's 32-token canvas
    ],
)
async def test_selection_commands_refuse_bad_selections(options, arguments, reason) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="dgls.rewriteSelection", arguments=arguments))
        assert result["applied"] is False and reason in result["reason"]
        assert client.recorder.edits == []


async def test_malformed_command_arguments_are_a_jsonrpc_error(options) -> None:
    async with lsp_client(options) as client:
        with pytest.raises(Exception, match="uri"):
            await client.workspace_execute_command_async(types.ExecuteCommandParams(
                command="dgls.fillSelection", arguments=[{"range": 3}]))
