"""The default model's tokenizer: byte-level BPE trained on the corpus, with dgls' fixed special tokens.

Owns the special-token ids (the contract the engine relies on), training the BPE with the ``tokenizers``
library, and saving it so that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it. Byte-level
pre-tokenization and decoding make every string round-trip exactly. Knows nothing about the model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<mask>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>",
)
PAD_ID, EOS_ID, BOS_ID, MASK_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID, FILE_SEP_ID = range(8)
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose first ids are exactly ``SPECIAL_TOKENS``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, not {token_id}")
    return wrap(tokenizer)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a trained tokenizer, with pad/eos/bos/mask and the FIM tokens set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        mask_token="<mask>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def sample_texts(texts: list[str], max_chars: int, seed: int = 0) -> list[str]:
    """A deterministic random sample of whole texts up to ``max_chars`` characters in total."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for index in order:
        if total >= max_chars:
            break
        picked.append(texts[index])
        total += len(texts[index])
    return picked


def save(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
