"""The typed-through cache and document positions (pure, no model)."""

from __future__ import annotations

from lsprotocol import types

from dgls.completion_cache import CompletionCache
from dgls.snapshot import DocumentSnapshot


def test_typing_through_a_suggestion_hits_the_cache() -> None:
    cache = CompletionCache()
    text = "def f(a):\n    return \n"
    offset = text.index("return ") + 7
    (item_id,) = cache.store("u", text, offset, [("a + 1", 0)])
    typed = text[:offset] + "a " + text[offset:]
    (hit,) = cache.lookup("u", typed, offset + 2)
    assert (hit.item_id, hit.text, hit.typed) == (item_id, "+ 1", 2)
    assert cache.lookup("u", typed, offset + 1) == []  # cursor not after what was typed
    assert cache.lookup("other", typed, offset + 2) == []
    diverged = text[:offset] + "b" + text[offset:]
    assert cache.lookup("u", diverged, offset + 1) == []
    changed_elsewhere = "# x\n" + typed
    assert cache.lookup("u", changed_elsewhere, offset + 6) == []
    fully_typed = text[:offset] + "a + 1" + text[offset:]
    assert cache.lookup("u", fully_typed, offset + 5) == []  # nothing left to suggest


def test_shown_suggestions_come_first_and_the_cache_is_bounded() -> None:
    cache = CompletionCache(max_entries=3)
    ids = cache.store("u", "x = ", 4, [("1", 0), ("2", 0)])
    cache.mark_shown(ids[0])
    assert [hit.text for hit in cache.lookup("u", "x = ", 4)] == ["1", "2"]
    cache.store("u", "y = ", 4, [("3", 0), ("4", 0)])
    assert len(cache.entries) == 3
    cache.forget("u")
    assert not cache.entries



def test_one_request_keeps_its_order_and_a_newer_request_comes_first() -> None:
    cache = CompletionCache()
    cache.store("u", "x = ", 4, [("best", 0), ("second", 0), ("third", 0)])  # one invoked request, best first
    assert [hit.text for hit in cache.lookup("u", "x = ", 4)] == ["best", "second", "third"]
    cache.store("u", "x = ", 4, [("newer", 0)])
    assert [hit.text for hit in cache.lookup("u", "x = ", 4)] == ["newer", "best", "second", "third"]

def snapshot(text: str) -> DocumentSnapshot:
    return DocumentSnapshot(uri="u", version=1, text=text, language_id="python", path="/x.py")


def test_positions_are_utf16_and_clamped() -> None:
    doc = snapshot("a😀b\nxy\n")
    assert doc.offset_at(types.Position(0, 3)) == 2  # the emoji is two UTF-16 units
    assert doc.offset_at(types.Position(0, 99)) == 3  # past the end of the line: its end
    assert doc.offset_at(types.Position(1, 1)) == 5
    assert doc.offset_at(types.Position(2, 0)) == 7  # the empty last line exists
    assert doc.offset_at(types.Position(3, 0)) is None  # past the end of the file
    assert doc.position_at(2) == types.Position(0, 3)
    assert snapshot("ab\r\ncd").offset_at(types.Position(0, 9)) == 2  # CRLF: the line ends before \r
