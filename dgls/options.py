"""The language server's options: nested dataclasses, camelCase on the wire, validated key by key.

Options arrive as `initializationOptions` and again with `workspace/didChangeConfiguration` (either bare or
under a `dgls` section). Every key is checked on its own: a value of the wrong type or out of range falls back
to its default and its dotted camelCase name (e.g. `deadlines.automaticMs`) is reported, so the server can tell
the user once, in one message, which keys it ignored. Knows nothing about LSP or the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import cattrs

MODES = ("auto", "line", "block")


def _check(predicate: Callable[[Any], bool], hint: str) -> dict[str, Any]:
    return {"check": predicate, "hint": hint}


def _positive(value: float) -> bool:
    return 0 < value <= 600_000


@dataclass(slots=True)
class EngineOptions:
    """Where the engine listens and how to start it when nothing answers."""

    model: str | None = field(default=None, metadata=_check(lambda v: v is None or bool(v), "a directory"))
    socket: str | None = field(default=None, metadata=_check(lambda v: v is None or bool(v), "a path"))
    device: str = field(default="auto", metadata=_check(lambda v: v in ("auto", "cpu", "cuda"), "auto|cpu|cuda"))
    dtype: str = field(
        default="auto",
        metadata=_check(lambda v: v in ("auto", "float32", "bfloat16", "float16"), "auto|float32|bfloat16|float16"),
    )
    start: bool = True
    idle_timeout: float | None = field(
        default=None, metadata=_check(lambda v: v is None or v > 0, "seconds (> 0) or null")
    )
    load_timeout: float = field(default=300.0, metadata=_check(lambda v: v > 0, "seconds (> 0)"))


@dataclass(slots=True)
class DeadlineOptions:
    """Budgets for one engine call, in milliseconds (sized for an RTX-class GPU)."""

    automatic_ms: float = field(default=150.0, metadata=_check(_positive, "a number in (0, 600000]"))
    invoked_ms: float = field(default=2000.0, metadata=_check(_positive, "a number in (0, 600000]"))
    rewrite_ms: float = field(default=10000.0, metadata=_check(_positive, "a number in (0, 600000]"))


@dataclass(slots=True)
class ContextOptions:
    """How much text goes to the model, in tokens (estimated as characters / 4; dgls has no tokenizer)."""

    prefix_tokens: int = field(default=256, metadata=_check(lambda v: 16 <= v <= 100_000, "16..100000"))
    suffix_tokens: int = field(default=128, metadata=_check(lambda v: 0 <= v <= 100_000, "0..100000"))
    extra_tokens: int = field(default=256, metadata=_check(lambda v: 0 <= v <= 100_000, "0..100000"))


@dataclass(slots=True)
class CompletionOptions:
    """What completions look like and when they are offered."""

    languages: list[str] = field(default_factory=lambda: ["*"], metadata=_check(lambda v: bool(v), "non-empty"))
    candidates: int = field(default=3, metadata=_check(lambda v: 1 <= v <= 16, "1..16"))
    debounce_ms: int = field(default=75, metadata=_check(lambda v: 0 <= v <= 10_000, "0..10000"))
    mode: str = field(default="auto", metadata=_check(lambda v: v in MODES, "auto|line|block"))
    seed: int = 0
    prefetch: bool = True  # start a keystroke's fill on its didChange, before the editor asks (`dgls.inline`)

    def enabled_for(self, language_id: str) -> bool:
        return "*" in self.languages or language_id in self.languages


@dataclass(slots=True)
class Options:
    engine: EngineOptions = field(default_factory=EngineOptions)
    deadlines: DeadlineOptions = field(default_factory=DeadlineOptions)
    context: ContextOptions = field(default_factory=ContextOptions)
    completion: CompletionOptions = field(default_factory=CompletionOptions)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _strict(kind: type) -> Callable[[Any, type], Any]:
    """cattrs hooks that refuse lossy coercions (3.7 -> 3, "no" -> True)."""

    def structure(value: Any, _: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _strict_list(value: Any, kind: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    (item_kind,) = get_args(kind)
    return [converter.structure(item, item_kind) for item in value]


converter = cattrs.Converter()
for _kind in (int, float, bool, str):
    converter.register_structure_hook(_kind, _strict(_kind))
converter.register_structure_hook_func(lambda kind: get_origin(kind) is list, _strict_list)


def parse_options(data: Any) -> tuple[Options, list[str]]:
    """Options from untrusted JSON, and the dotted camelCase keys that were invalid (their defaults apply)."""
    options = Options()
    invalid: list[str] = []
    if data is None:
        return options, invalid
    if isinstance(data, dict) and isinstance(data.get("dgls"), dict):
        data = data["dgls"]
    _fill(options, data, "", invalid)
    return options, invalid


def _fill(target: Any, data: Any, path: str, invalid: list[str]) -> None:
    if not isinstance(data, dict):
        invalid.append(path.rstrip(".") or "(options)")
        return
    hints = get_type_hints(type(target))
    known = {camel(f.name): f for f in dataclasses.fields(target)}
    for key, value in data.items():
        spec = known.get(key)
        if spec is None:
            invalid.append(f"{path}{key}")
            continue
        kind = hints[spec.name]
        if dataclasses.is_dataclass(kind):
            _fill(getattr(target, spec.name), value, f"{path}{key}.", invalid)
            continue
        try:
            parsed = converter.structure(value, kind)
            check = spec.metadata.get("check")
            if check is not None and not check(parsed):
                raise ValueError(spec.metadata.get("hint", "invalid"))
        except Exception:  # any structuring or check failure: keep the default, name the key
            invalid.append(f"{path}{key}")
            continue
        setattr(target, spec.name, parsed)


def options_to_wire(options: Options) -> dict[str, Any]:
    """The camelCase JSON form (what clients send)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {camel(f.name): convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    return convert(options)


def invalid_message(invalid: list[str]) -> str:
    keys = ", ".join(invalid)
    return f"[dgls] ignored invalid option(s) {keys}; using their defaults (see the dgls README for valid values)"


def describe_options() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, hint) for every option: the README table is generated from this."""
    rows = []
    for group in dataclasses.fields(Options):
        group_type = get_type_hints(Options)[group.name]
        hints = get_type_hints(group_type)
        for spec in dataclasses.fields(group_type):
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc,operator]
            kind = getattr(hints[spec.name], "__name__", str(hints[spec.name]))
            rows.append((f"{group.name}.{camel(spec.name)}", kind, default, spec.metadata.get("hint", "")))
    return rows
