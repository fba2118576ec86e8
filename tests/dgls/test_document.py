"""LSP lines and positions (`dgls.document`) against a plain editor model, and the server applying `didChange`
with them: an edit after a form feed lands where the editor made it (pygls' own sync put it a line early)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from lsprotocol import types
from pygls.workspace import TextDocument

from dgls import document
from dgls.server import create_server

UTF16 = types.PositionEncodingKind.Utf16
UTF8 = types.PositionEncodingKind.Utf8
UTF32 = types.PositionEncodingKind.Utf32
PIECES = ["a", "bc", " ", "\t", "\n", "\r\n", "\r", "\x0c", "\u2028", "\x85", "é", "😀", "e\u0301", "if x:", "  "]


def editor_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of every line, the way an editor splits them: at \\n, \\r\\n and \\r, one character at a time."""
    lines, start, index = [], 0, 0
    while index < len(text):
        if text[index] in "\r\n":
            lines.append((start, index))
            index += 2 if text[index : index + 2] == "\r\n" else 1
            start = index
        else:
            index += 1
    lines.append((start, len(text)))
    return lines


def code_units(char: str, encoding: str) -> int:
    if encoding == UTF8:
        return len(char.encode("utf-8"))
    if encoding == UTF16:
        return len(char.encode("utf-16-le")) // 2
    return 1


def editor_offset(text: str, position: types.Position, encoding: str) -> int | None:
    lines = editor_lines(text)
    if position.line >= len(lines) or position.character < 0:
        return None
    start, end = lines[position.line]
    units = 0
    for index in range(start, end):
        if units >= position.character:
            return index
        units += code_units(text[index], encoding)
    return end


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 30)))


def test_offsets_and_positions_match_an_editor() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text, encoding = random_text(rng), rng.choice([UTF16, UTF8, UTF32])
        lines = editor_lines(text)
        position = types.Position(line=rng.randrange(0, len(lines) + 2), character=rng.randrange(0, 12))
        expected = editor_offset(text, position, encoding)
        assert document.offset_at(text, position, encoding) == expected, (text, position, encoding)
        if expected is not None and (expected == 0 or text[expected - 1 : expected + 1] != "\r\n"):
            back = document.position_at(text, expected, encoding)
            assert editor_offset(text, back, encoding) == expected, (text, expected, back)


def test_changes_are_applied_where_the_editor_made_them() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        text, encoding = random_text(rng), rng.choice([UTF16, UTF8, UTF32])
        opened = TextDocument("file:///x.py", text)
        opened._position_codec.encoding = encoding
        lines = editor_lines(text)
        start = types.Position(line=rng.randrange(0, len(lines) + 1), character=rng.randrange(0, 8))
        end = types.Position(line=start.line + rng.randrange(0, 2), character=rng.randrange(0, 8))
        if (end.line, end.character) < (start.line, start.character):
            start, end = end, start
        insert = random_text(rng)[:5]
        first = editor_offset(text, start, encoding)
        last = editor_offset(text, end, encoding)
        first = len(text) if first is None else first
        last = len(text) if last is None else max(last, first)
        document.apply_change(opened, types.TextDocumentContentChangePartial(
            range=types.Range(start=start, end=end), text=insert))
        assert opened.source == text[:first] + insert + text[last:], (text, start, end, insert)


def test_a_whole_document_change_replaces_the_text() -> None:
    opened = TextDocument("file:///x.py", "old\ntext")
    document.apply_change(opened, types.TextDocumentContentChangeWholeDocument(text="new"))
    assert opened.source == "new"


async def test_the_server_applies_edits_after_a_form_feed_on_the_editors_line() -> None:
    """The server's copy of the document is what the editor shows, after edits on lines that follow characters
    Python's `splitlines` breaks at but editors do not (pygls' own sync inserted "X" a line early here)."""
    server = create_server(Path("/nonexistent/engine.sock"))
    protocol = server.protocol
    sent: list[bytes] = []

    class Writer:
        def write(self, data: bytes) -> None:
            sent.append(data)

        def close(self) -> None:
            pass

    protocol.set_writer(Writer())
    protocol.handle_message(types.InitializeRequest(id=1, params=types.InitializeParams(
        capabilities=types.ClientCapabilities())))
    await asyncio.sleep(0)
    uri = "file:///tmp/form_feed.py"
    text = "def a():\n    pass\n\x0c\ndef b():\r\n    return 1\u2028\n"
    protocol.handle_message(types.DidOpenTextDocumentNotification(params=types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text))))
    for version, (line, character, insert) in enumerate([(3, 4, "X"), (5, 0, "Y"), (4, 99, "Z")], start=2):
        at = types.Position(line=line, character=character)
        protocol.handle_message(types.DidChangeTextDocumentNotification(params=types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at),
                                                                    text=insert)])))
    await asyncio.sleep(0)
    opened = server.workspace.text_documents[uri]
    assert opened.source == "def a():\n    pass\n\x0c\ndef Xb():\r\n    return 1\u2028Z\nY"
    assert opened.version == 4
    assert sent  # the initialize answer: the protocol really ran


def test_an_offset_inside_a_crlf_break_is_its_lines_end() -> None:
    text = "ab\r\ncd\r\n"
    assert document.position_at(text, 3) == types.Position(line=0, character=2)  # between "\r" and "\n"
    assert document.position_at(text, 4) == types.Position(line=1, character=0)
    assert document.position_at("ab\rcd", 3) == types.Position(line=1, character=0)  # a lone "\r" breaks the line
