"""End to end: fill and rewrite a selection through code actions, `workspace/executeCommand` and the client's
`workspace/applyEdit` (answered by the test client), on the tiny model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lsprotocol import types

from tests.dgls.conftest import lsp_client, open_document, server_options

URI = "file:///work/demo/calc.py"
TEXT = (
    'def add(a, b):\n    """Add two numbers, integers or floats, and return their sum."""\n'
    "    total = a + b\n    return total\n"
)
SELECTION = types.Range(types.Position(2, 4), types.Position(2, 17))  # "total = a + b"


@pytest.fixture
def options(lsp_model_dir, engine_socket) -> dict[str, Any]:
    return server_options(lsp_model_dir, engine_socket)


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


async def test_rewrite_selection_applies_one_versioned_edit(options) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT, version=7)
        command = (await code_action_commands(client, SELECTION))["dgls.rewriteSelection"]
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=command.command, arguments=command.arguments))
        assert result["applied"] is True
        (params,) = client.recorder.edits
        version, edit = edit_of(params)
        assert version == 7 and edit.range == SELECTION and edit.new_text == result["text"]


async def test_fill_selection_with_an_instruction(options) -> None:
    async with lsp_client(options) as client:
        open_document(client, URI, TEXT)
        results = []
        for seed in range(8):  # the gibberish model sometimes proposes nothing insertable
            client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={**options, "completion": {"seed": seed}}))
            argument = {"uri": URI, "range": client.protocol._converter.unstructure(SELECTION), "version": 1,
                        "instruction": "sum the arguments"}
            result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
                command="dgls.fillSelection", arguments=[argument]))
            results.append(result)
            if result["applied"]:
                break
        assert results[-1]["applied"] is True, results
        assert all(r["applied"] or r["reason"] == "the model proposed nothing to insert" for r in results)
        version, edit = edit_of(client.recorder.edits[-1])
        assert version == 1 and edit.range == SELECTION and edit.new_text.strip()


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
        ([{"uri": URI, "range": {"start": {"line": 0, "character": 0}, "end": {"line": 4, "character": 0}}}],
         "canvas"),  # the whole file: longer than the tiny model's 16-token canvas
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
