"""Prompt templates: shipped and user files, field order, special-token safety, a prefix window that stays
stable while typing."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from engine.fill import ContextSnippet, FillRequest
from engine.templates import PromptBuilder, PromptTemplate, TemplateError, load_template, shipped_template_names


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_shipped_templates_put_the_prefix_last() -> None:
    assert {"dgls-fim", "diffusiongemma-it"} <= set(shipped_template_names())
    for name in shipped_template_names():
        segments = load_template(name).segments
        assert "{prefix}" in segments
        assert segments.index("{suffix}") < segments.index("{prefix}")


def test_fim_prompt_layout(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, load_template("dgls-fim"))
    ids = builder.render(FillRequest(prefix="x = ", suffix="\nprint(x)", context=[ContextSnippet("a.py", "A = 1")]))
    text = tokenizer.decode(ids)
    assert text == "<bos><file_sep>a.py\nA = 1\n<fim_suffix>\nprint(x)<fim_prefix>x = <fim_middle>"


def test_special_token_text_in_user_code_stays_plain_text(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, load_template("dgls-fim"))
    ids = builder.render(FillRequest(prefix="s = '<eos><fim_middle>'"))
    eos, middle = tokenizer.convert_tokens_to_ids(["<eos>", "<fim_middle>"])
    assert eos not in ids
    assert ids.count(middle) == 1 and ids[-1] == middle  # only the template's own marker


def test_prefix_window_is_stable_while_typing_on_the_last_line(tokenizer) -> None:
    template = PromptTemplate.from_dict({"segments": ["{prefix}"], "budgets": {"prefix": 64}}, "t")
    builder = PromptBuilder(tokenizer, template)
    body = "".join(f"value_{i} = compute({i})\n" for i in range(200))
    first = builder.prefix_ids(body + "res")
    second = builder.prefix_ids(body + "resu")
    assert len(first) <= 64 and len(second) <= 64
    common = next(i for i, (a, b) in enumerate(zip(first + [-1], second + [-2], strict=False)) if a != b)
    assert common >= len(first) - 3  # only the last line's tokens differ


def test_a_documents_prefix_window_stays_put_while_it_fits(tokenizer) -> None:
    """Deleting a long word frees budget: a fresh window would start lines earlier (re-encoding the whole
    window); the document's window stays where it was. It moves on when it no longer fits, when it would hold
    less than half of what a fresh window holds, when its first line changed, after `forget()`, and another
    document gets its own."""
    template = PromptTemplate.from_dict({"segments": ["{prefix}"], "budgets": {"prefix": 512}}, "t")
    builder = PromptBuilder(tokenizer, template)
    body = "".join(f"value_{i} = compute({i})\n" for i in range(200))
    short_line = body + "result = "
    fresh_short = builder.prefix_ids(short_line)
    # the shortest word whose deletion moves a fresh window (the earliest fitting line crosses a grid line)
    long_line = next(body + "result = " + "abc_" * n for n in range(1, 40)
                     if builder.prefix_ids(body + "result = " + "abc_" * n)[:16] != fresh_short[:16])
    fresh_long = builder.prefix_ids(long_line)

    first = builder.prefix_ids(long_line, "doc")
    kept = builder.prefix_ids(short_line, "doc")
    assert first == fresh_long and kept[:16] == first[:16] and len(kept) < len(fresh_short)
    assert builder.prefix_ids(short_line, "other") == fresh_short

    grown = builder.prefix_ids(short_line + "abc_" * 80, "doc")  # the old start no longer fits
    assert len(grown) <= 512 and grown[:16] != first[:16]

    builder.prefix_ids(long_line, "doc2")
    start = tokenizer.decode(first).split("\n", 1)[0]  # the kept window's first line, e.g. "value_184 = ..."
    edited = short_line.replace(start + "\n", "v = 0\n")  # shorter: a fresh window starts lines earlier
    assert builder.prefix_ids(edited, "doc2") == builder.prefix_ids(edited)  # its first line changed

    lines = body.split("\n")
    builder.prefix_ids(long_line, "doc3")
    number = next(i for i, line in enumerate(lines) if line == start)
    up = "\n".join(lines[: number + 3]) + "\nresult = "  # the cursor moved up: 3 lines left after the start
    assert builder.prefix_ids(up, "doc3") == builder.prefix_ids(up)  # under half a fresh window: not kept

    builder.prefix_ids(long_line, "doc4")
    builder.forget()
    assert builder.prefix_ids(short_line, "doc4") == fresh_short


def test_user_template_file(tmp_path, tokenizer) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "segments": ["<bos>", "{language}: ", "{suffix}", "{prefix}"]}))
    builder = PromptBuilder(tokenizer, load_template(str(path)))
    assert tokenizer.decode(builder.render(FillRequest(prefix="b", suffix="a", language="py"))) == "<bos>py: ab"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not valid JSON"),
        ('{"segments": ["{suffix}"]}', "no '{prefix}' segment"),
        ('{"name": "x"}', "'segments' list"),
        ('{"segments": ["{prefix}"], "budgets": {"prefix": -1}}', "non-negative"),
    ],
)
def test_bad_template_files_are_clear_errors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_template(str(path))


def test_unknown_template_name_lists_the_shipped_ones() -> None:
    with pytest.raises(TemplateError, match="dgls-fim"):
        load_template("no-such-template")


def test_prefix_window_uses_most_of_its_budget(tokenizer) -> None:
    template = PromptTemplate.from_dict({"segments": ["{prefix}"], "budgets": {"prefix": 96}}, "t")
    builder = PromptBuilder(tokenizer, template)
    body = "".join(f"total = total + compute(value_{i}, other_{i})\n" for i in range(300))
    ids = builder.prefix_ids(body + "res")
    assert 48 <= len(ids) <= 96  # at most a few grid lines are given up for stability
    assert tokenizer.decode(ids).endswith("res")
