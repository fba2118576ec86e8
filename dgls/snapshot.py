"""An immutable view of one open document for one request, and LSP positions (UTF-16 by default) on it.

Text comes from the server's document sync (pygls' documents, edited by `dgls.document.apply_change`); a document
the client never opened has no snapshot (pygls would read it from disk: dgls completes only what the editor
shows). Lines and positions are LSP's (`dgls.document`): positions past the end of a line clamp to the line's
end, as the protocol says; positions past the last line have no offset (callers answer empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lsprotocol import types

from dgls import document


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
        opened = workspace.text_documents.get(unquote(uri))  # pygls keys documents by the unquoted URI
        if opened is None:
            return None
        encoding = getattr(opened.position_codec, "encoding", None) or types.PositionEncodingKind.Utf16
        return cls(
            uri=uri, version=opened.version or 0, text=opened.source,
            language_id=opened.language_id or "", path=opened.path or "", encoding=encoding,
        )

    def units(self, text: str) -> int:
        """The length of `text` in this document's position units (UTF-16 code units by default)."""
        return document.units(text, self.encoding)

    def offset_at(self, position: types.Position) -> int | None:
        """Character offset of an LSP position; columns past the line's end clamp to it."""
        return document.offset_at(self.text, position, self.encoding)

    def position_at(self, offset: int) -> types.Position:
        return document.position_at(self.text, offset, self.encoding)
