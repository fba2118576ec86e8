"""Suggestions that survive the user typing through them: a cache keyed by the text before the cursor.

An entry remembers where a suggestion was made (document, offset, the text just before and after the cursor,
the document length). A later request whose document is the old one plus characters typed at the cursor that
match the start of the suggestion is answered with the rest of it, instantly and without an engine call.
Comparisons look at a bounded window (`KEY_CHARS`) plus the exact length, so a 20 MB document costs no more
than a small one. Pure: no LSP, no engine.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

KEY_CHARS = 2048


@dataclass(slots=True)
class CachedSuggestion:
    item_id: int
    uri: str
    offset: int
    document_length: int
    before: str  # KEY_CHARS before the cursor
    after: str  # KEY_CHARS after the cursor
    text: str
    overwrite: int
    shown: bool = False
    batch: int = 0  # the `store` call that made it: one request's suggestions, best first


@dataclass(slots=True)
class CacheHit:
    item_id: int
    text: str  # what is left of the suggestion after what was typed
    overwrite: int
    typed: int


class CompletionCache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[int, CachedSuggestion] = OrderedDict()
        self.ids = itertools.count(1)
        self.batches = itertools.count(1)

    def store(self, uri: str, text: str, offset: int, suggestions: list[tuple[str, int]]) -> list[int]:
        """Remember suggestions (text, overwrite) made at `offset` of `text`; returns their item ids."""
        before, after = text[max(0, offset - KEY_CHARS) : offset], text[offset : offset + KEY_CHARS]
        ids, batch = [], next(self.batches)
        for suggestion, overwrite in suggestions:
            item_id = next(self.ids)
            self.entries[item_id] = CachedSuggestion(
                item_id, uri, offset, len(text), before, after, suggestion, overwrite, batch=batch
            )
            ids.append(item_id)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return ids

    def lookup(self, uri: str, text: str, offset: int) -> list[CacheHit]:
        """Suggestions still valid at `offset` of `text`: shown ones first, then the newest request's first, each
        request's in its own order (best first)."""
        hits = []
        for entry in reversed(self.entries.values()):
            typed = offset - entry.offset
            if entry.uri != uri or typed < 0 or typed >= len(entry.text):
                continue
            if len(text) != entry.document_length + typed:
                continue
            if text[offset - typed : offset] != entry.text[:typed]:
                continue
            if text[max(0, entry.offset - KEY_CHARS) : entry.offset] != entry.before:
                continue
            if text[offset : offset + KEY_CHARS] != entry.after:
                continue
            rank = (not entry.shown, -entry.batch, entry.item_id)
            hits.append((rank, CacheHit(entry.item_id, entry.text[typed:], entry.overwrite, typed)))
        hits.sort(key=lambda pair: pair[0])
        unique: dict[tuple[str, int], CacheHit] = {}
        for _, hit in hits:
            unique.setdefault((hit.text, hit.overwrite), hit)
        return list(unique.values())

    def mark_shown(self, item_id: int) -> CachedSuggestion | None:
        entry = self.entries.get(item_id)
        if entry is not None:
            entry.shown = True
            self.entries.move_to_end(item_id)
        return entry

    def forget(self, uri: str) -> None:
        for item_id in [key for key, entry in self.entries.items() if entry.uri == uri]:
            del self.entries[item_id]
