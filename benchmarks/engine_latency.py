"""Engine speed on realistic requests, measured side by side in one process on one machine.

Usage:
    python -m benchmarks.engine_latency [--model DIR] [--requests 12] [--repeats 3] [--device cpu] [--seed 0]

Reports (median over requests of the median over repeats, after a warm-up):
- `cold_ms` (new document, empty prompt cache) vs `warm_ms` (the same document after one more typed character)
  -> `warm_over_cold`;
- the dgls engine's fill vs `model.generate(...)` from transformers on the same model, prompt and sampler
  settings, both warm in-process -> `dgls_over_transformers`, with `agreement` (share of identical outputs)
  and exact match and edit similarity of both against the reference middles (`generate` knows only uniform
  noise: for an absorbing-noise model such as the shipped one it runs another algorithm, so `agreement` is
  low there and the similarities say which answers better);
- `forward_agreement`: share of identical fills from the engine with its forward and with transformers'
  forward (`lean_forward="off"`), same requests and seeds: the same algorithm, so 1.0 unless a near-tie flips;
- `typed_through_ms` (the same document after typing the first character of its own suggestion: the engine
  starts from the rest of that suggestion) -> `typed_through_over_cold`, over the requests with a suggestion;
- `tokens_per_forward`, `steps_mean`, `early_commit_saved_steps`;
- `cancel_ms`: from a cancel to the engine being idle (median of 5 fills, made long by a one-token-a-step
  sampler, cancelled mid-step), and the same in denoising steps (`cancel_steps`); null if none was cancelled;
- `forward` (`lean` or `transformers`: engine/lean_forward.py), and side by side in the same run with
  transformers' forward: `decoder_step_ms` vs `transformers_decoder_step_ms` (one step over the same canvas and
  prompt) and `warm_over_cold_transformers_forward` (the cold/warm pair again with `lean_forward="off"`).
Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.infill import edit_similarity
from benchmarks.requests_from_files import CutRequest, cut_requests, default_files
from dgls.context import build_context
from engine.engine import Engine
from engine.fill import FillRequest
from engine.loading import load_checkpoint
from engine.prompt_cache import decode_view


def to_request(cut: CutRequest, document: str, **extra: Any) -> FillRequest:
    """The fill request the language server sends for this cursor (its context builder, default options)."""
    context = build_context(cut.prefix + cut.suffix, len(cut.prefix), cut.prefix.count("\n"), "python", cut.path)
    return FillRequest(prefix=context.prefix, suffix=context.suffix, context=context.snippets, path=cut.path,
                       language="python", mode="block" if cut.mode == "block" else "line", deadline_ms=60_000,
                       document=document, **extra)


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, value


def generate_text(engine: Engine, request: FillRequest) -> str:
    """transformers' own generate on the same prompt ids and sampler settings; text cut like the engine's."""
    ids = engine.builder.render(request)
    torch.manual_seed(request.seed)
    output = engine.model.generate(torch.tensor([ids], device=engine.model.device),
                                   max_new_tokens=engine.denoiser.canvas_length)
    tokens = engine._until_end(output.sequences[0, len(ids):].tolist())
    return engine._finish_text(tokens, request.mode)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="write a PNG of the cold/warm latency distributions here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    engine = Engine(load_checkpoint(args.model, device=args.device))
    cuts = cut_requests(default_files(), args.requests, seed=args.seed)
    engine.fill(to_request(cuts[0], "warm-up"))  # warm-up
    engine.model.generate(torch.tensor([engine.builder.render(to_request(cuts[0], "w"))], device=engine.model.device),
                          max_new_tokens=8)

    cold, warm, ours, theirs, steps, tpf, saved = [], [], [], [], [], [], []
    through, through_cold = [], []
    agree = dgls_exact = hf_exact = 0
    dgls_similarity = hf_similarity = 0.0
    for index, cut in enumerate(cuts):
        cold_runs, warm_runs, through_runs = [], [], []
        for repeat in range(args.repeats):
            document = f"doc{index}-{repeat}"
            engine.cache.clear()
            engine.builder.forget()
            cold_ms, warm_ms, first = cold_and_warm(engine, cut, document, repeat, keep_first=True)
            cold_runs.append(cold_ms)
            warm_runs.append(warm_ms)
            if first.text:  # ... or the first character of the suggestion (typing through it)
                engine.fill(to_request(cut, document + "t", seed=repeat))
                accepted = CutRequest(cut.path, cut.prefix + first.text[:1], cut.suffix, "", cut.mode)
                through_runs.append(timed(engine.fill, to_request(accepted, document + "t", seed=repeat))[0])
        cold.append(statistics.median(cold_runs))
        warm.append(statistics.median(warm_runs))
        if through_runs:
            through.append(statistics.median(through_runs))
            through_cold.append(cold[-1])
        steps.append(first.steps)
        tpf.append(first.tokens_per_forward)
        no_commit = engine.fill(to_request(cut, f"doc{index}", early_commit=False))
        saved.append(no_commit.steps - first.steps)
        # dgls (warm cache, as while typing) vs transformers generate, same prompt and seed
        request = to_request(cut, f"doc{index}", seed=args.seed)
        engine.fill(request)
        dgls_runs, hf_runs = [], []
        for _ in range(args.repeats):
            dgls_ms, result = timed(engine.fill, request)
            hf_ms, hf_text = timed(generate_text, engine, request)
            dgls_runs.append(dgls_ms)
            hf_runs.append(hf_ms)
        ours.append(statistics.median(dgls_runs))
        theirs.append(statistics.median(hf_runs))
        agree += result.text == hf_text
        dgls_exact += result.text.strip() == cut.middle.strip()
        hf_exact += hf_text.strip() == cut.middle.strip()
        dgls_similarity += edit_similarity(result.text.strip(), cut.middle.strip())
        hf_similarity += edit_similarity(hf_text.strip(), cut.middle.strip())
        print(f"[{index + 1}/{len(cuts)}] cold {cold[-1]:.0f} ms warm {warm[-1]:.0f} ms dgls {ours[-1]:.0f} ms "
              f"generate {theirs[-1]:.0f} ms", file=sys.stderr)

    cancel_ms, cancel_steps = measure_cancel(engine, cuts[0])
    print("transformers' forward: cold/warm pairs and one decoder step", file=sys.stderr)
    reference = Engine(engine.loaded, lean_forward="off")
    reference.fill(to_request(cuts[0], "warm-up"))
    reference_cold, reference_warm = [], []
    for index, cut in enumerate(cuts):
        pair = [cold_and_warm(reference, cut, f"ref{index}-{repeat}", repeat) for repeat in range(args.repeats)]
        reference_cold.append(statistics.median(cold for cold, _ in pair))
        reference_warm.append(statistics.median(warm for _, warm in pair))
    forward_agree = sum(engine.fill(to_request(cut, f"same{index}", seed=args.seed)).text
                        == reference.fill(to_request(cut, f"same{index}", seed=args.seed)).text
                        for index, cut in enumerate(cuts))
    step_ms, reference_step_ms = decoder_steps(engine, reference, cuts[0], args.repeats * 5)
    if args.plot:
        from benchmarks.plots import latency_histogram

        latency_histogram({"cold": cold, "warm (+1 char)": warm, "transformers generate": theirs}, args.plot,
                          "fill latency per request")
    n = len(cuts)
    summary = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {args.device}",
        "model": str(engine.loaded.path),
        "requests": n,
        "cold_ms": median(cold),
        "warm_ms": median(warm),
        "warm_over_cold": round(statistics.median(cold) and statistics.median(warm) / statistics.median(cold), 3),
        "typed_through_requests": len(through),
        "typed_through_ms": median(through) if through else None,
        "typed_through_over_cold": round(statistics.median(through) / statistics.median(through_cold), 3)
        if through else None,
        "dgls_ms": median(ours),
        "transformers_ms": median(theirs),
        "dgls_over_transformers": round(statistics.median(ours) / statistics.median(theirs), 3),
        "agreement": round(agree / n, 3),
        "dgls_exact_match": round(dgls_exact / n, 3),
        "transformers_exact_match": round(hf_exact / n, 3),
        "dgls_edit_similarity": round(dgls_similarity / n, 3),
        "transformers_edit_similarity": round(hf_similarity / n, 3),
        "forward_agreement": round(forward_agree / n, 3),
        "tokens_per_forward": round(statistics.fmean(tpf), 3),
        "steps_mean": round(statistics.fmean(steps), 2),
        "early_commit_saved_steps": round(statistics.fmean(saved), 2),
        "cancel_ms": cancel_ms,
        "cancel_steps": cancel_steps,
        "forward": engine.describe()["forward"],
        "decoder_step_ms": step_ms,
        "transformers_decoder_step_ms": reference_step_ms,
        "warm_over_cold_transformers_forward": round(statistics.median(reference_warm)
                                                      / statistics.median(reference_cold), 3),
    }
    print(json.dumps(summary))
    return 0


def cold_and_warm(engine: Engine, cut: CutRequest, document: str, seed: int, keep_first: bool = False) -> Any:
    """(cold_ms, warm_ms[, first result]): a new document on an empty prompt cache, then the same document after
    the user typed the next character of the real line (whatever was suggested)."""
    engine.cache.clear()
    engine.builder.forget()
    cold_ms, first = timed(engine.fill, to_request(cut, document, seed=seed))
    typed = CutRequest(cut.path, cut.prefix + cut.middle[:1], cut.suffix, cut.middle[1:], cut.mode)
    warm_ms, _ = timed(engine.fill, to_request(typed, document, seed=seed))
    return (cold_ms, warm_ms, first) if keep_first else (cold_ms, warm_ms)


def decoder_steps(engine: Engine, reference: Engine, cut: CutRequest, repeats: int) -> tuple[float, float]:
    """Median ms of one decoder step (with self-conditioning) over the same prompt and canvas: the engine's
    forward and transformers'."""
    ids = tuple(engine.builder.render(to_request(cut, "step")))
    full, _ = reference._encode(ids, use_cache=False)
    view = decode_view(full, engine.text_config, batch=1)
    canvas = engine.denoiser.noise_like(1, torch.Generator().manual_seed(0))
    medians = []
    for runner in (engine, reference):
        decode = runner.denoiser.decoder(view, len(ids), 1)
        with torch.no_grad():
            logits = decode(canvas, None)
            runs = [timed(decode, canvas, logits)[0] for _ in range(repeats)]
        medians.append(median(runs))
    return medians[0], medians[1]


def measure_cancel(engine: Engine, cut: CutRequest, repeats: int = 5) -> tuple[float | None, float | None]:
    """Cancel a long fill from another thread half-way through its second denoising step; the median time until
    `fill` returns, in ms and in steps (against the median step of three uncancelled fills of the same request).

    The fill is made long by a sampler that accepts one token a step (entropy bound 0, no early commit): the
    shipped model's own settings finish most fills in 1-2 steps, before a cancel could land. Its steps cost what
    every step costs. Only fills that stopped because of the cancel count. Cancellation is checked before every
    step and, with dgls' forward, before every layer of a step (with transformers' forward between steps only)."""
    slow = Engine(engine.loaded, settings=dataclasses.replace(engine.settings, entropy_bound=0.0, max_steps=32),
                  lean_forward="on" if engine.describe()["forward"] == "lean" else "off")
    step_ms, before_ms = [], []
    slow.fill(to_request(cut, "cancel", early_commit=False))  # the prompt is cached: every step is alike
    for _ in range(3):
        result = slow.fill(to_request(cut, "cancel", early_commit=False))
        step_ms.append(result.timings["denoise_ms"] / max(result.steps, 1))
        before_ms.append(result.timings["total_ms"] - result.timings["denoise_ms"])  # tokenize + encode
    step = statistics.median(step_ms)
    cancel_after_s = (statistics.median(before_ms) + 1.5 * step) / 1000  # mid-way through the second step
    waits = []
    for _ in range(repeats):
        flag = threading.Event()
        cancelled_at: list[float] = []

        def cancel_later(flag: threading.Event = flag, cancelled_at: list[float] = cancelled_at) -> None:
            time.sleep(cancel_after_s)
            cancelled_at.append(time.perf_counter())
            flag.set()

        thread = threading.Thread(target=cancel_later)
        thread.start()
        result = slow.fill(to_request(cut, "cancel", early_commit=False), cancelled=flag.is_set)
        idle_at = time.perf_counter()
        thread.join()
        if result.cancelled:  # else the fill finished before the cancel arrived
            waits.append(max(0.0, (idle_at - cancelled_at[0]) * 1000))
    if not waits:
        print("cancel: every fill finished before its cancel arrived; cancel_ms is null", file=sys.stderr)
        return None, None
    cancel_ms = statistics.median(waits)
    return round(cancel_ms, 2), round(cancel_ms / step, 2)


if __name__ == "__main__":
    raise SystemExit(main())
