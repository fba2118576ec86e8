"""Incremental parsing: a document's next parse starts from its last tree, and must give the full parse's tree."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from dgls import syntax
from dgls.context import build_context

SOURCE = (Path(__file__).resolve().parents[2] / "dgls" / "context.py").read_text(encoding="utf-8")


def shape(tree) -> list[tuple[str, int, int, tuple[int, int], tuple[int, int]]]:
    """Every node of the tree, with its byte and point spans, in document order."""
    nodes, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        nodes.append((node.type, node.start_byte, node.end_byte, tuple(node.start_point), tuple(node.end_point)))
        stack.extend(reversed(node.children))
    return nodes


def test_edits_reparse_to_the_same_tree_as_a_full_parse() -> None:
    parser = syntax.parser_for("python")
    rng = random.Random(0)
    text = SOURCE
    syntax.parse(parser, text.encode(), document="edits.py")
    pieces = ["x", "(", "):\n    ", "é", "\n", "\"\"\"", "  ", "lambda: 0", "🙂"]
    for step in range(60):  # insertions, deletions and replacements anywhere, multi-byte characters included
        at = rng.randrange(len(text))
        cut = rng.choice([0, 0, 1, 5, 40])
        text = text[:at] + (rng.choice(pieces) if step % 3 else "") + text[at + cut :]
        data = text.encode("utf-8")
        incremental = syntax.parse(parser, data, document="edits.py")
        assert shape(incremental) == shape(parser.parse(data)), f"step {step}"


def test_the_edit_spans_exactly_the_changed_bytes() -> None:
    old, new = b"ab\ncdef\ngh", b"ab\ncdXYf\ngh"
    edit = syntax.edit_between(old, new)
    assert (edit["start_byte"], edit["old_end_byte"], edit["new_end_byte"]) == (5, 6, 7)
    assert edit["start_point"] == (1, 2) and edit["old_end_point"] == (1, 3) and edit["new_end_point"] == (1, 4)
    same = syntax.edit_between(b"abc", b"abc")
    assert same["start_byte"] == same["old_end_byte"] == same["new_end_byte"] == 3
    grown = syntax.edit_between(b"aaa", b"aaaa")  # repeated bytes: prefix and suffix never overlap
    assert grown["old_end_byte"] >= grown["start_byte"] and grown["new_end_byte"] - grown["start_byte"] == 1


def test_contexts_built_from_many_threads_equal_the_sequential_ones() -> None:
    """The server builds contexts in a thread pool; one shared parser must not mix up their trees."""
    cursors = [SOURCE.index(marker) for marker in ("def build_context", "def _previous_line", "return context")]
    texts = [SOURCE[:c] + "x" * k + SOURCE[c:] for k in range(4) for c in cursors]
    expected = [build_context(t, len(t) // 2, t[: len(t) // 2].count("\n"), "python", "same.py") for t in texts]
    results: dict[int, object] = {}

    def work(index: int) -> None:
        text = texts[index]
        results[index] = build_context(text, len(text) // 2, text[: len(text) // 2].count("\n"), "python", "same.py")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(texts))] == expected
