"""The tokenizer contract: fixed special ids, exact round trips, specials as single tokens, HF reload."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.training import tokenizer as tokenizer_lib
from engine.training.examples import prompt_text

SOURCE = 'def f(x):\n\tif x:  # ünïcode ✓ 😀\r\n        return "<not special>"\n\n\n    pass   \n'


def test_special_token_ids_are_fixed(tokenizer: PreTrainedTokenizerFast) -> None:
    expected = ["<pad>", "<eos>", "<bos>", "<mask>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(8)] == expected
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.mask_token_id) == (
        0, 1, 2, 3)


def test_source_round_trips_exactly(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer(SOURCE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SOURCE


def test_prompt_specials_are_single_tokens_and_round_trip(tokenizer: PreTrainedTokenizerFast) -> None:
    text = prompt_text("def f(x):\n    ", "\n    return y\n", [("pkg/mod.py", "X = 1")])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer_lib.BOS_ID
    assert ids[1] == tokenizer_lib.FILE_SEP_ID
    assert ids[-1] == tokenizer_lib.FIM_MIDDLE_ID
    assert ids.count(tokenizer_lib.FIM_SUFFIX_ID) == 1 and ids.count(tokenizer_lib.FIM_PREFIX_ID) == 1
    assert ids.index(tokenizer_lib.FIM_SUFFIX_ID) < ids.index(tokenizer_lib.FIM_PREFIX_ID)
    assert tokenizer.decode(ids) == text


def test_saved_tokenizer_loads_with_autotokenizer(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer_lib.save(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.mask_token_id == tokenizer_lib.MASK_ID
    assert loaded.convert_tokens_to_ids("<fim_middle>") == tokenizer_lib.FIM_MIDDLE_ID
    ids = loaded(SOURCE, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(SOURCE, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == SOURCE
