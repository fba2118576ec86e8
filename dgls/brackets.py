"""Bracket bookkeeping over source text that may be incomplete: which brackets are still open.

A small scanner, not a parser: it skips string literals and comments well enough for the text around a cursor
(line and block comments, single, double, back and triple quotes) and never fails. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {")": "(", "]": "[", "}": "{"}


# What the scanner stops at outside string literals, and inside each kind of literal; everything between is
# skipped by the regular expression engine (a Python loop over every character cost ~0.4 ms per completion).
_CODE = {True: re.compile(r"""["'`#()\[\]{}]"""), False: re.compile(r"""["'`()\[\]{}]|//|/\*""")}
_QUOTED = {quote: re.compile(r"\\|" + re.escape(quote) + (r"|\n" if len(quote) == 1 and quote != "`" else ""))
           for quote in ('"', "'", "`", '"""', "'''")}


def events(text: str, hash_comments: bool = False) -> Iterator[tuple[int, str]]:
    """(index, bracket) for every bracket outside string literals and comments."""
    index, length = 0, len(text)
    code = _CODE[hash_comments]
    while index < length:
        found = code.search(text, index)
        if found is None:
            return
        start, token = found.start(), found.group()
        if token in OPENERS or token in CLOSERS:
            yield start, token
            index = start + 1
        elif token in "\"'`":
            triple = text[start : start + 3]
            quote = triple if triple in ('"""', "'''") else token
            index = _after_literal(text, start + len(quote), quote)
        elif token == "/*":
            end = text.find("*/", start + 2)
            index = length if end < 0 else end + 2
        else:  # a line comment
            end = text.find("\n", start)
            index = length if end < 0 else end


def _after_literal(text: str, index: int, quote: str) -> int:
    """Where the string literal whose opening `quote` ends before `index` ends: after its closing quote, at the
    line break that ends an unterminated one-line string, or at the end of `text`."""
    pattern = _QUOTED[quote]
    while True:
        found = pattern.search(text, index)
        if found is None:
            return len(text)
        if found.group() == "\\":
            index = found.start() + 2  # an escaped character
        elif found.group() == "\n":
            return found.start() + 1
        else:
            return found.end()


def scan(text: str, hash_comments: bool = False) -> list[str]:
    """The stack of brackets left open at the end of `text`, innermost last.

    A closer that matches nothing (or the wrong opener) is ignored: text cut from the middle of a file starts
    with closers whose openers are out of view.
    """
    stack: list[str] = []
    for _, char in events(text, hash_comments):
        if char in OPENERS:
            stack.append(char)
        elif stack and stack[-1] == CLOSERS[char]:
            stack.pop()
    return stack


def leading_closers(text: str) -> str:
    """The closing brackets at the start of `text`, whitespace (newlines included) skipped: ") )\\n}" -> "))}"."""
    found = []
    for char in text:
        if char in CLOSERS:
            found.append(char)
        elif not char.isspace():
            break
    return "".join(found)
