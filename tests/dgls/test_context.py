"""Context windows, extra snippets and line/block mode from tree-sitter (pure functions, no model)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from dgls import syntax
from dgls.context import LINE_GRID, build_context, clean_text, window_end, window_start


def cursor(text: str, marker: str = "|") -> tuple[str, int, int]:
    offset = text.index(marker)
    text = text.replace(marker, "", 1)
    return text, offset, text.count("\n", 0, offset)


@pytest.mark.parametrize("grammar", ["python", "javascript", "typescript", "tsx", "go", "rust", "java", "c", "cpp"])
def test_every_promised_grammar_is_available(grammar: str) -> None:
    parser = syntax.parser_for(grammar)
    assert parser is not None
    assert syntax.error_count(parser, "") == 0


def test_unknown_languages_are_plain_text() -> None:
    assert syntax.grammar_for("brainfuck") is None
    assert syntax.grammar_for("plaintext", "/x/y.rs") == "rust"  # the extension decides
    text, offset, line = cursor("foo(1, |\n")
    assert build_context(text, offset, line, "brainfuck").mode == "line"  # bracket fallback
    text, offset, line = cursor("hello\n|\n")
    assert build_context(text, offset, line, "brainfuck").mode == "block"


def test_prefix_window_starts_on_the_line_grid_and_stays_put_while_typing() -> None:
    text = "".join(f"line_{i} = {i}\n" for i in range(200)) + "x = "
    offset = len(text)
    start = window_start(text, offset, 200, 400)
    assert text.count("\n", 0, start) % LINE_GRID == 0
    assert offset - start <= 400
    typed = text + "abc"
    assert window_start(typed, len(typed), 200, 400) == start


def test_suffix_window_ends_at_a_line_end_within_budget() -> None:
    text = "a|" + "".join(f"\nline {i}" for i in range(100))
    text, offset, _ = cursor(text)
    end = window_end(text, offset, 100)
    assert end - offset <= 100
    assert text[end] == "\n"


def test_headers_and_imports_outside_the_window_become_snippets() -> None:
    body = "".join(f"        self.v{i} = {i}\n" for i in range(60))
    text, offset, line = cursor(
        "import os\nfrom typing import Any\n\n\nclass Stack:\n    def __init__(self, items: Any) -> None:\n"
        + body + "        |\n"
    )
    context = build_context(text, offset, line, "python", "/p/stack.py", prefix_tokens=64)
    assert [s.text for s in context.snippets] == [
        "import os\nfrom typing import Any",
        "class Stack:\n    def __init__(self, items: Any) -> None:",
    ]
    assert all(s.path == "/p/stack.py" for s in context.snippets)
    assert "import os" not in context.prefix
    # inside the window, nothing is repeated
    assert build_context(text, offset, line, "python", "/p/stack.py", prefix_tokens=4096).snippets == []


def test_go_imports_and_function_header() -> None:
    body = "".join(f"\tx{i} := {i}\n" for i in range(60))
    text, offset, line = cursor('package main\n\nimport "fmt"\n\nfunc main() {\n' + body + "\t|\n}\n")
    context = build_context(text, offset, line, "go", "/p/main.go", prefix_tokens=64)
    assert [s.text for s in context.snippets] == ['package main\nimport "fmt"', "func main()"]
    assert context.mode == "block"


@pytest.mark.parametrize(
    "language, source, mode",
    [
        ("python", "def f(a):\n    |\n", "block"),  # empty line in a block
        ("python", "x = foo(|)\n", "line"),  # mid-expression
        ("python", "x = foo(\n    |\n)\n", "line"),  # empty line inside a call
        ("python", "def f(a):|", "block"),  # right after a block opener
        ("python", "x = |", "line"),
        ("javascript", "function f() {\n  |\n}\n", "block"),
        ("javascript", "const x = [\n  |\n];\n", "line"),
        ("typescript", "const f = (a: number) => {\n  |\n};\n", "block"),
        ("rust", "fn main() {\n    let x = |;\n}\n", "line"),
        ("java", "class A {\n  void f() {\n    |\n  }\n}\n", "block"),
        ("c", "int main(void) {\n    printf(|);\n}\n", "line"),
        ("cpp", "int main() {\n    |\n}\n", "block"),
    ],
)
def test_mode_from_syntax(language: str, source: str, mode: str) -> None:
    text, offset, line = cursor(source)
    assert build_context(text, offset, line, language, "").mode == mode


def test_block_indent_follows_the_block() -> None:
    text, offset, line = cursor("def f(a):\n|\n")
    assert build_context(text, offset, line, "python", "").block_indent == "    "
    text, offset, line = cursor("if x {\n\t|\n}\n")
    assert build_context(text, offset, line, "go", "").block_indent == "\t"


def test_lone_surrogates_and_binary_text_are_safe() -> None:
    assert clean_text("a\ud800b") == "a\ufffdb"
    text = "x = '\ud800'\n\x00\x01\xff\n"
    context = build_context(text, len(text), 2, "python", "")
    context.prefix.encode("utf-8")  # never raises


def test_a_huge_document_parses_only_the_windows() -> None:
    text = "def f():\n    return 1\n" * 500_000  # ~11 MB
    started = time.monotonic()
    context = build_context(text, len(text) // 2, text.count("\n", 0, len(text) // 2), "python", "")
    assert time.monotonic() - started < 5.0
    assert len(context.prefix) <= 256 * 4 and len(context.suffix) <= 128 * 4


def test_small_documents_get_their_context_on_the_event_loop_large_ones_on_a_thread() -> None:
    """A keystroke's context is built on the event loop for documents up to INLINE_CONTEXT_CHARS (cheaper than
    a thread hop), on a worker thread above, so parsing a large file never stalls other requests."""
    from dgls.inline import INLINE_CONTEXT_CHARS

    line = "value = compute(value)\n"
    small = "def f(value):\n" + line * 10
    large = "def f(value):\n" + line * (INLINE_CONTEXT_CHARS // len(line) + 1)
    for name, text, where in (("small", small, "loop"), ("large", large, "another thread")):
        context, thread = context_and_thread(name, text)
        expected = build_context(text, len(text) - 1, text.count("\n") - 1, "python", f"/tmp/{name}.py",
                                 256, 128, 256)
        assert (context.prefix, context.suffix, thread) == (expected.prefix, expected.suffix, where)


def context_and_thread(name: str, text: str) -> tuple[Any, str]:
    """`context_for`'s context for the end of `text`, and whether it was built on the event loop's thread."""
    import asyncio
    import threading

    from dgls import inline

    seen: list[threading.Thread] = []
    original = inline.build_context

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    async def build() -> Any:
        context = await inline.context_for(text, len(text) - 1, text.count("\n") - 1, "python", f"/tmp/{name}.py",
                                           256, 128, 256)
        return context, "loop" if seen == [threading.current_thread()] else "another thread"

    inline.build_context = recording  # type: ignore[assignment]
    try:
        return asyncio.run(build())
    finally:
        inline.build_context = original  # type: ignore[assignment]


def _typed_through(path: Path, language: str, rng: random.Random) -> list[tuple[str, int, int]]:
    """A random non-blank line of `path`, typed again from its indentation: (text, offset, line) per keystroke."""
    lines = path.read_text(encoding="utf-8").split("\n")
    while True:
        number = rng.randrange(5, len(lines) - 2)
        if lines[number].strip():
            break
    line = lines[number]
    indent = len(line) - len(line.lstrip())
    start = sum(len(text) + 1 for text in lines[:number]) + indent
    base = "\n".join(lines[:number] + [line[:indent]] + lines[number + 1 :])
    return [(base[:start] + line[indent : indent + k] + base[start:], start + k, number)
            for k in range(1, len(line) - indent + 1)]


def test_typing_within_a_line_reuses_the_last_parse_and_finds_what_a_parse_finds(monkeypatch) -> None:
    """Typing on real code, keystroke by keystroke: where the parse is skipped, the snippets are those a fresh
    parse finds; the only differences are keystrokes whose text has a syntax error that made tree-sitter's
    recovery lose imports or headers the file still has, and there the reused facts keep them."""
    from benchmarks.requests_from_files import default_files
    from dgls import context

    parse = context._syntax_facts
    parses = []
    monkeypatch.setattr(context, "_syntax_facts", lambda *args: parses.append(args) or parse(*args))
    files = [(path, "python") for path in default_files()]
    files += [(path, "typescript") for path in sorted(Path("editors/vscode/src").glob("*.ts"))]
    rng = random.Random(0)
    keystrokes = lost_by_recovery = 0
    for _ in range(40):
        path, language = files[rng.randrange(len(files))]
        for text, offset, number in _typed_through(path, language, rng):
            typed = build_context(text, offset, number, language, str(path))
            facts = parse(text, offset, window_start(text, offset, number, 1024), window_end(text, offset, 512),
                          language, f"{path}#fresh")
            fresh = context._snippets(facts, str(path), 1024)
            keystrokes += 1
            if typed.snippets != fresh:
                assert facts.get("reusable") is False  # a fresh parse with errors lost what the reused one kept
                assert len("".join(s.text for s in typed.snippets)) > len("".join(s.text for s in fresh))
                lost_by_recovery += 1
    assert keystrokes > 500
    assert len(parses) < 0.7 * keystrokes  # the parse was skipped for a good share of the keystrokes
    assert lost_by_recovery < 0.02 * keystrokes


def test_a_keystroke_that_can_change_the_syntax_is_parsed(monkeypatch) -> None:
    from dgls import context

    parse = context._syntax_facts
    parses = []
    monkeypatch.setattr(context, "_syntax_facts", lambda *args: parses.append(args[0]) or parse(*args))
    line = "    total = compute(a, b)"
    body = "import os\n\n\ndef outer(a, b):\n" + "    x = 1\n" * 40
    for typed in range(len("    tot"), len(line) + 1):
        text = body + line[:typed] + "\n    return total\n"
        context.build_context(text, len(body) + typed, 44, "python", "/tmp/keystrokes.py")
    typed_after_code = [line[:n] for n in range(len("    tot"), len(line) + 1)]
    parsed = [text[len(body):].split("\n")[0] for text in parses]
    # the first keystroke parses; so does every one that types a bracket or follows one that left an error
    assert parsed[0] == "    tot" and "    total = compute(" in parsed and "    total = compute(a, b)" in parsed
    assert "    total = comp" not in parsed  # plain letters after clean code reuse the last parse
    assert set(parsed) <= set(typed_after_code)
    text = body + "    total = 1\n    return total\n"
    context.build_context(text, len(body) + 4, 44, "python", "/tmp/keystrokes.py")  # the cursor in the indentation
    assert parses[-1] == text
    context.build_context(text, len(body) + 13, 44, "python", "/tmp/keystrokes.py")
    dedented = body + "   total = 1\n    return total\n"  # a space less of indentation, the cursor after the code
    context.build_context(dedented, len(body) + 12, 44, "python", "/tmp/keystrokes.py")
    assert parses[-1] == dedented
    for edited in (text.replace("import os", "import re"), text.replace("return total", "return other")):
        context.build_context(text, len(body) + 4, 44, "python", "/tmp/keystrokes.py")  # parsed: the cursor is in
        context.build_context(edited, len(body) + 13, 44, "python", "/tmp/keystrokes.py")  # the indentation
        assert parses[-1] == edited  # an edit on another line (same length, same cursor line): parsed again
    for prefix_tokens in (256, 4):  # a window that starts elsewhere reads other facts
        context.build_context(text, len(body) + 13, 44, "python", "/tmp/keystrokes.py", prefix_tokens)
    assert parses[-1] == parses[-2] == text


def test_crlf_lines_end_before_their_carriage_return() -> None:
    """In a CRLF file the rest of the cursor line is what is on it: a suggestion re-typing an auto-closed `)`
    overwrites the `)` only, not the line break after it (which joined the next line on acceptance)."""
    from dgls.postprocess import overwrite_length

    text, offset, line = cursor("def f(a):\r\n    return g(|)\r\nx = 1\r\n")
    context = build_context(text, offset, line, "python", "/x.py")
    assert context.line_rest == ")"
    assert overwrite_length("a)", context.line_rest) == 1


@pytest.mark.parametrize("language, body, line, tail, parsed_at", [
    # the cursor was in the line's indentation when it was parsed (Home), then End and a letter
    ("python", "import os\n\n\nclass Box:\n    def push(self, item):\n" + "        x = 1\n" * 150,
     "        total = item", "\n        return total\n", 2),
    # a definition ends mid-line: parsed with the cursor before its `}`, then a letter typed at the line's end
    ("typescript", "import { x } from 'y';\n\nclass Box {\n  push(item) {\n" + "    x += 1;\n" * 150,
     "    x += 2; }  size = 1", "\n}\n", len("    x += 2;")),
])
def test_facts_read_at_another_cursor_on_the_line_are_not_reused(language, body, line, tail, parsed_at) -> None:
    from dgls import context

    def snippets(text: str, offset: int, path: str) -> list[str]:
        built = context.build_context(text, offset, body.count("\n"), language, path)
        return [snippet.text for snippet in built.snippets]

    text = body + line + tail
    assert context._syntax_facts(text, len(body), 0, len(text), language, "")["reusable"]  # a clean parse
    snippets(text, len(body) + parsed_at, f"/tmp/moved.{language}")
    typed = text.replace(line, line + "s")
    fresh = snippets(typed, len(body) + len(line) + 1, f"/tmp/fresh.{language}")
    assert snippets(typed, len(body) + len(line) + 1, f"/tmp/moved.{language}") == fresh
    assert len(fresh) == 2  # the imports and the enclosing definitions this cursor has
