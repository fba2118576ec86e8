"""Exact prompt KV-cache reuse: a fill through a reused cache equals a fill from scratch, token for token."""

from __future__ import annotations

import random

import pytest

from engine.engine import Engine
from engine.fill import FillRequest
from engine.loading import load_checkpoint

BASE = "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"


def fills(engine: Engine, prefix: str, use_cache: bool, seed: int = 5):
    return engine.fill(FillRequest(prefix=prefix, suffix="\nprint(1)\n", deadline_ms=60_000, seed=seed,
                                   early_commit=False, use_cache=use_cache, mode="block"))


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sliding_model_dir"])
def test_reused_cache_gives_identical_fills(request, model_fixture: str) -> None:
    engine = Engine(load_checkpoint(request.getfixturevalue(model_fixture), device="cpu"))
    typed = BASE + "    def push(self, item):\n        self.items.app"
    first = fills(engine, typed, use_cache=True)
    assert first.cached_prompt_tokens == 0
    for extra in ("e", "en", "end(item)"):  # keep typing: each prompt extends the previous one
        cached = fills(engine, typed + extra, use_cache=True)
        fresh = fills(engine, typed + extra, use_cache=False)
        assert cached.cached_prompt_tokens >= 0.8 * cached.prompt_tokens
        assert cached.candidates == fresh.candidates
    # backspace: a prompt that is a prefix of a cached one is reused too
    shorter = fills(engine, typed[:-3], use_cache=True)
    assert shorter.cached_prompt_tokens > 0
    assert shorter.candidates == fills(engine, typed[:-3], use_cache=False).candidates


def test_sliding_window_prompt_longer_than_window(tiny_sliding_model_dir) -> None:
    engine = Engine(load_checkpoint(tiny_sliding_model_dir, device="cpu"))
    assert engine.builder.render(FillRequest(prefix=BASE))  # sanity
    assert len(engine.builder.render(FillRequest(prefix=BASE))) > 16  # longer than the sliding window


def test_cache_is_bounded_by_bytes(tiny_model_dir) -> None:
    engine = Engine(load_checkpoint(tiny_model_dir, device="cpu"), cache_bytes=60_000)
    for index in range(12):
        fills(engine, f"x_{index} = {index}\n" * (index + 1), use_cache=True)
    assert engine.cache.nbytes <= 60_000
    assert 0 < len(engine.cache.entries) < 12


def test_warm_up_leaves_no_cache_entry_or_draft(tiny_model_dir) -> None:
    engine = Engine(load_checkpoint(tiny_model_dir, device="cpu"))
    assert engine.warm_up() > 0
    assert not engine.cache.entries and not engine.drafts


def test_common_prefix_length_equals_a_token_by_token_scan() -> None:
    from engine.prompt_cache import common_prefix_length

    def scan(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        index = 0
        while index < min(len(a), len(b)) and a[index] == b[index]:
            index += 1
        return index

    rng = random.Random(0)
    for _ in range(5000):
        a = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 40)))
        b = a[: rng.randint(0, len(a))] + tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 10)))
        assert common_prefix_length(a, b) == scan(a, b) == common_prefix_length(b, a)


def test_the_byte_total_follows_puts_replacements_evictions_and_clear() -> None:
    """The engine's status reads `nbytes` from the event loop while fills put entries on the model thread, so it
    is a running total (summing the entries then raised 'mutated during iteration'); it must stay exact."""
    import torch

    from engine.prompt_cache import PromptCache, new_recording_cache
    from tests.engine.test_lean_forward import tiny_model

    config = tiny_model().config.get_text_config(decoder=True)

    def encoded(length: int):
        cache = new_recording_cache(config)
        for index in range(config.num_hidden_layers):
            states = torch.zeros(1, 1, length, 32)
            cache.update(states, states, index)
        return cache

    cache = PromptCache(max_bytes=3 * 3 * 2 * 20 * 32 * 4)  # three 20-token entries (3 layers, keys and values)
    for step, length in enumerate([20, 20, 10, 20, 20, 5]):
        cache.put((step,) * length, encoded(length))
        cache.put((step,) * length, encoded(length))  # the same prompt again replaces, never double-counts
        assert cache.nbytes == sum(entry.nbytes for entry in cache.entries.values()) <= cache.max_bytes
    assert len(cache.entries) < 6  # the oldest were evicted
    cache.clear()
    assert cache.nbytes == 0 and not cache.entries
