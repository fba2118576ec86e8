"""The fast denoising step on real tiny models (CPU, eager): the same tokens as the reference loop
(`Denoiser.run`) for every prompt length of a bucket and for several candidates, static buffers reused, one host
synchronisation per step, on-device early commit equal to the reference's; CUDA graph checks when a GPU is there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import pytest
import torch

from engine.denoiser import DenoiseControl, DenoiseOutput
from engine.engine import Engine
from engine.fast_step import FastStep, select_denoiser
from engine.fill import FillRequest
from engine.loading import load_checkpoint
from engine.prompt_cache import decode_view

PREFIX = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        "
SUFFIX = "\n\n    def pop(self):\n        return self.items.pop()\n"
SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture and replay)")


@pytest.fixture(scope="module")
def engine(tiny_sliding_model_dir) -> Engine:
    """Sliding window 16: sliding layers hold fewer KV slots than full ones, as with the real model."""
    # compared with the reference loop over transformers' forward
    return Engine(load_checkpoint(tiny_sliding_model_dir, device="cpu"), fast_step="off", lean_forward="off")


def prompt(length: int) -> tuple[int, ...]:
    return tuple((7 * i) % 300 + 5 for i in range(length))


def both(engine: Engine, fast: FastStep, length: int, batch: int, seed: int) -> tuple[DenoiseOutput, DenoiseOutput]:
    """The reference loop's output and the fast step's, for the same prompt and seed."""
    full, _ = engine._encode(prompt(length), use_cache=False)
    view = decode_view(full, engine.text_config, batch=batch)
    reference, fast_output = (runner.run(view, length, batch, torch.Generator().manual_seed(seed), DenoiseControl())
                              for runner in (engine.denoiser, fast))
    return reference, fast_output


def assert_same(reference: DenoiseOutput, fast: DenoiseOutput) -> None:
    expected, actual = asdict(reference), asdict(fast)
    assert torch.equal(expected.pop("canvas"), actual.pop("canvas"))
    torch.testing.assert_close(expected.pop("score"), actual.pop("score"), rtol=0, atol=1e-4)
    assert actual == expected  # committed, steps, forwards, converged, cancelled, stop_reason


@pytest.mark.parametrize("batch", [1, 3])
def test_same_tokens_as_the_reference_loop_for_every_prompt_length_of_a_bucket(engine: Engine, batch: int) -> None:
    fast = FastStep(engine.denoiser, min_capacity=64)
    for length, seed in ((5, 0), (20, 1), (37, 2), (64, 3), (100, 4)):  # capacity 64 (padded or exact), then 128
        reference, ours = both(engine, fast, length, batch, seed)
        assert_same(reference, ours)
    assert list(fast.entries) == [(batch, 64), (batch, 128)]
    assert fast.entries[(batch, 64)].slots == {"sliding_attention": 15, "full_attention": 64}


def test_static_buffers_are_reused_across_prompt_lengths(engine: Engine) -> None:
    fast = FastStep(engine.denoiser, min_capacity=64, max_entries=2)
    both(engine, fast, 12, 1, 0)
    entry = fast.entries[(1, 64)]
    names = ("canvas", "argmax", "processed", "self_conditioning", "exponential", "noise", "positions", "flags")
    pointers = [getattr(entry, name).data_ptr() for name in names]
    kv_pointers = [keys.data_ptr() for keys, _ in entry.kv] + [m.data_ptr() for m in entry.masks.values()]
    both(engine, fast, 50, 1, 1)
    assert fast.entries[(1, 64)] is entry and len(fast.entries) == 1
    assert [getattr(entry, name).data_ptr() for name in names] == pointers
    assert [keys.data_ptr() for keys, _ in entry.kv] + [m.data_ptr() for m in entry.masks.values()] == kv_pointers
    both(engine, fast, 70, 1, 0)
    both(engine, fast, 12, 2, 0)  # a third shape evicts the least recently used one
    assert list(fast.entries) == [(1, 128), (2, 64)]


@contextmanager
def recorded_syncs(events: list[str]) -> Iterator[None]:
    """Log every Python-level call that makes the host wait for the device (on a GPU) into `events`."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def recording(original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            events.append("sync")
            return original(self, *args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, recording(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_one_host_sync_per_step_and_none_inside_it(tiny_model_dir) -> None:
    loaded = load_checkpoint(tiny_model_dir, device="cpu")
    loaded.model.set_experts_implementation("batched_mm")  # the CPU's per-expert loop syncs; GPUs' grouped GEMM not
    engine = Engine(loaded, fast_step="off", lean_forward="off")
    fast = FastStep(engine.denoiser, min_capacity=64)
    full, _ = engine._encode(prompt(30), use_cache=False)
    view = decode_view(full, engine.text_config, batch=2)
    control = DenoiseControl(commit="line")
    fast.run(view, 30, 2, torch.Generator().manual_seed(0), control)  # allocate outside the recording
    events: list[str] = []
    step = fast._step

    def marked_step(e: Any) -> None:
        events.append("step")
        step(e)
        events.append("end")

    fast._step = marked_step  # type: ignore[method-assign]
    with recorded_syncs(events):
        output = fast.run(view, 30, 2, torch.Generator().manual_seed(0), control)
        steps_events = len(events)
        reference = engine.denoiser.run(view, 30, 2, torch.Generator().manual_seed(0), control)
    assert output.steps >= 3 and output.steps == events.count("step")
    loop = "".join({"step": "S", "end": "E", "sync": "y"}[event] for event in events[:steps_events])
    first, last = loop.index("S"), loop.rindex("E")
    assert loop[first:last + 2] == "SEy" * output.steps  # nothing inside a step, one read of the stop flags after
    assert events[steps_events:].count("sync") >= 2 * reference.steps  # the reference syncs several times a step


def test_device_commit_equals_the_reference_commit(engine: Engine) -> None:
    fast = FastStep(engine.denoiser, min_capacity=64)
    both(engine, fast, 10, 4, 0)
    e = fast.entries[(4, 64)]
    newline = engine.builder.text_ids("\n")[0]
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        tokens = torch.tensor([40, 41, 42, newline, 1])  # 1 is EOS
        argmax = tokens[torch.randint(0, 5, (4, engine.denoiser.canvas_length), generator=generator)]
        settled = torch.rand(argmax.shape, generator=generator) < 0.9
        finished = torch.rand(4, generator=generator) < 0.2
        mode = ("line", "block")[trial % 2]
        before = [0, 0, 0, 3] if trial % 3 == 0 else [0, 0, 0, 0]
        expected = list(before)
        engine.denoiser._commit(argmax, settled, mode, finished, expected)
        e.committed.copy_(torch.tensor(before))
        e.finished.copy_(finished)
        e.commit_on.fill_(True)
        e.line_mode.fill_(mode == "line")
        fast._commit(e, argmax, settled)
        assert e.committed.tolist() == expected


def test_engine_fills_equal_with_the_fast_step_on_and_off(tiny_model_dir) -> None:
    loaded = load_checkpoint(tiny_model_dir, device="cpu")
    engines = [Engine(loaded, fast_step=mode) for mode in ("off", "on")]
    assert isinstance(engines[1].stepper, FastStep) and engines[0].stepper is engines[0].denoiser
    assert engines[1].describe()["fast_step"] == "eager"

    def fill(**fields: Any) -> FillRequest:  # a long deadline: a loaded CPU must not cut one run and not the other
        return FillRequest(**{"prefix": PREFIX, "suffix": SUFFIX, "deadline_ms": 60_000, **fields})

    requests = [
        fill(mode="line", seed=3),
        fill(mode="block", candidates=3, seed=1),
        fill(mode="line", candidates=2, seed_canvas="self.items.append(item)\n", keep_fixed=True),  # commits at once
        fill(mode="block", seed_canvas="return self", keep_fixed=True),
        fill(document="a.py", seed=5, early_commit=False),
    ]
    results = []
    for request in requests:
        off, on = (engine.fill(request) for engine in engines)
        assert {**asdict(on), "timings": None} == {**asdict(off), "timings": None}
        results.append(on)
        if request is requests[4] and len(on.text) > 1:  # type the completion's first character: a warm start
            requests.append(fill(prefix=PREFIX + on.text[0], document="a.py", seed=5))
    assert results[2].stop_reason == "early_commit" and results[-1].warm_start


def test_selection_follows_the_mode_and_what_the_model_needs(tiny_model_dir, tiny_mask_model_dir) -> None:
    uniform = Engine(load_checkpoint(tiny_model_dir, device="cpu"), fast_step="off", lean_forward="off").denoiser
    assert select_denoiser(uniform, "auto") is uniform  # auto: CUDA only
    assert isinstance(select_denoiser(uniform, "on"), FastStep)
    masked = Engine(load_checkpoint(tiny_mask_model_dir, device="cpu"), fast_step="off", lean_forward="off").denoiser
    assert select_denoiser(masked, "auto") is masked
    with pytest.raises(ValueError, match="mask"):
        select_denoiser(masked, "on")
    with pytest.raises(ValueError, match="fast-step mode"):
        select_denoiser(uniform, "fast")


@needs_cuda
def test_cuda_graph_steps_without_implicit_syncs_and_agrees_with_the_reference(tiny_sliding_model_dir) -> None:
    """float32 and batched experts, so the comparison is about the step; the engine's bf16 grouped-GEMM path at
    the real shape is what `benchmarks/gpu_step.py` captures (`fast_step_graph`)."""
    loaded = load_checkpoint(tiny_sliding_model_dir, device="cuda", dtype="float32")
    loaded.model.set_experts_implementation("batched_mm")
    engine = Engine(loaded, fast_step="off", lean_forward="off")
    fast = FastStep(engine.denoiser, min_capacity=64)
    agree, total = 0, 0
    for length, seed in ((5, 0), (37, 1), (64, 2)):
        full, _ = engine._encode(prompt(length), use_cache=False)
        view = decode_view(full, engine.text_config, batch=2)
        reference = engine.denoiser.run(view, length, 2, torch.Generator("cuda").manual_seed(seed), DenoiseControl())
        ours = fast.run(view, length, 2, torch.Generator("cuda").manual_seed(seed), DenoiseControl())
        agree += int((reference.canvas == ours.canvas).sum())
        total += reference.canvas.numel()
    entry = fast.entries[(2, 64)]
    assert fast.graphs and entry.graph is not None and list(fast.entries) == [(2, 64)]
    read_flags = fast._read_flags

    def explicit_read(e: Any) -> list[bool]:  # the loop's one deliberate sync (pinned copy + event)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read_flags(e)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    fast._read_flags = explicit_read  # type: ignore[method-assign]
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")  # any other sync (.item(), nonzero, a blocking copy) raises
    try:
        for cur_step in (3, 2, 1):
            fast._advance(entry, generator, cur_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert agree / total >= 0.9  # masked vs unmasked SDPA kernels: equal up to near-ties


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_tempered_logits_have_the_reference_bits(tiny_model_dir, device: str) -> None:
    """Divided by a device scalar or multiplied by the reciprocal the device itself uses: the bits of `x / t`."""
    loaded = load_checkpoint(tiny_model_dir, device=device, dtype="float32")
    engine = Engine(loaded, fast_step="off", lean_forward="off")
    fast = FastStep(engine.denoiser)
    s = engine.settings
    values = torch.randn(1 << 16, device=device) * 30
    for cur_step in range(s.max_steps, 0, -1):
        temperature = s.t_min + (s.t_max - s.t_min) * (cur_step / s.max_steps)
        buffer = torch.tensor(fast._temperature(cur_step), dtype=torch.float32, device=device)
        ours = values * buffer if fast.reciprocal is not None else values / buffer
        assert torch.equal(ours, values / temperature)  # what Denoiser.run computes


def test_the_cli_switch_reaches_the_engine_process() -> None:
    from dgls.cli import _serve_args, build_parser

    args = build_parser().parse_args(["engine", "start", "--fast-step", "off"])
    assert args.fast_step == "off" and _serve_args(args)[-2:] == ["--fast-step", "off"]
    assert "--fast-step" not in _serve_args(build_parser().parse_args(["engine", "start"]))  # auto: the default


def test_an_automatic_fast_step_that_fails_its_warm_up_falls_back_to_the_reference_loop(tiny_model_dir,
                                                                                         caplog) -> None:
    """`auto` picks the fast step on CUDA only; here it is forced onto the CPU engine to check the warm-up's
    guard: a fast step that raises is replaced by the reference loop, one that disagrees is logged."""
    engine = Engine(load_checkpoint(tiny_model_dir, device="cpu"), fast_step="on")
    engine.fast_step_mode = "auto"
    fast = engine.stepper
    assert isinstance(fast, FastStep)
    original = fast.run

    def disagree(*args: Any, **kwargs: Any) -> DenoiseOutput:
        output = original(*args, **kwargs)
        output.canvas = torch.full_like(output.canvas, 5)  # a token that decodes to text, never EOS
        output.committed = [0] * output.canvas.shape[0]
        return output

    fast.run = disagree  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="dgls.engine"):
        engine.warm_up()
    assert engine.stepper is fast and "disagree" in caplog.text

    def broken(*args: Any, **kwargs: Any) -> DenoiseOutput:
        raise RuntimeError("CUDA graph capture failed")

    fast.run = broken  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="dgls.engine"):
        engine.warm_up()
    assert engine.stepper is engine.denoiser and "capture failed" in caplog.text
    assert engine.fill(FillRequest(prefix=PREFIX, deadline_ms=60_000)).steps >= 1
