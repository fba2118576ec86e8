"""Held-out evaluation and sampler tuning for a trained default model.

Owns a reference absorbing-mask sampler (the algorithm the engine implements: all-``<mask>`` canvas,
linear temperature schedule t_max -> t_min, entropy-bound acceptance of the lowest-entropy predictions,
self-conditioning on the previous step's logits, ``<mask>`` never emitted, early exit once nothing before
the first ``<eos>`` is still masked) and the exact-match / latency measurement used to pick the
``generation_config.json`` defaults. It is a training-side check, not the engine: it always runs the whole
canvas, where the engine cuts it after the text's end once every row has one (``cut_canvas``; quality within
noise of the whole canvas, ``benchmarks/README.md``).

``python -m engine.training.evaluate MODEL_DIR [--tasks benchmarks/data/heldout_single_line.jsonl] [--grid]
[--sampler-out FILE]``: ``FILE`` gets the best sampler as ``train --sampler`` takes it.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase

from engine.hf_compat import returned_cache, with_cache
from engine.training.examples import CANVAS_LENGTH, PREFIX_TOKENS, SUFFIX_TOKENS, prompt_text
from engine.training.tokenizer import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, MASK_ID, PAD_ID


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prefix: str, suffix: str) -> list[int]:
    """The ``dgls-fim`` prompt with the engine's windows (prefix <= 256 tokens from its end, suffix <= 128)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = encode(prompt_text("", suffix).removesuffix("<fim_prefix><fim_middle>"))
    head = head[: 2 + SUFFIX_TOKENS]  # <bos><fim_suffix> + suffix tokens
    return head + [FIM_PREFIX_ID] + encode(prefix)[-PREFIX_TOKENS:] + [FIM_MIDDLE_ID]


@torch.no_grad()
def infill(model: DiffusionGemmaForBlockDiffusion, ids: list[int], steps: int, t_min: float, t_max: float,
           entropy_bound: float) -> list[int]:
    """Denoise an all-mask canvas; returns the middle's token ids (before the first <eos>)."""
    prompt = torch.tensor([ids])
    cache = returned_cache(model.model.encoder(input_ids=prompt))
    canvas = torch.full((1, CANVAS_LENGTH), MASK_ID, dtype=torch.long)  # canvas: [1, C]
    positions = torch.arange(len(ids), len(ids) + CANVAS_LENGTH)[None]
    previous = None
    for step in range(steps):
        logits = model(**with_cache(cache), decoder_input_ids=canvas, decoder_position_ids=positions,
                       self_conditioning_logits=previous).logits  # [1, C, V]
        previous = logits
        logits = logits.clone()
        logits[..., MASK_ID] = float("-inf")
        temperature = t_max + (t_min - t_max) * step / max(1, steps - 1)
        probs = (logits / temperature).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)[0]  # [C]
        masked = canvas[0] == MASK_ID
        entropy = torch.where(masked, entropy, torch.full_like(entropy, float("inf")))
        order = entropy.argsort()
        sorted_entropy = entropy[order][: int(masked.sum())]
        accept = (sorted_entropy.cumsum(0) - sorted_entropy) <= entropy_bound
        accept[0] = True
        if step == steps - 1:
            accept[:] = True
        chosen = order[: len(accept)][accept]
        canvas[0, chosen] = probs[0, chosen].argmax(-1)
        tokens = canvas[0].tolist()
        end = tokens.index(EOS_ID) if EOS_ID in tokens else CANVAS_LENGTH
        if MASK_ID not in tokens[:end]:
            return [t for t in tokens[:end] if t != PAD_ID]
    tokens = canvas[0].tolist()
    end = tokens.index(EOS_ID) if EOS_ID in tokens else CANVAS_LENGTH
    return [t for t in tokens[:end] if t not in (PAD_ID, MASK_ID)]


def evaluate(model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerBase,
             tasks: list[dict[str, Any]], sampler: dict[str, Any]) -> dict[str, Any]:
    """Exact match and mean edit similarity (whitespace-stripped) and median latency of ``infill``."""
    hits, similarity, latencies = 0, 0.0, []
    for task in tasks:
        started = time.perf_counter()
        ids = prompt_ids(tokenizer, task["prompt"], task["suffix"])
        middle = str(tokenizer.decode(infill(model, ids, int(sampler["max_denoising_steps"]), sampler["t_min"],
                                         sampler["t_max"], sampler["entropy_bound"])))
        latencies.append(time.perf_counter() - started)
        hits += middle.strip() == task["canonical_solution"].strip()
        similarity += difflib.SequenceMatcher(None, middle.strip(), task["canonical_solution"].strip()).ratio()
    return {**sampler, "exact_match": round(hits / len(tasks), 4),
            "edit_similarity": round(similarity / len(tasks), 4),
            "median_latency_ms": round(1000 * statistics.median(latencies), 1), "tasks": len(tasks)}


GRID: dict[str, list[Any]] = {
    "max_denoising_steps": [8, 12, 16], "entropy_bound": [0.1, 0.5, 1.5],
    "t_max": [0.2, 0.5], "t_min": [0.1],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tasks", type=Path, default=Path("benchmarks/data/heldout_single_line.jsonl"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", action="store_true", help="search GRID and print the best sampler last")
    parser.add_argument("--sampler-out", type=Path, help="write the best sampler here (JSON for train --sampler)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(args.model), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    tasks = [json.loads(line) for line in args.tasks.open()][: args.limit]
    generation = model.generation_config
    default = {"max_denoising_steps": generation.max_denoising_steps, "t_min": generation.t_min,
               "t_max": generation.t_max, "entropy_bound": generation.sampler_config.entropy_bound}
    results = [evaluate(model, tokenizer, tasks, default)]
    print(json.dumps(results[-1]), flush=True)
    if args.grid:
        for values in itertools.product(*GRID.values()):
            results.append(evaluate(model, tokenizer, tasks, dict(zip(GRID, values, strict=True))))
            print(json.dumps(results[-1]), flush=True)
    best = max(results, key=lambda r: (r["exact_match"], r["edit_similarity"], -r["median_latency_ms"]))
    print(json.dumps({"best": best}))
    if args.sampler_out is not None:
        keep = {key: best[key] for key in ("max_denoising_steps", "t_min", "t_max", "entropy_bound")}
        keep.update(stability_threshold=generation.stability_threshold,
                    confidence_threshold=generation.confidence_threshold)
        args.sampler_out.write_text(json.dumps(keep) + "\n")


if __name__ == "__main__":
    main()
