"""The bracket scanner on the cases that decide its answers: literals, escapes, comments of both families, text
cut from the middle of a file."""

from __future__ import annotations

import pytest

from dgls.brackets import events, scan


@pytest.mark.parametrize(
    "text, hash_comments, expected",
    [
        ("foo(a, [b", True, ["(", "["]),
        ('f("(", x', True, ["("]),  # a bracket in a string does not count
        ('f("a\\"(", ', True, ["("]),  # nor after an escaped quote inside it
        ("f('a\\\\', [", True, ["(", "["]),  # an escaped backslash ends before the closing quote
        ('x = """(\n[""" + (', True, ["("]),  # triple quotes span lines
        ("x = '''('''[", True, ["["]),
        ('s = "abc(\nf(', True, ["("]),  # an unterminated one-line string ends with its line
        ("t = `(\n[` + [", False, ["["]),  # a template literal spans lines
        ("f(  # )\n", True, ["("]),  # a Python comment
        ("f(a // 2", True, ["("]),  # floor division, not a comment, in Python
        ("f(  // )\n", False, ["("]),  # a C-family line comment
        ("f( /* ) */ [", False, ["(", "["]),  # a block comment
        ("f( /* ) [", False, ["("]),  # an unterminated one runs to the end
        ("a[#]", False, []),  # '#' is no comment outside hash-comment languages
        (") ] f(", True, ["("]),  # closers of openers out of view are ignored
        ("(]", True, ["("]),  # so is a closer of the wrong kind
        ("", True, []),
    ],
)
def test_scan(text: str, hash_comments: bool, expected: list[str]) -> None:
    assert scan(text, hash_comments=hash_comments) == expected


def test_events_are_positions_of_code_brackets() -> None:
    assert list(events('a(b["]"])', hash_comments=True)) == [(1, "("), (3, "["), (7, "]"), (8, ")")]
