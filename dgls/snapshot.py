"""An immutable view of one open document for one request, and LSP positions (UTF-16 by default) on it.

Text comes from pygls' own document sync; a document the client never opened has no snapshot (pygls would read
it from disk: dgls completes only what the editor shows). Positions past the end of a line clamp to the line's
end, as the protocol says; positions past the last line have no offset (callers answer empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lsprotocol import types


@dataclass(slots=True, frozen=True)
class DocumentSnapshot:
    uri: str
    version: int
    text: str
    language_id: str
    path: str
    encoding: str = types.PositionEncodingKind.Utf16

    @classmethod
    def of(cls, workspace: Any, uri: str) -> DocumentSnapshot | None:
        """The open document `uri`, or None when the client has not opened it."""
        document = workspace.text_documents.get(unquote(uri))  # pygls keys documents by the unquoted URI
        if document is None:
            return None
        encoding = getattr(document.position_codec, "encoding", None) or types.PositionEncodingKind.Utf16
        return cls(
            uri=uri, version=document.version or 0, text=document.source,
            language_id=document.language_id or "", path=document.path or "", encoding=encoding,
        )

    def units(self, text: str) -> int:
        """The length of `text` in this document's position units (UTF-16 code units by default)."""
        if self.encoding == types.PositionEncodingKind.Utf32:
            return len(text)
        if self.encoding == types.PositionEncodingKind.Utf8:
            return len(text.encode("utf-8", "surrogatepass"))
        return len(text.encode("utf-16-le", "surrogatepass")) // 2

    def line_bounds(self, line: int) -> tuple[int, int] | None:
        """(start, end) offsets of 0-based `line` without its line break; None past the last line."""
        if line < 0:
            return None
        start = 0
        for _ in range(line):
            start = self.text.find("\n", start) + 1
            if start == 0:
                return None
        end = self.text.find("\n", start)
        end = len(self.text) if end < 0 else end
        if end > start and self.text[end - 1] == "\r":
            end -= 1
        return start, end

    def offset_at(self, position: types.Position) -> int | None:
        """Character offset of an LSP position; columns past the line's end clamp to it."""
        bounds = self.line_bounds(position.line)
        if bounds is None or position.character < 0:
            return None
        start, end = bounds
        if self.encoding == types.PositionEncodingKind.Utf32:
            return min(start + position.character, end)
        units = 0
        for index in range(start, end):
            if units >= position.character:
                return index
            units += self.units(self.text[index])
        return end

    def position_at(self, offset: int) -> types.Position:
        line_start = self.text.rfind("\n", 0, offset) + 1
        line = self.text.count("\n", 0, line_start)
        return types.Position(line=line, character=self.units(self.text[line_start:offset]))
