"""The denoising loop on real tiny models: parity with transformers, deadline, early commit, cancellation,
candidates, seeded canvases, and both noise processes."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from engine.engine import Engine
from engine.fill import FillRequest
from engine.loading import load_checkpoint

PREFIX = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        "
SUFFIX = "\n\n    def pop(self):\n        return self.items.pop()\n"


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(load_checkpoint(tiny_model_dir, device="cpu"))


@pytest.fixture(scope="module")
def mask_engine(tiny_mask_model_dir) -> Engine:
    return Engine(load_checkpoint(tiny_mask_model_dir, device="cpu"))


def request(**overrides) -> FillRequest:
    values = dict(prefix=PREFIX, suffix=SUFFIX, deadline_ms=60_000, early_commit=False, use_cache=False)
    values.update(overrides)
    return FillRequest(**values)


def canvas_tokens(engine: Engine, fill: FillRequest) -> list[int]:
    """The raw canvas our loop produces (before text post-processing)."""
    ids = engine.builder.render(fill)
    full, _ = engine._encode(tuple(ids), use_cache=False)
    from engine.denoiser import DenoiseControl
    from engine.prompt_cache import decode_view

    out = engine.denoiser.run(
        decode_view(full, engine.text_config), len(ids), 1, torch.Generator().manual_seed(fill.seed), DenoiseControl()
    )
    return out.canvas[0].tolist()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fill_equals_transformers_generate_token_for_token(engine: Engine, seed: int) -> None:
    fill = request(seed=seed)
    ids = engine.builder.render(fill)
    torch.manual_seed(seed)
    reference = engine.model.generate(torch.tensor([ids]), max_new_tokens=engine.denoiser.canvas_length)
    expected = reference.sequences[0, len(ids):].tolist()
    ours = canvas_tokens(engine, fill)
    # generate pads after the first EOS; compare up to and including it
    eos = expected.index(1) + 1 if 1 in expected else len(expected)
    assert ours[:eos] == expected[:eos]


def test_result_reports_steps_and_timings(engine: Engine) -> None:
    result = engine.fill(request())
    assert 1 <= result.steps <= engine.settings.max_steps
    assert result.prompt_tokens == len(engine.builder.render(request()))
    assert result.timings["total_ms"] >= result.timings["denoise_ms"] > 0
    assert result.stop_reason in ("converged", "max_steps")


def test_deadline_returns_the_draft_so_far(engine: Engine) -> None:
    slow = engine.fill(request(deadline_ms=60_000))
    assert slow.steps > 1, "the tiny model must need more than one step for this test to mean anything"
    rushed = engine.fill(request(deadline_ms=0.001))
    assert rushed.steps == 1
    assert rushed.converged is False
    assert rushed.stop_reason == "deadline"
    assert isinstance(rushed.text, str)


def test_early_commit_stops_once_the_line_is_settled(engine: Engine) -> None:
    # A fixed seed canvas ending in a newline settles the line in the first step.
    seeded = dict(seed_canvas="self.items.append(item)\n", keep_fixed=True, mode="line")
    full = engine.fill(request(**seeded, early_commit=False))
    early = engine.fill(request(**seeded, early_commit=True))
    assert early.stop_reason == "early_commit"
    assert early.steps == 1 < full.steps
    assert early.text == "self.items.append(item)"
    assert early.converged is True


def test_line_mode_commits_at_the_first_newline_block_mode_at_eos(engine: Engine) -> None:
    newline = engine.builder.text_ids("\n")[0]
    row = [40, 41, newline, 42, 43, 1, 44, 45]  # "..", newline, "..", EOS, ...
    argmax = torch.tensor([row])
    settled = torch.ones_like(argmax, dtype=torch.bool)
    finished = torch.zeros(1, dtype=torch.bool)
    for mode, expected in (("line", 3), ("block", 6)):
        committed = [0]
        engine.denoiser._commit(argmax, settled, mode, finished, committed)
        assert committed == [expected]
    unsettled = settled.clone()
    unsettled[0, 1] = False  # a token before the line end is still uncertain: no commit
    committed = [0]
    engine.denoiser._commit(argmax, unsettled, "line", finished, committed)
    assert committed == [0]


def polls_until(true_from: int) -> tuple[dict[str, int], Any]:
    """A `cancelled` callback that turns true at its `true_from`-th call, and its call count."""
    polls = {"n": 0}

    def cancelled() -> bool:
        polls["n"] += 1
        return polls["n"] >= true_from

    return polls, cancelled


def test_cancellation_stops_at_the_next_step_with_transformers_forward(tiny_model_dir) -> None:
    reference = Engine(load_checkpoint(tiny_model_dir, device="cpu"), lean_forward="off")
    polls, cancelled = polls_until(2)  # before the first step: no; before the second: yes
    result = reference.fill(request(), cancelled=cancelled)
    assert result.cancelled is True and result.steps == 1 and polls["n"] == 2


def test_cancellation_stops_mid_step_at_the_next_layer(engine: Engine) -> None:
    """With dgls' forward the callback is also polled before each layer: a cancel that arrives two layers into
    the second step stops there (it does not finish the step), and the fill reports the one finished step."""
    layers = len(engine.denoiser.lean.layers)
    true_from = 1 + layers + 1 + 2  # before step 1, its layers, before step 2, two layers of step 2
    polls, cancelled = polls_until(true_from)
    result = engine.fill(request(), cancelled=cancelled)
    assert result.cancelled is True and result.stop_reason == "cancelled"
    assert result.steps == 1
    assert polls["n"] == true_from  # nothing ran after the cancel was seen

    from engine.denoiser import DenoiseControl
    from engine.prompt_cache import decode_view

    ids = engine.builder.render(request())
    full, _ = engine._encode(tuple(ids), use_cache=False)
    _, cancelled = polls_until(true_from)
    output = engine.denoiser.run(decode_view(full, engine.text_config), len(ids), 1, torch.Generator().manual_seed(0),
                                 DenoiseControl(cancelled=cancelled))
    assert output.cancelled and output.steps == 1
    assert output.forwards == [1]  # the stopped step's forward is not counted


def test_candidates_are_one_batch_with_different_samples(engine: Engine) -> None:
    canvases, result = recorded_canvases(engine, request(candidates=4, mode="block"))
    assert len(canvases) == result.steps  # one decoder forward per step for all four
    assert {canvas.shape[0] for canvas in canvases} == {4}
    assert 2 <= len(result.candidates) <= 4  # random rows differ; duplicates are merged
    assert result.text == result.candidates[0]


def test_seeded_canvas_keeps_fixed_positions(engine: Engine) -> None:
    result = engine.fill(request(seed_canvas="return self", keep_fixed=True, mode="block"))
    assert result.text.startswith("return self")


def test_mask_noise_never_emits_the_mask_token(mask_engine: Engine) -> None:
    result = mask_engine.fill(request(mode="block", candidates=2))
    assert "<mask>" not in result.text
    tokens = canvas_tokens(mask_engine, request(mode="block"))
    assert 3 not in tokens


def test_mask_noise_starts_from_an_all_mask_canvas(mask_engine: Engine) -> None:
    canvas = mask_engine.denoiser.noise_like(2, None)
    assert canvas.eq(3).all()


def test_deadline_is_respected_in_wall_time(engine: Engine) -> None:
    started = time.monotonic()
    engine.fill(request(deadline_ms=1.0))
    assert time.monotonic() - started < 5.0  # one step at most, not the whole schedule


def test_warm_start_from_the_documents_last_completion(engine: Engine) -> None:
    base = dict(document="file:///w.py", deadline_ms=60_000, mode="block", early_commit=False)
    first = None
    for seed in range(20):  # find a seed whose completion is long enough to type into
        first = engine.fill(FillRequest(prefix=PREFIX, suffix=SUFFIX, seed=seed, **base))
        if len(first.text) >= 2:
            break
    assert first is not None and len(first.text) >= 2
    typed = engine.fill(FillRequest(prefix=PREFIX + first.text[0], suffix=SUFFIX, **base))
    assert typed.warm_start is True
    # not warm: text the completion did not predict, another suffix, or warm starts switched off
    assert engine.fill(FillRequest(prefix=PREFIX + "\x01", suffix=SUFFIX, **base)).warm_start is False
    engine.fill(FillRequest(prefix=PREFIX, suffix=SUFFIX, seed=0, **base))
    last = engine.drafts[base["document"]][2]
    if last:
        assert engine.fill(FillRequest(prefix=PREFIX + last[0], suffix="other", **base)).warm_start is False
        engine.fill(FillRequest(prefix=PREFIX, suffix=SUFFIX, seed=0, **base))
        off = engine.fill(FillRequest(prefix=PREFIX + last[0], suffix=SUFFIX, warm_start=False, **base))
        assert off.warm_start is False


def test_token_entropy_is_bit_identical_to_categorical() -> None:
    from engine.sampling import token_entropy

    logits = torch.randn(3, 16, 320, generator=torch.Generator().manual_seed(0)) * 5
    logits[..., 3] = float("-inf")  # a suppressed token, as with mask noise
    assert torch.equal(token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_absorbing_noise_keeps_decided_tokens(mask_engine: Engine) -> None:
    canvases, result = recorded_canvases(mask_engine, request(mode="block", candidates=2))
    assert canvases[0].eq(3).all()  # every position starts masked
    for before, after in zip(canvases, canvases[1:], strict=False):
        kept = before[:, : after.shape[1]]  # a canvas cut after its text's end keeps its first positions
        decided = kept.ne(3)
        assert torch.equal(after[decided], kept[decided])  # a decided token never changes or is re-masked
        assert after.ne(3).sum() > decided.sum()  # each step decides at least one more position
    assert "<mask>" not in "".join(result.candidates)


def recorded_canvases(engine: Engine, fill: FillRequest) -> tuple[list[torch.Tensor], Any]:
    """The canvas each decoder call of one fill receives, and the fill's result."""
    canvases: list[torch.Tensor] = []
    original = engine.denoiser.decoder

    def recording_decoder(*args):
        decode = original(*args)

        def recorded(canvas, self_conditioning):
            canvases.append(canvas.clone())
            return decode(canvas, self_conditioning)

        return recorded

    engine.denoiser.decoder = recording_decoder
    try:
        return canvases, engine.fill(fill)
    finally:
        engine.denoiser.decoder = original


@pytest.fixture(scope="module")
def shipped_engine() -> Engine:
    """The shipped model: trained, so it decides where its text ends within a step or two."""
    return Engine(load_checkpoint(None, device="cpu"))


CUT_REQUESTS = [
    dict(prefix="def area(width, height):\n    return ", suffix="\n", mode="line"),
    dict(prefix="import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        ", suffix="\n",
         mode="line", candidates=2),
    dict(prefix="def add(a, b):\n", suffix="\n\nprint(add(1, 2))\n", mode="block", candidates=3),
]


def test_absorbing_noise_cuts_the_canvas_after_every_rows_decided_end(shipped_engine: Engine) -> None:
    """Once every row holds a decided EOS or padding token, the next steps see the canvas only up to the row
    where that comes last; decided tokens never change; the fill still returns a full-length draft."""
    end_ids = {1, 0}  # the shipped model's EOS and padding
    cuts = 0
    for seed in (0, 1, 2):
        for values in CUT_REQUESTS:
            fill = request(seed=seed, early_commit=True, **values)
            canvases, result = recorded_canvases(shipped_engine, fill)
            assert canvases[0].shape[1] == shipped_engine.denoiser.canvas_length
            for before, after in zip(canvases, canvases[1:], strict=False):
                length = after.shape[1]
                decided = before[:, :length].ne(3)
                assert torch.equal(after[decided], before[:, :length][decided])
                if length < before.shape[1]:
                    cuts += 1
                    # the step before decided an end token in every row; the latest of them is the last kept position
                    firsts = [next(i for i, token in enumerate(row.tolist()) if token in end_ids) for row in after]
                    assert max(firsts) == length - 1
            assert "<mask>" not in "".join(result.candidates) and result.converged
    assert cuts >= 3  # most of these fills cut their canvas


def test_canvas_cut_can_be_turned_off(shipped_engine: Engine) -> None:
    from dataclasses import replace

    from engine.sampling import SamplerSettings

    full = Engine(shipped_engine.loaded, settings=replace(shipped_engine.settings, cut_canvas=False))
    for values in CUT_REQUESTS:
        canvases, _ = recorded_canvases(full, request(early_commit=True, **values))
        assert {canvas.shape[1] for canvas in canvases} == {full.denoiser.canvas_length}
    config = shipped_engine.model.generation_config
    assert SamplerSettings.from_generation_config(config).cut_canvas is True
    config.dgls_cut_canvas = False
    try:
        assert SamplerSettings.from_generation_config(config).cut_canvas is False
    finally:
        del config.dgls_cut_canvas


def test_a_rewrite_with_fixed_tokens_is_cut_too(shipped_engine: Engine) -> None:
    """A rewrite keeps its seeded tokens fixed; when its canvas is cut, the fixed positions are cut with it."""
    seed = "return a + b"
    fill = FillRequest(prefix="def add(a, b):\n    ", suffix="\n\n\nprint(add(1, 2))\n", mode="block",
                       seed_canvas=seed, keep_fixed=True, deadline_ms=60_000, use_cache=False)
    canvases, result = recorded_canvases(shipped_engine, fill)
    assert min(canvas.shape[1] for canvas in canvases) < shipped_engine.denoiser.canvas_length
    assert result.text.startswith(seed) and result.converged


def test_a_cut_canvas_returns_padding_after_it(shipped_engine: Engine) -> None:
    """Positions after the cut come back as padding, never as guesses for positions no step decided."""
    for values in CUT_REQUESTS:
        fill = request(**{**values, "candidates": 1})
        tokens = canvas_tokens(shipped_engine, fill)
        assert len(tokens) == shipped_engine.denoiser.canvas_length
        first_end = next(i for i, token in enumerate(tokens) if token in (0, 1))
        assert set(tokens[first_end + 1 :]) <= {0, 1}, tokens


def test_absorbing_noise_is_done_when_nothing_before_the_text_end_is_masked(mask_engine: Engine) -> None:
    decided = mask_engine.denoiser._decided
    assert decided(torch.tensor([[40, 41, 1, 3, 3]])).item() is True  # masks only after EOS
    assert decided(torch.tensor([[40, 41, 0, 3, 3]])).item() is True  # ... or after padding (the training layout)
    assert decided(torch.tensor([[40, 3, 1, 3, 3]])).item() is False
    assert decided(torch.tensor([[40, 3, 0, 3, 3]])).item() is False
    assert decided(torch.tensor([[40, 41, 42, 43, 44]])).item() is True


def test_the_text_ends_at_eos_and_under_absorbing_noise_at_padding(engine: Engine, mask_engine: Engine) -> None:
    """dgls' absorbing-noise models learned middle + EOS + padding: text after a padding token is not theirs.
    Uniform noise keeps transformers' rule (EOS ends it, padding is dropped)."""
    assert mask_engine._until_end([40, 41, 0, 42, 1]) == [40, 41]
    assert mask_engine._until_end([40, 41, 1, 42, 0]) == [40, 41]
    assert engine._until_end([40, 41, 0, 42, 1]) == [40, 41, 0, 42]
    assert engine._until_end([40, 0, 41]) == [40, 41]


def test_cdf_sampling_draws_from_the_softmax_and_never_a_zero_probability_token() -> None:
    """The absorbing-noise sampler inverts the cumulative distribution (one draw per row): its token frequencies
    match the softmax, tokens at -inf (the mask token) never come out, and a seed fixes the draws."""
    from engine.sampling import sample_by_cdf

    logits = torch.log(torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0]))  # tokens 1 and 5 are impossible
    rows = logits.expand(40_000, -1)
    tokens = sample_by_cdf(rows, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert frequencies[1] == 0 and frequencies[5] == 0
    assert torch.allclose(frequencies, torch.softmax(logits, dim=-1), atol=0.01)
    again = sample_by_cdf(rows[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens[:100])
    assert sample_by_cdf(rows[:0], None).shape == (0,)
