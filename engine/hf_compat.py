"""The two spellings of transformers' KV-cache argument: `past_key_values` up to 5.23, `cache` from 5.24 (where
the old name is deprecated for model calls, gone from some helpers such as
`create_diffusion_decoder_attention_mask`, and outputs carry `.cache`). Everything in dgls that hands transformers
a cache, or reads one back, goes through here, so both versions serve."""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.diffusion_gemma import modeling_diffusion_gemma

CACHE_ARG = ("cache" if "cache" in inspect.signature(modeling_diffusion_gemma.DiffusionGemmaDecoderModel.forward)
             .parameters else "past_key_values")


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass `cache` to a transformers call, in this version's spelling."""
    return {CACHE_ARG: cache}


def returned_cache(output: Any) -> Any:
    """The cache a transformers call returned."""
    return getattr(output, CACHE_ARG)
