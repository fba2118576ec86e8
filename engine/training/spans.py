"""Fill-in-the-middle spans: where a source file is cut into (prefix, middle, suffix).

Four kinds, each modelling a moment in an editor:
- ``line``: the rest of one line (cursor inside or at the start of a line), sometimes with its newline;
- ``block``: whole lines covering one or more statements, cut at syntax boundaries found by tree-sitter
  (Python's ``ast`` when no tree-sitter grammar is installed; random consecutive lines where the file
  does not parse);
- ``chars``: a random character span;
- ``empty``: nothing to insert (cursor at the end of a complete line, or anywhere).

Knows nothing about tokens: fitting a middle into the canvas happens in ``examples.py``.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

KINDS: tuple[str, ...] = ("line", "block", "chars", "empty")
KIND_WEIGHTS: tuple[float, ...] = (0.45, 0.25, 0.15, 0.15)


@dataclass(slots=True, frozen=True)
class Span:
    """A cut of ``text`` into ``text[:start]`` + ``text[start:end]`` + ``text[end:]``."""

    start: int
    end: int
    kind: str

    def parts(self, text: str) -> tuple[str, str, str]:
        """(prefix, middle, suffix)."""
        return text[: self.start], text[self.start : self.end], text[self.end :]


@cache
def _python_parser() -> Any | None:
    """A tree-sitter parser for Python: the language pack's, else the tree-sitter-python wheel's, else None."""
    try:
        from tree_sitter_language_pack import get_parser

        return get_parser("python")
    except Exception:  # noqa: BLE001 - the pack downloads grammars and fails offline
        pass
    try:
        import tree_sitter
        import tree_sitter_python

        return tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))
    except Exception:  # noqa: BLE001
        return None


def statement_lines(text: str, language: str = "python") -> list[tuple[int, int]]:
    """(first_line, last_line) of every statement-like syntax node that starts a line, or [] if it won't parse."""
    if language != "python":
        return []
    parser = _python_parser()
    if parser is None:
        return _ast_statement_lines(text)
    tree = parser.parse(text.encode("utf-8"))
    if tree.root_node.has_error:
        return []
    found: list[tuple[int, int]] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        for child in node.named_children:
            if child.type in ("block", "module", "decorated_definition", "class_definition",
                              "function_definition") or child.type.endswith("statement"):
                found.append((child.start_point[0], child.end_point[0]))
            if child.child_count and child.end_point[0] > child.start_point[0]:
                stack.append(child)
    return found


def _ast_statement_lines(text: str) -> list[tuple[int, int]]:
    """The ``ast`` fallback of ``statement_lines``: every statement's (first_line, last_line), 0-based."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    return [(node.lineno - 1, (node.end_lineno or node.lineno) - 1) for node in ast.walk(tree)
            if isinstance(node, ast.stmt)]


def _line_offsets(text: str) -> list[int]:
    offsets = [0]
    for index, char in enumerate(text):
        if char == "\n":
            offsets.append(index + 1)
    return offsets


def _line_span(text: str, offsets: list[int], rng: random.Random) -> Span | None:
    candidates = [i for i in range(len(offsets) - 1) if text[offsets[i] : offsets[i + 1]].strip()]
    if not candidates:
        return None
    line = rng.choice(candidates)
    begin, end_with_newline = offsets[line], offsets[line + 1]
    end = end_with_newline - 1
    content = text[begin:end]
    indent = begin + len(content) - len(content.lstrip())
    mode = rng.random()
    if mode < 0.3:  # whole line with indentation and newline (human-eval single-line shape)
        return Span(begin, end_with_newline, "line")
    if mode < 0.5:  # after the indentation, to the end of the line
        return Span(indent, end, "line")
    cursor = rng.randint(indent, max(indent, end - 1))
    return Span(cursor, end, "line")


def _block_span(text: str, offsets: list[int], statements: list[tuple[int, int]], rng: random.Random) -> Span:
    last_line = len(offsets) - 2
    multi = [(a, b) for a, b in statements if b > a and b <= last_line]
    if multi and rng.random() < 0.85:
        first, last = rng.choice(multi)
    else:
        first = rng.randint(0, max(0, last_line))
        last = min(last_line, first + rng.randint(1, 5))
    return Span(offsets[first], offsets[last + 1], "block")


def _char_span(text: str, rng: random.Random) -> Span:
    start = rng.randrange(len(text))
    return Span(start, min(len(text), start + rng.randint(1, 120)), "chars")


def _empty_span(text: str, offsets: list[int], rng: random.Random) -> Span:
    if rng.random() < 0.7 and len(offsets) > 1:  # end of a complete line
        cursor = offsets[rng.randrange(1, len(offsets))] - 1
    else:
        cursor = rng.randrange(len(text) + 1)
    return Span(cursor, cursor, "empty")


def cut(text: str, rng: random.Random, kind: str | None = None, language: str = "python",
        statements: list[tuple[int, int]] | None = None) -> Span | None:
    """One random FIM span of ``text``; ``kind`` forces one of ``KINDS``. None for texts with no lines."""
    if not text.strip():
        return None
    kind = kind or rng.choices(KINDS, KIND_WEIGHTS)[0]
    offsets = _line_offsets(text if text.endswith("\n") else text + "\n")
    makers: dict[str, Callable[[], Span | None]] = {
        "line": lambda: _line_span(text, offsets, rng),
        "block": lambda: _block_span(text, offsets, statements if statements is not None
                                     else statement_lines(text, language), rng),
        "chars": lambda: _char_span(text, rng),
        "empty": lambda: _empty_span(text, offsets, rng),
    }
    span = makers[kind]()
    if span is None:
        return None
    return Span(min(span.start, len(text)), min(span.end, len(text)), span.kind)
