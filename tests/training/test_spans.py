"""FIM span cutting: the four kinds, syntax boundaries, and fitting the middle into the canvas."""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerFast

from engine.training import examples, spans
from engine.training.tokenizer import EOS_ID, PAD_ID

CODE = '''import os


def walk(root):
    """Yield files."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            yield from walk(path)
        else:
            yield path


class Box:
    def __init__(self, value):
        self.value = value
'''


def test_cut_yields_all_four_kinds() -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        span = spans.cut(CODE, rng)
        assert span is not None and 0 <= span.start <= span.end <= len(CODE)
        prefix, middle, suffix = span.parts(CODE)
        assert prefix + middle + suffix == CODE
        seen.add(span.kind)
        if span.kind == "empty":
            assert middle == ""
        if span.kind == "line":
            assert middle and "\n" not in middle.rstrip("\n")
    assert seen == set(spans.KINDS)


def test_blocks_follow_syntax_boundaries() -> None:
    statements = spans.statement_lines(CODE)
    assert statements, "tree-sitter should parse this file"
    rng = random.Random(1)
    lines = CODE.splitlines(keepends=True)
    starts = {sum(len(x) for x in lines[:a]) for a, _ in statements}
    blocks = [spans.cut(CODE, rng, kind="block", statements=statements) for _ in range(50)]
    on_boundary = [b for b in blocks if b is not None and b.start in starts]
    assert len(on_boundary) >= 30
    for block in blocks:
        assert block is not None and block.parts(CODE)[1].endswith("\n")


def test_unparsable_text_falls_back_to_random_lines() -> None:
    broken = "def (:\n  x = \n" * 5
    assert spans.statement_lines(broken) == []
    span = spans.cut(broken, random.Random(0), kind="block")
    assert span is not None and span.kind == "block"


def test_long_middle_is_cut_at_a_line_boundary(tokenizer: PreTrainedTokenizerFast) -> None:
    middle = "".join(f"    value_{i} = compute_something({i})\n" for i in range(20))
    example = examples.build(tokenizer, "def f():\n", middle, "    return 1\n", "block")
    assert example is not None
    assert len(example.canvas) == examples.CANVAS_LENGTH
    end = example.canvas.index(EOS_ID)
    assert all(t == PAD_ID for t in example.canvas[end + 1:])
    kept = tokenizer.decode(example.canvas[:end])
    assert kept.endswith("\n") and middle.startswith(kept) and kept != middle


def test_prompt_layout_and_windows(tokenizer: PreTrainedTokenizerFast) -> None:
    prefix = "x = 1\n" * 400
    suffix = "y = 2\n" * 400
    example = examples.build(tokenizer, prefix, "z = 3", suffix, "line")
    assert example is not None
    from engine.training.tokenizer import BOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID
    prompt = example.prompt
    assert prompt[0] == BOS_ID and prompt[1] == FIM_SUFFIX_ID and prompt[-1] == FIM_MIDDLE_ID
    split = prompt.index(FIM_PREFIX_ID)
    assert split - 2 <= examples.SUFFIX_TOKENS
    assert len(prompt) - split - 2 <= examples.PREFIX_TOKENS
    assert tokenizer.decode(prompt[split + 1 : -1]).endswith("x = 1\n")
    assert tokenizer.decode(prompt[2:split]).startswith("y = 2\n")


def test_empty_middle_canvas_is_eos_then_pad(tokenizer: PreTrainedTokenizerFast) -> None:
    example = examples.build(tokenizer, "a = 1", "", "\nb = 2\n", "empty")
    assert example is not None
    assert example.canvas == [EOS_ID] + [PAD_ID] * (examples.CANVAS_LENGTH - 1)


def test_ast_fallback_finds_the_same_statements() -> None:
    found = set(spans._ast_statement_lines(CODE))
    assert (3, 10) in found  # def walk(...) through its last line
    assert found <= set(spans.statement_lines(CODE)) or spans._python_parser() is None
