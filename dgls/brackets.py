"""Bracket bookkeeping over source text that may be incomplete: which brackets are still open.

A small scanner, not a parser: it skips string literals and comments well enough for the text around a cursor
(line and block comments, single, double, back and triple quotes) and never fails. Pure.
"""

from __future__ import annotations

from collections.abc import Iterator

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {")": "(", "]": "[", "}": "{"}


def events(text: str, hash_comments: bool = False) -> Iterator[tuple[int, str]]:
    """(index, bracket) for every bracket outside string literals and comments."""
    index, length = 0, len(text)
    quote: str | None = None
    while index < length:
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 2
                continue
            if text.startswith(quote, index):
                index += len(quote)
                quote = None
                continue
            if char == "\n" and len(quote) == 1 and quote != "`":
                quote = None  # an unterminated one-line string ends with its line
            index += 1
            continue
        if char in "\"'`":
            triple = text[index : index + 3]
            quote = triple if triple in ('"""', "'''") else char
            index += len(quote)
            continue
        if (hash_comments and char == "#") or (not hash_comments and text.startswith("//", index)):
            end = text.find("\n", index)
            index = length if end < 0 else end
            continue
        if not hash_comments and text.startswith("/*", index):
            end = text.find("*/", index + 2)
            index = length if end < 0 else end + 2
            continue
        if char in OPENERS or char in CLOSERS:
            yield index, char
        index += 1


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
