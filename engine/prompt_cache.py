"""Exact reuse of the causal encoder's KV cache across requests whose prompts share a token prefix.

The encoder is causal, so the keys and values of a prompt's first L tokens do not depend on what follows.
Each entry keeps the *full* per-layer keys/values of one encoded prompt (sliding-window layers record their
past instead of trimming it). A new prompt takes the entry with the longest common token prefix, gets a new
cache holding views of that entry's first L positions, and encodes only the rest. The decoder then reads a
`decode_view` in which sliding layers are trimmed to their window, exactly as a fresh encode would leave them.
Entries are bounded by bytes and evicted least-recently-used. Knows nothing about templates or sampling.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from transformers import DynamicCache


@dataclass(slots=True)
class CacheEntry:
    tokens: tuple[int, ...]
    cache: DynamicCache  # full keys/values of `tokens`, batch 1
    nbytes: int


def common_prefix_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (done in C: ~10 of them for a
    few hundred tokens, where a Python loop over the tokens costs ~30 us per cache entry)."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    equal, different = 0, limit  # a[:equal] == b[:equal], a[:different] != b[:different]
    while different - equal > 1:
        middle = (equal + different) // 2
        if a[equal:middle] == b[equal:middle]:
            equal = middle
        else:
            different = middle
    return equal


def _layers(cache: DynamicCache) -> list[Any]:
    """The attention layers of a cache (DiffusionGemma has no linear-attention layers)."""
    return cast(list[Any], cache.layers)


def cache_nbytes(cache: DynamicCache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in _layers(cache)
        if getattr(layer, "is_initialized", False) and layer.keys is not None
    )


def new_recording_cache(config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.activate_past_recording()
    return cache


def sliced_cache(source: DynamicCache, length: int, config: Any) -> DynamicCache:
    """A recording cache holding views of the first `length` positions of `source` (no copy)."""
    cache = new_recording_cache(config)
    if length == 0:
        return cache
    for layer, src in zip(_layers(cache), _layers(source), strict=True):
        keys, values = src.keys[..., :length, :], src.values[..., :length, :]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length
    return cache


def decode_view(full: DynamicCache, config: Any, batch: int = 1) -> DynamicCache:
    """What the decoder reads: sliding layers trimmed to `window - 1`, expanded to `batch` rows (views)."""
    view = DynamicCache(config=config)
    for layer, src in zip(_layers(view), _layers(full), strict=True):
        keys, values = src.keys, src.values
        window = getattr(layer, "sliding_window", None)
        if window is not None and keys.shape[-2] >= window:
            keys, values = keys[..., -window + 1 :, :], values[..., -window + 1 :, :]
        if batch > 1:
            keys = keys.expand(batch, *keys.shape[1:])
            values = values.expand(batch, *values.shape[1:])
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = src.cumulative_length
    return view


class PromptCache:
    """LRU of encoded prompts, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], CacheEntry] = OrderedDict()
        self.total_bytes = 0  # kept as entries come and go: the engine's status reads it while fills run

    @property
    def nbytes(self) -> int:
        return self.total_bytes

    def longest_prefix(self, tokens: tuple[int, ...]) -> tuple[CacheEntry | None, int]:
        best, best_length = None, 0
        for entry in self.entries.values():
            length = common_prefix_length(entry.tokens, tokens)
            if length > best_length:
                best, best_length = entry, length
        if best is not None:
            self.entries.move_to_end(best.tokens)
        return best, best_length

    def put(self, tokens: tuple[int, ...], cache: DynamicCache) -> None:
        entry = CacheEntry(tokens=tokens, cache=cache, nbytes=cache_nbytes(cache))
        replaced = self.entries.pop(tokens, None)
        if replaced is not None:
            self.total_bytes -= replaced.nbytes
        if entry.nbytes > self.max_bytes:
            return
        self.entries[tokens] = entry
        self.total_bytes += entry.nbytes
        while self.total_bytes > self.max_bytes:
            self.total_bytes -= self.entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.total_bytes = 0
