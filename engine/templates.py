"""Prompt templates: how a fill request becomes the token ids the causal encoder reads.

A template is data (JSON, shipped in `engine/templates/` or given as a file path): a list of segments whose
order decides what is reused across keystrokes. Fields `{prefix}`, `{suffix}`, `{context}`, `{language}`,
`{path}` are filled from the request; everything else is literal and may contain the model's special tokens.
User text is tokenized with special tokens split, so code that contains e.g. "<eos>" never becomes a control
token. The prefix window is cut at line boundaries on a fixed grid, so it stays identical (and its KV cache
reusable) while the user types on the last line; per document, a window start stays where it was while it still
fits the budget, so a token count that changes as a word is typed never moves it (each move re-encodes the whole
window).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from engine.fill import FillRequest

FIELD = re.compile(r"\{(prefix|suffix|context|language|path|text)\}")
LINE_GRID = 4  # the prefix window starts on an absolute line number that is a multiple of this
CHARS_PER_TOKEN_CAP = 32  # never tokenize more than budget * this many characters of one side
TEXT_MEMO_ENTRIES = 64  # tokenized suffixes, windows and snippets remembered (a few per open document)
LINE_MEMO_ENTRIES = 65_536  # per-line token counts remembered for sizing prefix windows
WINDOW_MEMO_ENTRIES = 256  # documents whose prefix window start is remembered


class TemplateError(Exception):
    """A template that cannot be found or parsed; the message names the file or name and the fix."""


@dataclass(slots=True)
class PromptTemplate:
    name: str
    segments: list[str]
    context_item: str = "{path}\n{text}\n"
    stop: list[str] = field(default_factory=list)
    budgets: dict[str, int] = field(default_factory=lambda: {"prefix": 256, "suffix": 128, "context": 256})
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any, origin: str) -> PromptTemplate:
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise TemplateError(f"template {origin} must be a JSON object with a 'segments' list")
        if "{prefix}" not in data["segments"]:
            raise TemplateError(f"template {origin} has no '{{prefix}}' segment; the prefix must be a segment")
        budgets = {"prefix": 256, "suffix": 128, "context": 256, **data.get("budgets", {})}
        if not all(isinstance(v, int) and v >= 0 for v in budgets.values()):
            raise TemplateError(f"template {origin}: budgets must be non-negative integers")
        return cls(
            name=str(data.get("name", origin)),
            segments=[str(s) for s in data["segments"]],
            context_item=str(data.get("context_item", "{path}\n{text}\n")),
            stop=[str(s) for s in data.get("stop", [])],
            budgets=budgets,
            description=str(data.get("description", "")),
        )


def shipped_template_names() -> list[str]:
    folder = resources.files("engine") / "templates"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_template(name_or_path: str) -> PromptTemplate:
    """A shipped template by name (`dgls-fim`, `diffusiongemma-it`) or a JSON file by path."""
    if name_or_path in shipped_template_names():
        text = (resources.files("engine") / "templates" / f"{name_or_path}.json").read_text(encoding="utf-8")
        origin = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise TemplateError(
                f"template {name_or_path!r} is neither a shipped template ({', '.join(shipped_template_names())}) "
                "nor a JSON file"
            )
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        return PromptTemplate.from_dict(json.loads(text), origin)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"template {origin} is not valid JSON: {exc}") from None


class PromptBuilder:
    """Renders requests into prompt ids with one tokenizer and one template."""

    def __init__(self, tokenizer: Any, template: PromptTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        # Tokenizing is a few ms a request through transformers' wrapper; while the user types, the suffix,
        # the context and all but the last prefix line stay the same, so their tokens are remembered.
        self._text_memo: dict[str, tuple[int, ...]] = {}
        self._literal_memo: dict[str, tuple[int, ...]] = {}
        self._line_counts: dict[str, int] = {}
        # document -> (line number of its prefix window's first line, that line's text)
        self._window_starts: dict[str, tuple[int, str]] = {}

    def forget(self) -> None:
        """Drop the remembered tokenizations of request text and window starts (benchmarks measuring a cold
        request call this); the template's own literals stay remembered."""
        self._text_memo.clear()
        self._line_counts.clear()
        self._window_starts.clear()

    def text_ids(self, text: str) -> list[int]:
        """Ids of user text; special-token strings inside it stay plain text."""
        if not text:
            return []
        memo = self._text_memo.get(text)
        if memo is None:
            memo = tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            _bounded_put(self._text_memo, text, memo, TEXT_MEMO_ENTRIES)
        return list(memo)

    def line_token_counts(self, pieces: list[str]) -> list[int]:
        """Token count of each piece (a line with its newline), tokenizing only pieces not seen before."""
        missing = list(dict.fromkeys(piece for piece in pieces if piece not in self._line_counts))
        if missing:
            ids = self.tokenizer(missing, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            for piece, piece_ids in zip(missing, ids, strict=True):
                _bounded_put(self._line_counts, piece, len(piece_ids), LINE_MEMO_ENTRIES)
        return [self._line_counts[piece] for piece in pieces]

    def literal_ids(self, text: str) -> list[int]:
        """A template literal's ids, special tokens included (a handful per template, remembered)."""
        if not text:
            return []
        memo = self._literal_memo.get(text)
        if memo is None:
            memo = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            _bounded_put(self._literal_memo, text, memo, TEXT_MEMO_ENTRIES)
        return list(memo)

    def render(self, request: FillRequest) -> list[int]:
        values = {"language": request.language or "code", "path": request.path or "untitled"}
        ids: list[int] = []
        for segment in self.template.segments:
            if segment == "{prefix}":
                ids += self.prefix_ids(request.prefix, request.document)
            elif segment == "{suffix}":
                ids += self.suffix_ids(request.suffix)
            elif segment == "{context}":
                ids += self.context_ids(request)
            else:
                ids += self._literal_with_fields(segment, values)
        return ids

    def _literal_with_fields(self, segment: str, values: dict[str, str]) -> list[int]:
        ids: list[int] = []
        position = 0
        for match in FIELD.finditer(segment):
            ids += self.literal_ids(segment[position : match.start()])
            ids += self.text_ids(values.get(match.group(1), ""))
            position = match.end()
        return ids + self.literal_ids(segment[position:])

    def suffix_ids(self, suffix: str) -> list[int]:
        budget = self.template.budgets["suffix"]
        return self.text_ids(suffix[: budget * CHARS_PER_TOKEN_CAP])[:budget]

    def prefix_ids(self, prefix: str, document: str = "") -> list[int]:
        """The end of the prefix that fits the budget, starting on a grid line so it is stable while typing; for a
        `document`, where its last window started if that line is still there and the window from it still
        fits (holding at least half of what a fresh window would)."""
        budget = self.template.budgets["prefix"]
        lines = prefix.split("\n")
        first = max(0, len(lines) - budget - 1)  # every line costs at least one token (its newline)
        pieces = [line + "\n" for line in lines[first:-1]] + [lines[-1]]
        counts = self.line_token_counts([piece[: budget * CHARS_PER_TOKEN_CAP] for piece in pieces])
        total, start = 0, len(lines) - 1
        for index in range(len(pieces) - 1, -1, -1):  # the most lines from the end that fit
            total += counts[index]
            if total > budget:
                break
            start = first + index
        kept = self._kept_start(document, lines, start, counts[start - first :])
        if kept is not None:
            start = kept
        else:
            grid_start = _round_up(start, LINE_GRID)
            if grid_start < len(lines) - 1:
                start = grid_start  # a line number on the grid: the same window for many keystrokes
        if document:  # most recently used last, so the memo forgets the documents left longest ago
            self._window_starts.pop(document, None)
            _bounded_put(self._window_starts, document, (start, lines[start]), WINDOW_MEMO_ENTRIES)
        window = "\n".join(lines[start:])[-budget * CHARS_PER_TOKEN_CAP :]
        return self.text_ids(window)[-budget:]

    def _kept_start(self, document: str, lines: list[str], earliest: int, fitting: list[int]) -> int | None:
        """The document's last window start if it can stay: the same line text at the same line number, at or
        after the `earliest` start that fits, before the last line, and holding at least half the tokens the
        window from `earliest` (token counts per line: `fitting`) would hold. (Only which window to encode is
        decided here: the prompt cache reuses what it holds by comparing tokens.)"""
        last = self._window_starts.get(document) if document else None
        if last is None:
            return None
        start, line = last
        if not earliest <= start < len(lines) - 1 or lines[start] != line:
            return None
        return start if 2 * sum(fitting[start - earliest :]) >= sum(fitting) else None

    def context_ids(self, request: FillRequest) -> list[int]:
        budget = self.template.budgets["context"]
        ids: list[int] = []
        for snippet in request.context:
            if len(ids) >= budget:
                break
            ids += self._literal_with_fields(self.template.context_item, {"path": snippet.path, "text": snippet.text})
        return ids[:budget]


def _bounded_put(memo: dict[str, Any], key: str, value: Any, limit: int) -> None:
    """Insert into a memo that forgets its oldest entries once it holds `limit` of them."""
    if len(memo) >= limit:
        for old in list(memo)[: limit // 2]:
            del memo[old]
    memo[key] = value


def _round_up(value: int, grid: int) -> int:
    return -(-value // grid) * grid
