"""dgls' lean forward (engine/lean_forward.py) against transformers' forward on the same weights: logits, the
prompt keys/values it writes, the fallbacks, and the engine's fills with and without it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from engine.denoiser import Denoiser
from engine.engine import Engine
from engine.fill import FillRequest
from engine.hf_compat import returned_cache, with_cache
from engine.lean_decoder import PromptKV
from engine.lean_forward import LeanForward, select_forward
from engine.loading import load_checkpoint
from engine.prompt_cache import decode_view, new_recording_cache, sliced_cache
from engine.sampling import SamplerSettings

VARIANTS = {
    "dense-experts": {},
    "routed-experts": {"num_experts": 16, "top_k_experts": 3},
    "more-heads": {"num_attention_heads": 4, "num_key_value_heads": 2, "num_global_key_value_heads": 2},
    "other-softcap": {"final_logit_softcapping": 10.0},
    "encoder-weights-of-its-own": {"own_encoder_scalars": True},
}


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, own_encoder_scalars: bool = False,
               **overrides: Any) -> Any:
    """A random DiffusionGemma with a sliding window of 8, so the test prompts run past it, and layer scalars
    other than 1 (the encoder's equal to the decoder's unless `own_encoder_scalars`)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    text.update(overrides)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                 canvas_length=12))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper logits, as a trained model has
        for encoder_layer, layer in zip(model.model.encoder.language_model.layers, model.model.decoder.layers,
                                        strict=True):
            layer.layer_scalar.uniform_(0.5, 1.5)
            if not own_encoder_scalars:
                encoder_layer.layer_scalar.copy_(layer.layer_scalar)
    return model.to(dtype).eval()


def transformers_encode(model: Any, ids: list[int]) -> Any:
    """The full recording cache of `ids` written by transformers' encoder in one call (engine/engine.py's way)."""
    config = model.config.get_text_config(decoder=True)
    cache = new_recording_cache(config)
    input_ids = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    masks = model.model.encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=torch.empty((1, len(ids), 0), dtype=model.dtype),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.bool), position_ids=positions, **with_cache(cache),
    )
    with torch.no_grad():
        return returned_cache(model.model.encoder(input_ids=input_ids, attention_mask=masks, position_ids=positions,
                                                  **with_cache(cache)))


def transformers_steps(model: Any, full: Any, length: int, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two decoder steps through transformers' forward: without, then with self-conditioning."""
    config = model.config.get_text_config(decoder=True)
    decode = Denoiser(model, SamplerSettings()).decoder(decode_view(full, config, canvas.shape[0]), length,
                                                        canvas.shape[0])
    with torch.no_grad():
        first = decode(canvas, None)
        return first, decode(canvas, first)


def prompt_ids(length: int) -> list[int]:
    return [(11 * i) % 300 + 5 for i in range(length)]


def assert_caches_equal(expected: Any, actual: Any, atol: float) -> None:
    for want, got in zip(expected.layers, actual.layers, strict=True):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=atol)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=atol)
        assert getattr(got, "cumulative_length", None) == getattr(want, "cumulative_length", None)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pending", [0, 1, 7, 30])
def test_decoder_steps_and_prompt_kv_match_transformers(variant: str, batch: int, pending: int) -> None:
    """Logits of two steps (self-conditioning off, then on) and, where the first step encodes the prompt's last
    `pending` tokens, the keys/values it appends; the prompt (30 tokens) runs past the sliding window (8)."""
    model = tiny_model(**VARIANTS[variant])
    config = model.config.get_text_config(decoder=True)
    ids = prompt_ids(30)
    full = transformers_encode(model, ids)
    canvas = torch.randint(0, 320, (batch, 12), generator=torch.Generator().manual_seed(batch))
    first, second = transformers_steps(model, full, len(ids), canvas)

    lean = LeanForward(model)
    assert lean.shared_layers is (variant != "encoder-weights-of-its-own")  # else the first step encodes apart
    prompt = PromptKV(cache=sliced_cache(full, len(ids) - pending, config),
                      pending=torch.tensor([ids[len(ids) - pending:]]), length=len(ids))
    session = lean.session(prompt, len(ids), batch, 12)
    lean_first = session(canvas, None)
    lean_second = session(canvas, lean_first)
    assert prompt.pending.shape[1] == 0  # consumed by the first step
    assert_caches_equal(full, prompt.cache, atol=1e-5)
    torch.testing.assert_close(lean_first, first, rtol=0, atol=1e-4)
    torch.testing.assert_close(lean_second, second, rtol=0, atol=1e-4)
    assert torch.equal(lean_first.argmax(-1), first.argmax(-1))


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_over_a_canvas_cut_short_match_transformers(batch: int) -> None:
    """After a full first step (which also encodes pending prompt tokens), later steps may pass only the first
    positions of each row (the denoiser cuts the canvas after its text's end): same logits as transformers'
    forward over that shorter canvas, at every length down to 1 and back up."""
    model = tiny_model()
    config = model.config.get_text_config(decoder=True)
    ids = prompt_ids(30)
    full = transformers_encode(model, ids)
    canvas = torch.randint(0, 320, (batch, 12), generator=torch.Generator().manual_seed(batch))
    reference = Denoiser(model, SamplerSettings()).decoder(decode_view(full, config, batch), len(ids), batch)
    prompt = PromptKV(cache=sliced_cache(full, len(ids) - 5, config), pending=torch.tensor([ids[-5:]]),
                      length=len(ids))
    session = LeanForward(model).session(prompt, len(ids), batch, 12)
    with torch.no_grad():
        previous = session(canvas, None)
        torch.testing.assert_close(previous, reference(canvas, None), rtol=0, atol=1e-4)
        for length in (7, 3, 1, 12):
            cut = canvas[:, :length]
            ours, theirs = session(cut, previous[:, :length]), reference(cut, previous[:, :length])
            assert ours.shape == (batch, length, 320)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_decoder_view_serves_as_well_as_a_prompt() -> None:
    model = tiny_model()
    config = model.config.get_text_config(decoder=True)
    ids = prompt_ids(20)
    full = transformers_encode(model, ids)
    canvas = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    first, _ = transformers_steps(model, full, len(ids), canvas)
    session = LeanForward(model).session(decode_view(full, config, 2), len(ids), 2, 12)
    torch.testing.assert_close(session(canvas, None), first, rtol=0, atol=1e-4)


def test_bfloat16_model_matches_within_its_precision() -> None:
    model = tiny_model(dtype=torch.bfloat16)
    ids = prompt_ids(24)
    full = transformers_encode(model, ids)
    canvas = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    first, _ = transformers_steps(model, full, len(ids), canvas)
    config = model.config.get_text_config(decoder=True)
    prompt = PromptKV(cache=sliced_cache(full, 20, config), pending=torch.tensor([ids[20:]]), length=len(ids))
    lean_first = LeanForward(model).session(prompt, len(ids), 1, 12)(canvas, None)
    assert lean_first.dtype == torch.float32
    assert float((lean_first - first).abs().max()) <= 5e-2 * float(first.abs().max())


def test_encode_in_chunks_writes_transformers_cache() -> None:
    model = tiny_model()
    config = model.config.get_text_config(decoder=True)
    ids = prompt_ids(29)
    cache = new_recording_cache(config)
    lean = LeanForward(model)
    for start, end in ((0, 5), (5, 6), (6, 29)):  # chunks that start before and after the window fills
        lean.encode(cache, torch.tensor([ids[start:end]]), start)
    assert_caches_equal(transformers_encode(model, ids), cache, atol=1e-5)


def test_fusing_projections_keeps_the_model_and_adds_no_copy() -> None:
    """q/k/v and gate/up become row blocks of one tensor each: the model's own weights are views of it (no second
    copy), transformers' forward gives the same logits as before, and a second LeanForward fuses nothing again."""
    model = tiny_model()
    ids = prompt_ids(16)
    canvas = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    before, _ = transformers_steps(model, transformers_encode(model, ids), len(ids), canvas)
    lean = LeanForward(model)
    attention = model.model.decoder.layers[0].self_attn
    fused = lean.layers[0].qkv
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attention.k_proj.weight.data_ptr() == fused[attention.q_proj.out_features:].data_ptr()
    assert model.model.encoder.language_model.layers[0].self_attn.q_proj.weight.data_ptr() == fused.data_ptr()
    after, _ = transformers_steps(model, transformers_encode(model, ids), len(ids), canvas)
    assert torch.equal(before, after)
    assert LeanForward(model).layers[0].qkv is fused


def test_unsupported_models_and_modes(caplog: pytest.LogCaptureFixture) -> None:
    from engine.quantize import quantize_model

    model = tiny_model()
    assert LeanForward.unsupported(model) is None
    assert isinstance(select_forward(model, "auto"), LeanForward)
    assert select_forward(model, "off") is None
    with pytest.raises(ValueError, match="unknown forward mode 'fast'; use auto, on or off"):
        select_forward(model, "fast")
    quantize_model(model, "int8")
    assert "quantized" in (LeanForward.unsupported(model) or "")
    with caplog.at_level(logging.INFO, logger="dgls.engine"):
        assert select_forward(model, "auto") is None
    assert "lean forward off: quantized" in caplog.text
    with pytest.raises(ValueError, match="--lean-forward on: quantized"):
        select_forward(model, "on")


# --- the engine with the lean forward (the shipped default model) ------------------------------------------

@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return Engine(load_checkpoint(None, device="cpu")), Engine(load_checkpoint(None, device="cpu"), lean_forward="off")


REQUESTS = [
    ("import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        return ", "\n", "line"),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n\n    def push(self, item):\n", "line"),
    ("def add(a, b):\n", "\n\nprint(add(1, 2))\n", "block"),
]


@pytest.mark.parametrize("prefix, suffix, mode", REQUESTS)
def test_engine_fills_equal_with_and_without_the_lean_forward(engines: tuple[Engine, Engine], prefix: str,
                                                               suffix: str, mode: str) -> None:
    lean, reference = engines
    assert lean.describe()["forward"] == "lean" and reference.describe()["forward"] == "transformers"
    for seed in (0, 1):
        for candidates in (1, 2):
            request = FillRequest(prefix=prefix, suffix=suffix, mode=mode, seed=seed, candidates=candidates,
                                  deadline_ms=60_000, use_cache=False)
            ours, theirs = lean.fill(request), reference.fill(request)
            assert (ours.candidates, ours.steps, ours.stop_reason) == (theirs.candidates, theirs.steps,
                                                                      theirs.stop_reason)


def test_first_step_encodes_the_rest_and_the_cache_serves_the_next_keystroke(engines: tuple[Engine, Engine]) -> None:
    lean, reference = engines
    prefix, suffix, mode = REQUESTS[0]
    lean.cache.clear()
    first = lean.fill(FillRequest(prefix=prefix, suffix=suffix, mode=mode, document="k", deadline_ms=60_000))
    assert first.cached_prompt_tokens == 0 and len(lean.cache.entries) == 1
    typed = FillRequest(prefix=prefix + "s", suffix=suffix, mode=mode, document="k", deadline_ms=60_000)
    second = lean.fill(typed)
    assert second.prompt_tokens - second.cached_prompt_tokens <= 3  # only the changed tail is encoded
    fresh = reference.fill(FillRequest(prefix=prefix + "s", suffix=suffix, mode=mode, deadline_ms=60_000,
                                       use_cache=False))
    assert second.text == fresh.text  # the reused cache changes nothing


def test_cancelled_before_the_first_step_stores_no_partial_prompt(engines: tuple[Engine, Engine]) -> None:
    lean, _ = engines
    lean.cache.clear()
    request = FillRequest(prefix=REQUESTS[1][0], suffix=REQUESTS[1][1], deadline_ms=60_000)
    result = lean.fill(request, cancelled=lambda: True)
    assert result.cancelled and result.steps == 0
    assert not lean.cache.entries  # its tail was never encoded
    assert lean.fill(request).cached_prompt_tokens == 0


def test_cancelled_in_the_middle_of_the_first_step_stores_nothing_and_corrupts_nothing(
        engines: tuple[Engine, Engine]) -> None:
    """A cancel seen two layers into the first step (which encodes the prompt's rest into a cache extending a
    stored one) stores no entry, and the stored prefix still gives the fill an uncancelled run gives."""
    lean, _ = engines
    lean.cache.clear()
    first = FillRequest(prefix=REQUESTS[1][0], suffix=REQUESTS[1][1], deadline_ms=60_000, document="m")
    lean.fill(first)
    entries = list(lean.cache.entries)
    typed = FillRequest(prefix=REQUESTS[1][0] + "se", suffix=REQUESTS[1][1], deadline_ms=60_000, document="m",
                        warm_start=False)  # so that it compares with a fill of no document
    polls = {"n": 0}

    def cancelled() -> bool:
        polls["n"] += 1
        return polls["n"] >= 3  # before the step, layer 1: no; layer 2: yes

    result = lean.fill(typed, cancelled=cancelled)
    assert result.cancelled and result.steps == 0 and polls["n"] == 3
    assert list(lean.cache.entries) == entries
    again = lean.fill(typed)
    assert again.cached_prompt_tokens > 0
    fresh = lean.fill(FillRequest(prefix=REQUESTS[1][0] + "se", suffix=REQUESTS[1][1], deadline_ms=60_000,
                                  use_cache=False))
    assert again.text == fresh.text


def test_warm_up_keeps_transformers_forward_when_the_lean_one_disagrees_or_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from engine import lean_decoder

    original = lean_decoder.DecoderSession.__call__

    def shifted(self: Any, canvas: torch.Tensor, sc: Any) -> torch.Tensor:
        return original(self, canvas, sc) + 1

    monkeypatch.setattr(lean_decoder.DecoderSession, "__call__", shifted)
    engine = Engine(load_checkpoint(None, device="cpu"))
    with caplog.at_level(logging.WARNING, logger="dgls.engine"):
        engine.warm_up()
    assert engine.denoiser.lean is None and engine.describe()["forward"] == "transformers"
    assert "lean forward differs from transformers'" in caplog.text

    def broken(self: Any, canvas: torch.Tensor, sc: Any) -> torch.Tensor:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(lean_decoder.DecoderSession, "__call__", broken)
    engine = Engine(load_checkpoint(None, device="cpu"))
    engine.warm_up()
    assert engine.denoiser.lean is None
    assert "lean forward failed in the warm-up (RuntimeError: no kernel)" in caplog.text
    assert engine.fill(FillRequest(prefix="x = ", suffix="\n", deadline_ms=60_000)).steps >= 1
