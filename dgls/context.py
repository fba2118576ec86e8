"""What the model sees for one completion: prefix/suffix windows, extra snippets, line or block mode.

`build_context(text, offset, line, ...)` is a pure function of the document. Windows are sized in tokens,
estimated as characters / 4 (dgls has no tokenizer and must not load one), and start on an absolute line number
that is a multiple of `LINE_GRID`, so the window stays identical while the user types on one line (the engine's
prompt cache then reuses the encoded prefix). When the enclosing function/class headers or the file's imports
lie before the window they are sent as `ContextSnippet`s. The mode comes from the syntax at the cursor:
mid-expression means one line, an empty line in a block means a block. Knows nothing about LSP or sockets.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from dgls import brackets, syntax
from engine.fill import ContextSnippet

CHARS_PER_TOKEN = 4
LINE_GRID = 8
MAX_PARSE_CHARS = 1_000_000  # larger documents: only the windows are parsed
BLOCK_OPENERS = (":", "{", "=>")
SURROGATES = re.compile("[\ud800-\udfff]")
# What a keystroke may type or delete in the middle of a line without changing the syntax facts before it:
# no brackets, quotes, comment or preprocessor marks (`*` after a `/` opens a C comment), backslashes, tabs or
# line breaks.
WITHIN_LINE = re.compile(r"[\w .,=+\-<>!&|^~%@:?$]*")


@dataclass(slots=True)
class CompletionContext:
    prefix: str
    suffix: str
    mode: str
    snippets: list[ContextSnippet] = field(default_factory=list)
    line_prefix: str = ""  # the cursor line up to the cursor
    line_rest: str = ""  # the cursor line after the cursor
    previous_line: str = ""  # the last non-blank line before the cursor line
    block_indent: str = ""  # the indentation a new line at the cursor belongs at
    grammar: str | None = None
    open_brackets: list[str] = field(default_factory=list)


def clean_text(text: str) -> str:
    """Lone surrogates (possible in JSON strings) become U+FFFD so the text can always be sent as UTF-8."""
    return SURROGATES.sub("\ufffd", text)


def window_start(text: str, offset: int, line: int, budget_chars: int) -> int:
    """Offset where the prefix window starts: a line start on the grid, within the budget where possible."""
    start = text.rfind("\n", 0, offset) + 1
    if offset - start > budget_chars:
        return offset - budget_chars  # one huge line: cut it
    first = line
    while start > 0:
        previous = text.rfind("\n", 0, start - 1) + 1
        if offset - previous > budget_chars:
            break
        start, first = previous, first - 1
    if first > 0 and first % LINE_GRID:
        for _ in range(min(LINE_GRID - first % LINE_GRID, line - first)):
            start = text.find("\n", start) + 1
    return start


def window_end(text: str, offset: int, budget_chars: int) -> int:
    """Offset where the suffix window ends: a line end within the budget (the cursor line's end at least)."""
    end = text.find("\n", offset)
    if end < 0:
        return len(text)
    if end - offset > budget_chars:
        return offset + budget_chars
    while True:
        following = text.find("\n", end + 1)
        following = len(text) if following < 0 else following
        if following - offset > budget_chars or following == end:
            return end
        end = following
        if end == len(text):
            return end


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def indent_unit(text: str) -> str:
    """The file's indentation step: a tab, or the most common small run of spaces (4 when unsure)."""
    counts: dict[int, int] = {}
    for line in text.split("\n")[:400]:
        ws = indentation(line)
        if ws.startswith("\t"):
            return "\t"
        if ws and line.strip():
            counts[len(ws)] = counts.get(len(ws), 0) + 1
    for size in (2, 4, 8, 3):
        if counts.get(size):
            return " " * size
    return "    "


def build_context(
    text: str,
    offset: int,
    line: int,
    language_id: str = "",
    path: str = "",
    prefix_tokens: int = 256,
    suffix_tokens: int = 128,
    extra_tokens: int = 256,
) -> CompletionContext:
    """The context for a completion at `offset` (on 0-based `line`) of `text`."""
    start = window_start(text, offset, line, prefix_tokens * CHARS_PER_TOKEN)
    end = window_end(text, offset, suffix_tokens * CHARS_PER_TOKEN)
    prefix, suffix = text[start:offset], text[offset:end]
    line_start, line_end = _line_span(text, offset)
    line_prefix = text[line_start:offset]
    line_rest = text[offset:line_end].removesuffix("\r")  # CRLF: not the line's
    previous_line = _previous_line(text, line_start)
    grammar = syntax.grammar_for(language_id, path)
    hash_comments = grammar == "python" or (grammar is None and language_id in ("shellscript", "ruby", "yaml"))
    open_brackets = brackets.scan(prefix, hash_comments=hash_comments)
    unit = indent_unit(prefix + suffix)
    context = CompletionContext(
        prefix=clean_text(prefix), suffix=clean_text(suffix), mode="line", line_prefix=line_prefix,
        line_rest=line_rest, previous_line=previous_line, grammar=grammar, open_brackets=open_brackets,
        block_indent=_block_indent(line_prefix, previous_line, unit),
    )
    tree_facts = _facts_while_typing(text, offset, (start, end), (line_start, line_end), grammar, path)
    context.mode = decide_mode(line_prefix, line_rest, tree_facts.get("cursor_kind"), open_brackets)
    context.snippets = _snippets(tree_facts, path, extra_tokens * CHARS_PER_TOKEN)
    return context


def _previous_line(text: str, line_start: int) -> str:
    end = line_start - 1
    while end > 0:
        begin = text.rfind("\n", 0, end) + 1
        candidate = text[begin:end]
        if candidate.strip():
            return candidate
        end = begin - 1
    return ""


def _block_indent(line_prefix: str, previous_line: str, unit: str) -> str:
    """Where a new line at the cursor is indented: the cursor line's own indentation when it has some text or
    whitespace, else the previous line's, one step deeper after a block opener."""
    if line_prefix and not line_prefix.strip():
        return line_prefix
    if line_prefix.strip():
        base = indentation(line_prefix)
        return base + unit if line_prefix.rstrip().endswith(BLOCK_OPENERS) else base
    base = indentation(previous_line)
    return base + unit if previous_line.rstrip().endswith(BLOCK_OPENERS) else base


def decide_mode(line_prefix: str, line_rest: str, cursor_kind: str | None, open_brackets: list[str]) -> str:
    """'line' mid-expression or mid-line; 'block' on an empty line in a block or right after a block opener."""
    if line_rest.strip() and brackets.leading_closers(line_rest) != line_rest.replace(" ", "").rstrip(";,"):
        return "line"  # real code after the cursor on this line
    if line_prefix.strip():
        ends_block = line_prefix.rstrip().endswith(BLOCK_OPENERS) and not line_rest.strip()
        return "block" if ends_block else "line"
    if cursor_kind == "expression":
        return "line"
    if cursor_kind is None and open_brackets and open_brackets[-1] in "([":
        return "line"  # no usable tree: inside an open call or list
    return "block"


@dataclass(slots=True)
class _Parsed:
    """The facts of the last parse of a document, with what they were read from."""

    text: str
    offset: int  # the cursor
    window: int  # where the prefix window started
    line_start: int  # the cursor line's start and end
    line_end: int
    facts: dict[str, Any]


_recent_facts: collections.OrderedDict[tuple[str | None, str], _Parsed] = collections.OrderedDict()
_facts_lock = threading.Lock()


def _facts_while_typing(text: str, offset: int, window: tuple[int, int], line: tuple[int, int],
                        grammar: str | None, path: str) -> dict[str, Any]:
    """`_syntax_facts`, or those of the document's last parse when nothing they depend on can have changed since
    (`_typed_within_line`): a keystroke in the middle of a line skips the tree-sitter parse (~0.3-0.5 ms a
    keystroke in a 15 KB file on the benchmark's machine, where the language server wakes up cold)."""
    (start, end), (line_start, line_end) = window, line
    if not path:
        return _syntax_facts(text, offset, start, end, grammar, path)
    key = (grammar, path)
    with _facts_lock:
        parsed = _recent_facts.get(key)
        if parsed is not None:
            _recent_facts.move_to_end(key)
    if parsed is not None and parsed.facts.get("reusable") and _typed_within_line(
            parsed, text, offset, start, line_start, line_end):
        return parsed.facts
    facts = _syntax_facts(text, offset, start, end, grammar, path)
    with _facts_lock:
        _recent_facts[key] = _Parsed(text, offset, start, line_start, line_end, facts)
        _recent_facts.move_to_end(key)
        while len(_recent_facts) > syntax.RECENT_TREES:
            _recent_facts.popitem(last=False)
    return facts


def _line_span(text: str, offset: int) -> tuple[int, int]:
    """Where the line of `offset` starts and where its "\n" (or the text) ends."""
    end = text.find("\n", offset)
    return text.rfind("\n", 0, offset) + 1, len(text) if end < 0 else end


def _typed_within_line(parsed: _Parsed, text: str, offset: int, window: int, line_start: int,
                       line_end: int) -> bool:
    """Whether `text` differs from the parsed text only by characters typed or deleted on the cursor line after
    its first non-blank character, none of which can open or close a block, bracket, string or comment
    (`WITHIN_LINE`), with the cursor after code on that line both then and now, nothing but such characters
    between the two cursors, and the same window start. Then the facts still hold: the imports and headers before
    the window are untouched, the cursor line's indentation (which decides the enclosing definitions in Python)
    is too, no definition starts or ends between the two cursors, and the cursor's syntax kind only matters on a
    blank line."""
    if window != parsed.window or line_start != parsed.line_start:
        return False
    if not text[line_start:offset].strip() or not parsed.text[line_start : parsed.offset].strip():
        return False
    if text[:line_start] != parsed.text[:line_start] or text[line_end:] != parsed.text[parsed.line_end:]:
        return False
    old, new = parsed.text[line_start : parsed.line_end], text[line_start:line_end]
    same = len(os.path.commonprefix([old, new]))
    tail = len(os.path.commonprefix([old[same:][::-1], new[same:][::-1]]))
    if not old[:same].strip():  # the change touches the indentation or starts before the line's code
        return False
    removed, typed = old[same : len(old) - tail], new[same : len(new) - tail]
    # what lies between the cursors, read in both texts (one edit shifts the positions after it)
    low, high = sorted((parsed.offset - line_start, offset - line_start))
    return all(WITHIN_LINE.fullmatch(part) for part in (removed, typed, old[low:high], new[low:high]))


def _syntax_facts(text: str, offset: int, start: int, end: int, grammar: str | None, path: str) -> dict[str, Any]:
    """Cursor kind, enclosing definition headers and imports that lie before the window (`start`)."""
    parser = syntax.parser_for(grammar)
    if parser is None:
        return {}
    region_start = 0 if len(text) <= MAX_PARSE_CHARS else start
    region_end = len(text) if len(text) <= MAX_PARSE_CHARS else end
    region = text[region_start:region_end]
    data = region.encode("utf-8", "replace")
    cursor = len(text[region_start:offset].encode("utf-8", "replace"))
    window = len(text[region_start:start].encode("utf-8", "replace"))
    tree = syntax.parse(parser, data, document=path)
    if tree is None:
        return {}
    node = tree.root_node.descendant_for_byte_range(cursor, cursor)
    chain = syntax.ancestors(node)
    cursor_kind = None
    for item in chain:
        if item.type == "ERROR":
            break
        cursor_kind = syntax.classify(item.type)
        if cursor_kind is not None:
            break
    # Enclosing definitions: those around the last code before the cursor that the cursor is indented under
    # (Python's trailing blank lines belong to no function, yet the cursor's indentation says which one).
    anchor = len(data[:cursor].rstrip())
    column = len(indentation(text[text.rfind("\n", 0, offset) + 1 : offset]))
    anchor_node = tree.root_node.descendant_for_byte_range(max(anchor - 1, 0), anchor)
    spans = [
        _header(data, item)
        for item in reversed(syntax.ancestors(anchor_node))
        if item.type in syntax.DEFINITIONS and item.start_byte < window and item.start_point[1] < column
    ]
    imports = [
        data[child.start_byte : child.end_byte].decode("utf-8", "replace")
        for child in tree.root_node.named_children
        if child.type in syntax.IMPORTS and child.end_byte <= window
    ]
    # Facts read from a tree with syntax errors (an unclosed bracket can turn a whole module into one ERROR node,
    # and the next keystroke into another tree) or with a header that runs into the window (a definition whose
    # body such an error swallowed) are never reused while typing (`_facts_while_typing`).
    return {"cursor_kind": cursor_kind, "headers": [header for header, _ in spans], "imports": imports,
            "reusable": not tree.root_node.has_error and all(end <= window for _, end in spans)}


def _header(data: bytes, node: Any) -> tuple[str, int]:
    """A definition's first line(s) up to its body, with its indentation (`    def push(self, item):`), and the
    byte where it ends."""
    body = node.child_by_field_name("body")
    stop = body.start_byte if body is not None and body.start_byte > node.start_byte else node.end_byte
    line_start = data.rfind(b"\n", 0, node.start_byte) + 1
    if body is None:  # the first line only
        first_break = data.find(b"\n", node.start_byte, stop)
        stop = stop if first_break < 0 else first_break
    return data[line_start:stop].decode("utf-8", "replace").rstrip(), stop


def _snippets(facts: dict[str, Any], path: str, budget_chars: int) -> list[ContextSnippet]:
    snippets = []
    headers = "\n".join(facts.get("headers") or [])[:budget_chars]
    if headers:
        snippets.append(ContextSnippet(path=path, text=headers))
    imports = "\n".join(facts.get("imports") or [])[: max(0, budget_chars - len(headers))]
    if imports:
        snippets.insert(0, ContextSnippet(path=path, text=imports))
    return snippets
