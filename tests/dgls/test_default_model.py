"""End to end on the shipped default model (skipped until `engine/default_model/` holds one): inline completion on
Python and JavaScript through a real engine, with the server's post-processing on real model output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types

from tests.dgls.conftest import DEFAULT_MODEL, inline_params, lsp_client, open_document, server_options, stop_engine

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "config.json").is_file(), reason="no shipped default model in engine/default_model"
)


@pytest.fixture(scope="module")
def default_socket(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = Path(tmp_path_factory.mktemp("default-engine")) / "engine.sock"
    yield path
    stop_engine(path)


@pytest.mark.parametrize(
    "uri, language, text, line, column",
    [
        ("file:///work/demo/m.py", "python", "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n", 1, 11),
        ("file:///work/demo/m.js", "javascript", "function add(a, b) {\n  return \n}\n", 1, 9),
    ],
)
async def test_inline_completion_on_the_default_model(default_socket, uri, language, text, line, column) -> None:
    options = server_options(DEFAULT_MODEL, default_socket)
    async with lsp_client(options) as client:
        open_document(client, uri, text, language)
        result = await client.text_document_inline_completion_async(inline_params(uri, line, column, invoked=True))
        assert result is not None and len(result.items) <= 3
        for item in result.items:
            assert item.insert_text.strip() and "\n" not in item.insert_text  # line mode after `return `
            assert item.range.start == types.Position(line, column) and item.range.end.line == line
