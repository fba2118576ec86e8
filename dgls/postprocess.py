"""Turning the engine's raw candidates into suggestions worth showing. Every rule is a pure function.

Order (`postprocess`): cut at junk characters; one line in line mode; indentation fixed to the cursor's block;
stop where the completion leaves that block; trim what repeats the lines after the cursor; decide what of the
cursor line the suggestion overwrites (e.g. an auto-closed bracket); balance brackets against the text that
follows; drop repeated lines and whitespace-only results; de-duplicate; prefer candidates that add no syntax
errors. Knows nothing about LSP
or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dgls import brackets, syntax
from dgls.context import CompletionContext, indentation


@dataclass(slots=True, frozen=True)
class Suggestion:
    text: str  # inserted at the cursor
    overwrite: int = 0  # characters after the cursor, on its line, that the suggestion replaces


def cut_at_junk(text: str) -> str:
    """Cut at the first control character (other than tab and newline) or U+FFFD: no code contains them; a
    model emits them when a byte-level token sequence stops mid-character or goes astray."""
    for index, char in enumerate(text):
        if char == "\ufffd" or (ord(char) < 32 and char not in "\t\n") or char == "\x7f":
            return text[:index]
    return text


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def fix_indentation(text: str, line_prefix: str, block_indent: str) -> str:
    """Re-indent so the first new line sits at `block_indent`; later lines keep their relative indentation."""
    lines = text.split("\n")
    if not line_prefix.strip():
        first = line_prefix + indentation(lines[0])
        reference = first if lines[0].strip() else None
        if lines[0].strip():
            lines[0] = (block_indent[len(line_prefix) :] if block_indent.startswith(line_prefix) else "") + (
                lines[0].lstrip(" \t")
            )
    else:
        reference = None
    if reference is None:
        later = [line for line in lines[1:] if line.strip()]
        if not later:
            return "\n".join(lines)
        reference = indentation(later[0])
    shift = len(block_indent) - len(reference)
    if shift == 0:
        return "\n".join(lines)
    unit = "\t" if block_indent.startswith("\t") else " "
    for index in range(1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        if shift > 0:
            lines[index] = unit * shift + line
        else:
            removable = len(indentation(line))
            lines[index] = line[min(-shift, removable) :]
    return "\n".join(lines)


def stop_at_block_end(text: str, block_indent: str) -> str:
    """Cut before the first later line indented less than the cursor's block (the completion left the block).

    A dedented line that starts with a closing bracket stays: `balance_brackets` decides about closers.
    """
    lines = text.split("\n")
    for index in range(1, len(lines)):
        line = lines[index]
        if line.strip() and len(indentation(line)) < len(block_indent) and line.strip()[0] not in brackets.CLOSERS:
            return "\n".join(lines[:index]).rstrip()
    return text


def trim_suffix_repeat(text: str, line_prefix: str, suffix: str) -> str:
    """Cut the suggestion where it starts repeating what follows the cursor.

    A suggestion line equal (indentation included) to the first non-blank line after the cursor line ends the
    suggestion there; a suggestion that only re-types the rest of the cursor line is dropped.
    """
    suffix_lines = suffix.split("\n")
    rest_of_line = suffix_lines[0].strip()
    if rest_of_line and text.strip() == rest_of_line:
        return ""
    following = next((line.rstrip() for line in suffix_lines[1:] if line.strip()), None)
    if following is None:
        return text
    lines = text.split("\n")
    full = [line_prefix + lines[0], *lines[1:]]
    for index, line in enumerate(full):
        if index == 0 and line_prefix.strip():
            continue  # the cursor line already has code: it is not a copy of the next line
        if line.rstrip() == following:
            return "\n".join(lines[:index]).rstrip()
    return text


def overwrite_length(text: str, line_rest: str) -> int:
    """How much of the cursor line's rest the suggestion replaces: all of it when the suggestion's last line
    ends with it (e.g. it re-types an auto-closed `)`), else nothing."""
    wanted = line_rest.strip()
    if wanted and text.split("\n")[-1].rstrip().endswith(wanted):
        return len(line_rest)
    return 0


def balance_brackets(text: str, open_brackets: list[str], following: str, hash_comments: bool = False) -> str:
    """Cut the suggestion at a closing bracket it should not type.

    `open_brackets` are those open before the cursor (innermost last) and `following` the text after what the
    suggestion replaces. A closer that matches nothing, or that closes a bracket the following text already
    closes, ends the suggestion.
    """
    provided = brackets.leading_closers(following)
    outer = list(open_brackets)
    local: list[str] = []
    for index, char in brackets.events(text, hash_comments):
        if char in brackets.OPENERS:
            local.append(char)
            continue
        opener = brackets.CLOSERS[char]
        if local:
            if local[-1] == opener:
                local.pop()
                continue
            return text[:index].rstrip()
        if not outer or outer[-1] != opener or provided.startswith(char):
            return text[:index].rstrip()
        outer.pop()
    return text


def drop_repeats(text: str, line_prefix: str, previous_line: str) -> str:
    """Cut at a line that repeats the line before it; '' when the suggestion only repeats the line above."""
    lines = text.split("\n")
    for index in range(1, len(lines)):
        if lines[index].strip() and lines[index].strip() == lines[index - 1].strip():
            lines = lines[:index]
            break
    full = [(line_prefix + lines[0]).strip(), *(line.strip() for line in lines[1:])]
    non_blank = [line for line in full if line]
    if previous_line.strip() and non_blank and all(line == previous_line.strip() for line in non_blank):
        return ""
    return "\n".join(lines)


def rank_by_syntax(suggestions: list[Suggestion], prefix: str, suffix: str, parser: Any | None) -> list[Suggestion]:
    """Stable order: suggestions whose `prefix + text + suffix` adds no syntax errors first, then fewest new."""
    if parser is None or len(suggestions) < 2:
        return suggestions
    baseline = syntax.error_count(parser, prefix + suffix)

    def new_errors(item: Suggestion) -> int:
        return max(0, syntax.error_count(parser, prefix + item.text + suffix[item.overwrite :]) - baseline)

    return sorted(suggestions, key=new_errors)


def postprocess(candidates: list[str], context: CompletionContext) -> list[Suggestion]:
    """The suggestions to show, best first (possibly none)."""
    hash_comments = context.grammar == "python"
    results: list[Suggestion] = []
    for raw in candidates:
        text = cut_at_junk(raw.replace("\r\n", "\n"))
        if context.mode == "line":
            text = first_line(text)
        text = fix_indentation(text, context.line_prefix, context.block_indent)
        if context.mode == "block":
            text = stop_at_block_end(text, context.block_indent)
        text = trim_suffix_repeat(text, context.line_prefix, context.suffix)
        overwrite = overwrite_length(text, context.line_rest)
        text = balance_brackets(text, context.open_brackets, context.suffix[overwrite:], hash_comments)
        text = drop_repeats(text, context.line_prefix, context.previous_line).rstrip()
        if not text.strip():
            continue
        suggestion = Suggestion(text, overwrite_length(text, context.line_rest))
        if suggestion not in results:
            results.append(suggestion)
    return rank_by_syntax(results, context.prefix, context.suffix, syntax.parser_for(context.grammar))
