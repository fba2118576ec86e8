"""Tokenized FIM examples and batches: the ``dgls-fim`` prompt, the canvas, and left-padded collation.

Owns the training side of the prompt contract the engine relies on:
``<bos>{context}<fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>`` with the prefix truncated from
its start to ``PREFIX_TOKENS`` and the suffix from its end to ``SUFFIX_TOKENS``, and a canvas of
``middle + <eos> + <pad>...`` of exactly ``CANVAS_LENGTH`` tokens. A middle that does not fit is cut at a
line boundary (the rest joins the suffix); one whose first line does not fit is skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from engine.training import spans
from engine.training.corpus import SourceFile
from engine.training.tokenizer import (
    BOS_ID,
    EOS_ID,
    FILE_SEP_ID,
    FIM_MIDDLE_ID,
    FIM_PREFIX_ID,
    FIM_SUFFIX_ID,
    PAD_ID,
)

CANVAS_LENGTH = 32
PREFIX_TOKENS = 256
SUFFIX_TOKENS = 128
CONTEXT_TOKENS = 96  # training-time cap on extra-snippet context
PREFIX_CHARS = 4 * PREFIX_TOKENS * 2  # character windows taken before tokenizing (cheap, generous)
SUFFIX_CHARS = 4 * SUFFIX_TOKENS * 2


@dataclass(slots=True)
class Example:
    """One training example: prompt ids (encoder) and canvas ids (decoder target)."""

    prompt: list[int]
    canvas: list[int]
    kind: str


def prompt_text(prefix: str, suffix: str, context: list[tuple[str, str]] | None = None) -> str:
    """The ``dgls-fim`` prompt as one string (as the engine builds it, before token truncation)."""
    snippets = "".join(f"<file_sep>{path}\n{text}\n" for path, text in context or [])
    return f"<bos>{snippets}<fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>"


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def fit_middle(tokenizer: PreTrainedTokenizerBase, middle: str, budget: int = CANVAS_LENGTH - 1
               ) -> tuple[list[int], str] | None:
    """(middle ids, leftover text) with the longest line-aligned head of ``middle`` that fits ``budget``."""
    ids = _ids(tokenizer, middle)
    if len(ids) <= budget:
        return ids, ""
    lines = middle.splitlines(keepends=True)
    kept = ""
    for line in lines:
        if len(_ids(tokenizer, kept + line)) > budget:
            break
        kept += line
    if not kept:
        return None
    return _ids(tokenizer, kept), middle[len(kept):]


def build(tokenizer: PreTrainedTokenizerBase, prefix: str, middle: str, suffix: str, kind: str,
          context: list[tuple[str, str]] | None = None, prefix_tokens: int = PREFIX_TOKENS,
          suffix_tokens: int = SUFFIX_TOKENS) -> Example | None:
    """Tokenize one (prefix, middle, suffix) into an ``Example`` or None when the middle cannot fit."""
    fitted = fit_middle(tokenizer, middle)
    if fitted is None:
        return None
    middle_ids, leftover = fitted
    suffix_ids = _ids(tokenizer, (leftover + suffix)[:SUFFIX_CHARS])[:suffix_tokens]
    prefix_ids = _ids(tokenizer, prefix[-PREFIX_CHARS:])[-prefix_tokens:] if prefix_tokens else []
    context_ids: list[int] = []
    for path, text in context or []:
        context_ids += [FILE_SEP_ID] + _ids(tokenizer, f"{path}\n{text}\n")
    prompt = [BOS_ID] + context_ids[:CONTEXT_TOKENS] + [FIM_SUFFIX_ID] + suffix_ids + [FIM_PREFIX_ID]
    prompt += prefix_ids + [FIM_MIDDLE_ID]
    canvas = middle_ids + [EOS_ID] + [PAD_ID] * (CANVAS_LENGTH - 1 - len(middle_ids))
    return Example(prompt, canvas, kind)


def stream(tokenizer: PreTrainedTokenizerBase, sources: list[SourceFile], seed: int,
           per_file: int = 4, context_rate: float = 0.1, short_window_rate: float = 0.5) -> Iterator[Example]:
    """An endless stream of examples: random files, ``per_file`` random spans each.

    With probability ``short_window_rate`` the prefix/suffix windows are drawn uniformly below the engine's
    maxima (the cursor near a file's start or end looks like this, and short prompts make CPU steps cheaper);
    otherwise the engine's exact windows are used.
    """
    rng = random.Random(seed)
    while True:
        source = rng.choice(sources)
        text = source.text
        statements = spans.statement_lines(text, source.language)
        for _ in range(per_file):
            span = spans.cut(text, rng, language=source.language, statements=statements)
            if span is None:
                break
            prefix, middle, suffix = span.parts(text)
            context = None
            if rng.random() < context_rate:
                other = rng.choice(sources)
                start = rng.randrange(max(1, len(other.text) - 400))
                context = [(other.path, other.text[start : start + 400])]
            windows = (PREFIX_TOKENS, SUFFIX_TOKENS)
            if rng.random() < short_window_rate:
                windows = (rng.randint(16, PREFIX_TOKENS), rng.randint(0, SUFFIX_TOKENS))
            example = build(tokenizer, prefix, middle, suffix, span.kind, context, *windows)
            if example is not None:
                yield example


@dataclass(slots=True)
class Batch:
    """Left-padded tensors for one forward pass."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    canvas: torch.Tensor  # [B, C] clean targets
    decoder_attention_mask: torch.Tensor  # [B, S + C]
    decoder_position_ids: torch.Tensor  # [B, C]


def collate(examples: list[Example]) -> Batch:
    """Left-pad prompts; positions count real tokens only, the canvas continues after each prompt."""
    width = max(len(e.prompt) for e in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, width - len(example.prompt):] = torch.tensor(example.prompt)
        attention_mask[row, width - len(example.prompt):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = attention_mask.sum(-1, keepdim=True)
    canvas = torch.tensor([e.canvas for e in examples], dtype=torch.long)
    decoder_attention_mask = torch.cat([attention_mask, torch.ones_like(canvas)], dim=-1)
    decoder_position_ids = lengths + torch.arange(canvas.shape[1])[None, :]
    return Batch(input_ids, attention_mask, position_ids, canvas, decoder_attention_mask, decoder_position_ids)
