"""Options: camelCase on the wire, nested groups, every invalid key falls back to its default and is named."""

from __future__ import annotations

from dgls.options import Options, describe_options, invalid_message, options_to_wire, parse_options


def test_defaults_when_nothing_is_sent() -> None:
    options, invalid = parse_options(None)
    assert options == Options() and invalid == []
    assert options.deadlines.automatic_ms == 150 and options.deadlines.invoked_ms == 2000
    assert options.deadlines.rewrite_ms == 10_000


def test_camel_case_nested_values_are_read() -> None:
    options, invalid = parse_options({
        "engine": {"model": "/m", "socket": "/s.sock", "device": "cpu", "idleTimeout": 60},
        "deadlines": {"automaticMs": 300, "invokedMs": 2500.5},
        "context": {"prefixTokens": 512},
        "completion": {"languages": ["python", "go"], "candidates": 5, "debounceMs": 10, "mode": "line"},
    })
    assert invalid == []
    assert options.engine.model == "/m" and options.engine.idle_timeout == 60.0
    assert options.deadlines.automatic_ms == 300.0 and options.deadlines.invoked_ms == 2500.5
    assert options.context.prefix_tokens == 512
    assert options.completion.enabled_for("go") and not options.completion.enabled_for("rust")


def test_invalid_values_fall_back_key_by_key() -> None:
    options, invalid = parse_options({
        "deadlines": {"automaticMs": "fast", "invokedMs": -1, "rewriteMs": 5000},
        "completion": {"candidates": 99, "languages": "python", "debounceMs": 2.5},
        "context": {"prefixTokens": True},
        "engine": {"device": "tpu", "start": "yes"},
        "nope": 1,
    })
    assert sorted(invalid) == sorted([
        "deadlines.automaticMs", "deadlines.invokedMs", "completion.candidates", "completion.languages",
        "completion.debounceMs", "context.prefixTokens", "engine.device", "engine.start", "nope",
    ])
    assert options.deadlines.automatic_ms == 150 and options.deadlines.rewrite_ms == 5000
    assert options.completion.candidates == 3 and options.engine.device == "auto" and options.engine.start is True
    message = invalid_message(invalid)
    assert message.startswith("[dgls]") and "deadlines.automaticMs" in message and "\n" not in message


def test_a_dgls_section_and_a_non_object_group() -> None:
    options, invalid = parse_options({"dgls": {"completion": {"candidates": 2}}})
    assert options.completion.candidates == 2 and invalid == []
    _, invalid = parse_options({"deadlines": 5})
    assert invalid == ["deadlines"]
    _, invalid = parse_options([1, 2])
    assert invalid == ["(options)"]


def test_wire_form_round_trips_and_every_option_is_described() -> None:
    wire = options_to_wire(Options())
    assert parse_options(wire) == (Options(), [])
    keys = {row[0] for row in describe_options()}
    assert "deadlines.automaticMs" in keys and "completion.debounceMs" in keys and "engine.model" in keys
    assert len(keys) == sum(len(group) for group in wire.values())
