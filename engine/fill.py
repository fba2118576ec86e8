"""The one question the engine answers: `FillRequest` in, `FillResult` out.

Plain dataclasses with validation, shared by the engine, its client and the language server. No torch here:
`from_dict` turns untrusted JSON into a request or raises `FillRequestError` naming the bad field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["line", "block"]
Priority = Literal["interactive", "rewrite"]


class FillRequestError(ValueError):
    """A fill request that cannot be served as sent; the message names the field and the fix."""


@dataclass(slots=True)
class ContextSnippet:
    """Extra context shown to the model before the suffix, e.g. another open file."""

    path: str
    text: str


@dataclass(slots=True)
class FillRequest:
    """Fill the gap between `prefix` and `suffix`.

    `document`/`version` identify the editor buffer: a newer version of the same document supersedes older
    queued or running requests. `deadline_ms` is the budget for the whole fill; when it runs out the best
    draft so far is returned with `converged=False`. `seed_canvas` starts the canvas from given text (for
    rewrites); `keep_fixed` then keeps those tokens fixed (fill only what the model may change).
    """

    prefix: str
    suffix: str = ""
    language: str = ""
    path: str = ""
    context: list[ContextSnippet] = field(default_factory=list)
    mode: Mode = "line"
    candidates: int = 1
    deadline_ms: float = 2000.0
    seed: int = 0
    document: str = ""
    version: int = 0
    priority: Priority = "interactive"
    seed_canvas: str | None = None
    keep_fixed: bool = False
    use_cache: bool = True
    early_commit: bool = True
    warm_start: bool = True

    @classmethod
    def from_dict(cls, data: Any) -> FillRequest:
        if not isinstance(data, dict):
            raise FillRequestError("fill request must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise FillRequestError(f"unknown field(s) {sorted(unknown)} in fill request")
        if not isinstance(data.get("prefix"), str):
            raise FillRequestError("'prefix' is required and must be a string")
        values = dict(data)
        values["context"] = [_snippet(item) for item in values.get("context") or []]
        request = cls(**values)
        request.validate()
        return request

    def validate(self) -> None:
        for name in ("prefix", "suffix", "language", "path", "document"):
            if not isinstance(getattr(self, name), str):
                raise FillRequestError(f"'{name}' must be a string")
        if self.mode not in ("line", "block"):
            raise FillRequestError(f"'mode' must be 'line' or 'block', got {self.mode!r}")
        if self.priority not in ("interactive", "rewrite"):
            raise FillRequestError(f"'priority' must be 'interactive' or 'rewrite', got {self.priority!r}")
        if not isinstance(self.candidates, int) or not 1 <= self.candidates <= 16:
            raise FillRequestError(f"'candidates' must be an integer from 1 to 16, got {self.candidates!r}")
        if not isinstance(self.deadline_ms, (int, float)) or not 0 < self.deadline_ms <= 600_000:
            raise FillRequestError(f"'deadline_ms' must be a number in (0, 600000], got {self.deadline_ms!r}")
        if not isinstance(self.seed, int) or not isinstance(self.version, int):
            raise FillRequestError("'seed' and 'version' must be integers")
        if self.seed_canvas is not None and not isinstance(self.seed_canvas, str):
            raise FillRequestError("'seed_canvas' must be a string or null")

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON-ready data (what `dataclasses.asdict` gives, built without its deep copies: the
        language server writes one per keystroke)."""
        data = {name: getattr(self, name) for name in _REQUEST_FIELDS}
        data["context"] = [{"path": snippet.path, "text": snippet.text} for snippet in self.context]
        return data


def _snippet(item: Any) -> ContextSnippet:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise FillRequestError("each 'context' item must be an object with string 'path' and 'text'")
    return ContextSnippet(path=str(item.get("path", "")), text=item["text"])


@dataclass(slots=True)
class FillResult:
    """What the engine answers. `text` is the best candidate; `candidates` holds all of them, best first."""

    text: str
    candidates: list[str]
    steps: int
    prompt_tokens: int
    cached_prompt_tokens: int
    converged: bool
    cancelled: bool = False
    warm_start: bool = False
    tokens_per_forward: float = 0.0
    stop_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (what `dataclasses.asdict` gives, without its deep copies)."""
        data = {name: getattr(self, name) for name in _RESULT_FIELDS}
        data["candidates"] = list(self.candidates)
        data["timings"] = dict(self.timings)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FillResult:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


_REQUEST_FIELDS = tuple(FillRequest.__dataclass_fields__)
_RESULT_FIELDS = tuple(FillResult.__dataclass_fields__)
