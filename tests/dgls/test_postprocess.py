"""Golden cases for every post-processing rule (pure functions, no model)."""

from __future__ import annotations

import pytest

from dgls import syntax
from dgls.context import build_context
from dgls.postprocess import (
    Suggestion,
    balance_brackets,
    cut_at_junk,
    drop_repeats,
    fix_indentation,
    overwrite_length,
    postprocess,
    rank_by_syntax,
    stop_at_block_end,
    trim_suffix_repeat,
)


@pytest.mark.parametrize(
    "text, line_prefix, suffix, expected",
    [
        # the suggestion's second line is the line after the cursor: cut there
        ("x = 1\n    return x", "    ", "\n    return x\n", "x = 1"),
        # the whole suggestion is the next line: nothing left
        ("return x", "    ", "\n    return x\n", ""),
        # it only re-types the rest of the cursor line
        ("b)", "f(a, ", "b)\n", ""),
        # same text at another indentation is not a repeat (an inner block's brace)
        ("if (a) {\n    b();\n  }\n  c();", "  ", "\n}\n", "if (a) {\n    b();\n  }\n  c();"),
        # a line with code before the cursor is never compared with the next line
        ("1", "x = ", "\nx = 1\n", "1"),
        # nothing after the cursor: unchanged
        ("a\nb", "", "", "a\nb"),
    ],
)
def test_trim_suffix_repeat(text: str, line_prefix: str, suffix: str, expected: str) -> None:
    assert trim_suffix_repeat(text, line_prefix, suffix) == expected


@pytest.mark.parametrize(
    "text, line_prefix, block_indent, expected",
    [
        # model indented the first line although the cursor already sits at the block's indentation
        ("    return a\n    b", "    ", "    ", "return a\nb"),
        # cursor at column 0 on an empty line of an indented block: first line gets the indentation
        ("return a", "", "    ", "    return a"),
        # later lines keep their indentation relative to the first
        ("if a:\n    b()\nc()", "", "        ", "        if a:\n            b()\n        c()"),
        # after a block opener on the cursor line, the body is shifted under it
        ("\nreturn 1", "def f():", "    ", "\n    return 1"),
        # tabs stay tabs
        ("x\n\ty", "\t", "\t", "x\n\ty"),
        # one line, nothing to shift
        ("abc", "x = ", "", "abc"),
    ],
)
def test_fix_indentation(text: str, line_prefix: str, block_indent: str, expected: str) -> None:
    assert fix_indentation(text, line_prefix, block_indent) == expected


@pytest.mark.parametrize(
    "text, block_indent, expected",
    [
        ("return a\n\ndef other():\n    pass", "    ", "return a"),
        ("a = 1\n    b = 2\n    c", "    ", "a = 1\n    b = 2\n    c"),
        # a dedented closing brace stays (bracket balancing decides)
        ("return 1;\n}\nfunction g() {", "  ", "return 1;\n}"),
    ],
)
def test_stop_at_block_end(text: str, block_indent: str, expected: str) -> None:
    assert stop_at_block_end(text, block_indent) == expected


@pytest.mark.parametrize(
    "text, open_brackets, following, expected",
    [
        # the text after the cursor already closes the call
        ("a, b)", ["("], ")\n", "a, b"),
        # nothing closes it after the cursor: the suggestion may
        ("a, b)", ["("], "\n", "a, b)"),
        # a closer with nothing open is junk
        ("x])", [], "", "x"),
        # brackets the suggestion opens itself are fine
        ("f(g[1])", [], "", "f(g[1])"),
        # wrong kind of closer
        ("a]", ["("], "", "a"),
        # brackets in strings do not count
        ('")" + x', ["("], ")", '")" + x'),
        # the enclosing block's brace in a block completion, when the suffix closes the block
        ("return 1;\n}", ["{"], "\n}\n", "return 1;"),
    ],
)
def test_balance_brackets(text: str, open_brackets: list[str], following: str, expected: str) -> None:
    assert balance_brackets(text, open_brackets, following) == expected


@pytest.mark.parametrize(
    "text, line_rest, expected",
    [("b)", ")", 1), ("b)  ", ")  ", 3), ("b", ")", 0), ("b", "", 0), ("x\ny)", ")", 1)],
)
def test_overwrite_length(text: str, line_rest: str, expected: int) -> None:
    assert overwrite_length(text, line_rest) == expected


@pytest.mark.parametrize(
    "text, line_prefix, previous_line, expected",
    [
        ("a()\na()\na()", "", "", "a()"),
        ("x = 1", "", "x = 1", ""),  # repeats the line above
        ("1", "x = ", "x = 1", ""),  # completes the cursor line into a copy of the line above
        ("a\n\nb", "", "", "a\n\nb"),  # blank lines are not repeats
        ("y = 2", "", "x = 1", "y = 2"),
    ],
)
def test_drop_repeats(text: str, line_prefix: str, previous_line: str, expected: str) -> None:
    assert drop_repeats(text, line_prefix, previous_line) == expected


@pytest.mark.parametrize(
    "text, expected", [("abc\x00def", "abc"), ("ok\ufffd", "ok"), ("a\tb\nc", "a\tb\nc"), ("\x1b[0m", "")]
)
def test_cut_at_junk(text: str, expected: str) -> None:
    assert cut_at_junk(text) == expected


def test_rank_prefers_candidates_without_new_syntax_errors() -> None:
    parser = syntax.parser_for("python")
    assert parser is not None
    prefix, suffix = "def f(a):\n    return ", "\n\nprint(f(1))\n"
    ranked = rank_by_syntax([Suggestion("a +* )"), Suggestion("a + 1"), Suggestion("(a")], prefix, suffix, parser)
    assert ranked[0] == Suggestion("a + 1")


def test_whitespace_only_and_duplicate_candidates_are_dropped() -> None:
    text = "def f(a):\n    return \n"
    context = build_context(text, text.index("return ") + 7, 1, "python", "f.py")
    assert postprocess(["   ", "", "a", "a  ", "\x00"], context) == [Suggestion("a")]


def test_pipeline_on_an_auto_closed_bracket() -> None:
    text = "x = foo(1, )\n"
    context = build_context(text, text.index(")"), 0, "python", "f.py")
    assert context.mode == "line"
    # re-typing the auto-closed bracket overwrites it; an extra closer is cut
    assert postprocess(["2))\nmore", "2"], context) == [Suggestion("2)", overwrite=1), Suggestion("2")]


def test_pipeline_on_a_block_stops_at_the_block_end() -> None:
    text = "def add(a, b):\n    \n\nprint(add(1, 2))\n"
    context = build_context(text, text.index("    \n") + 4, 1, "python", "f.py")
    assert context.mode == "block"
    out = postprocess(["return a + b\n\ndef sub(a, b):\n    return a - b", "  return a\n      # ok"], context)
    assert out == [Suggestion("return a + b"), Suggestion("return a\n    # ok")]
