"""Decoder-step time, prompt-prefill time and peak GPU memory of DiffusionGemma 26B-A4B, per quantization.

Builds a random-weight model at the real shape (engine/presets/diffusiongemma-26b-a4b.json) straight onto the
GPU through `engine.quantize.build_quantized` (weights are generated and quantized one tensor at a time, so
the bf16 model never has to fit), then measures, at bf16 and each quantization:

- `prefill_ms`: the encoder over a `--prompt-tokens` prompt into a fresh recording cache (as the engine does);
- `decoder_step_ms`: one canvas forward with self-conditioning logits (what `engine/denoiser.py` runs per step),
  the number the planner's bandwidth floor (`engine/plan.py`) applies to (quantized experts run through the
  grouped GEMM after dequantizing a layer at a time, `--expert-dequant layer`; `expert` is the low-memory path);
- `denoise_step_ms`: a whole denoising step (forward + sampling, entropy, acceptance) via `Denoiser.run`;
- `fast_step_eager_ms` / `fast_step_graph_ms`: the same step through `engine/fast_step.py` (static buffers, one
  host sync per step), run eagerly / replayed as a CUDA graph (null without CUDA or when capture failed:
  `fast_step_graph` says whether it was captured, `fast_step_error` why not), `fast_step_agreement` the fraction
  of canvas tokens equal to `Denoiser.run`'s with the same seed, `fast_step_peak_gb` the peak while it ran;
- `peak_memory_gb`: `torch.cuda.max_memory_allocated` over all of the above, next to the planner's `peak_gb`.

When the whole model does not fit (`--layers auto` picks the largest multiple of 6 layers that the planner says
fits), it also measures 6 layers and extrapolates linearly to 30 (`*_30_layers`). Routing is random, so with
256 canvas tokens every expert is used, as with real weights.

Usage (one GPU):
    python -m benchmarks.gpu_step                                  # none, int8, fp8 (sm_89+), int4
    python -m benchmarks.gpu_step --quantize none int4 --layers 30 --json-out gpu_step.json
    python -m benchmarks.gpu_step --tiny                           # CPU smoke run (CI): tiny config
Fixed seed, warm-up runs, median of `--repeats`; progress on stderr; one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.plan import CARDS, load_preset, plan
from engine.quantize import SCHEMES, build_quantized, check_scheme, parameters_on_meta, set_expert_dequantization

FULL_LAYERS = 30
SCALED = ("prefill_ms", "decoder_step_ms", "denoise_step_ms", "fast_step_eager_ms", "fast_step_graph_ms")
LAYER_STEP = 6  # the 5 sliding : 1 full pattern repeats every 6 layers
TINY_CONFIG: dict[str, Any] = {
    "model_type": "diffusion_gemma",
    "canvas_length": 16,
    "text_config": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=64, num_global_key_value_heads=1, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"], num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        max_position_embeddings=4096, enable_moe_block=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    "vision_config": dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, head_dim=16),
}


def log(message: str) -> None:
    print(f"[gpu_step] {message}", file=sys.stderr, flush=True)


def with_layers(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """The config with its first `layers` layers (the last one forced to full attention, as transformers does)."""
    text = dict(config["text_config"])
    types = text.get("layer_types") or [
        "full_attention" if (i + 1) % LAYER_STEP == 0 else "sliding_attention" for i in range(FULL_LAYERS)
    ]
    types = list(types[:layers])
    types[-1] = "full_attention"
    text.update(num_hidden_layers=layers, layer_types=types)
    return {**config, "text_config": text}


def random_tensors(hf_config: Any, device: torch.device, dtype: torch.dtype, seed: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the model once (tied ones once), N(0, 0.02), norms and scales 1, made on `device`."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with parameters_on_meta():
        skeleton = DiffusionGemmaForBlockDiffusion(hf_config)
    generator = torch.Generator(device=device).manual_seed(seed)
    named: list[tuple[str, torch.Tensor]] = list(skeleton.named_parameters())
    named += [(n, b) for n, b in skeleton.named_buffers() if n.endswith("layer_scalar")]  # persistent buffers
    for name, tensor in named:
        if name.endswith(("norm.weight", "scale", "layer_scalar", "layernorm.weight")):
            yield name, torch.ones(tensor.shape, device=device, dtype=dtype)
        else:
            yield name, torch.randn(tensor.shape, device=device, dtype=dtype, generator=generator).mul_(0.02)


class Timer:
    """Wall time of `fn` with the device synchronised around it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], Any], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            self.sync()
            started = time.perf_counter()
            fn()
            self.sync()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples)


def measure(config: dict[str, Any], scheme: str, layers: int, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> dict[str, Any]:
    """Build the model with `layers` layers under `scheme` and time prefill, decoder step and denoise step."""
    from transformers import DiffusionGemmaConfig

    from engine.denoiser import DenoiseControl, Denoiser
    from engine.hf_compat import returned_cache, with_cache
    from engine.prompt_cache import decode_view, new_recording_cache
    from engine.sampling import SamplerSettings

    hf_config = DiffusionGemmaConfig(**with_layers(config, layers))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model, report = build_quantized(hf_config, random_tensors(hf_config, device, dtype, args.seed), scheme, device,
                                    dtype)
    build_s = time.perf_counter() - started
    set_expert_dequantization(model, whole_layer=args.expert_dequant == "layer")
    weights_gb = (torch.cuda.memory_allocated(device) if device.type == "cuda" else report.weight_bytes_after) / 2**30
    log(f"{scheme}: {layers} layers built in {build_s:.1f}s, weights {weights_gb:.2f} GB")
    text = hf_config.get_text_config(decoder=True)
    vocab, canvas = int(text.vocab_size), int(hf_config.canvas_length or 256)
    batch, prompt = args.batch, args.prompt_tokens
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(3, vocab, (1, prompt), device=device, generator=generator)
    positions = torch.arange(prompt, dtype=torch.int32, device=device).unsqueeze(0)
    timer = Timer(device)

    def prefill() -> Any:
        cache = new_recording_cache(text)
        masks = model.model.encoder.create_masks_for_generate(
            config=hf_config, inputs_embeds=torch.empty((1, prompt, 0), dtype=dtype, device=device),
            attention_mask=torch.ones((1, prompt), dtype=torch.bool, device=device), position_ids=positions,
            **with_cache(cache),
        )
        return returned_cache(model.model.encoder(input_ids=ids, attention_mask=masks, position_ids=positions,
                                                  **with_cache(cache)))

    with torch.no_grad():
        prefill_ms = timer.median_ms(prefill, args.warmup, args.repeats)
        view = decode_view(prefill(), text, batch=batch)
        canvas_ids = torch.randint(0, vocab, (batch, canvas), device=device, generator=generator)
        canvas_positions = torch.arange(prompt, prompt + canvas, dtype=torch.int32, device=device).unsqueeze(0)
        mask = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=hf_config, inputs_embeds=canvas_ids.unsqueeze(-1), **with_cache(view),
            decoder_attention_mask=torch.ones((batch, prompt + canvas), dtype=torch.bool, device=device),
        )
        self_conditioning = torch.randn((batch, canvas, vocab), device=device, generator=generator).to(dtype)

        def decoder_step() -> torch.Tensor:
            return model(decoder_input_ids=canvas_ids, self_conditioning_logits=self_conditioning,
                         decoder_attention_mask=mask, **with_cache(view),
                         decoder_position_ids=canvas_positions).logits  # [B, C, V] float32

        step_ms = timer.median_ms(decoder_step, args.warmup, args.repeats)
        logits_ok = bool(torch.isfinite(decoder_step()).all())
        steps = args.denoise_steps
        denoiser = Denoiser(model, SamplerSettings(max_steps=steps, confidence_threshold=-1.0), eos_ids=[1])

        def denoise() -> Any:
            return denoiser.run(view, prompt_length=prompt, batch=batch,
                                generator=torch.Generator(device=device).manual_seed(args.seed),
                                control=DenoiseControl())

        denoise_ms = timer.median_ms(denoise, min(args.warmup, 1), max(1, args.repeats // 2)) / steps
        peak_gb = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _host_peak_gb())
        fast = measure_fast_step(denoiser, view, prompt, batch, steps, args, device, timer, denoise)
    peak_gb = max(peak_gb, fast["fast_step_peak_gb"])
    log(f"{scheme}: {layers} layers: prefill {prefill_ms:.1f} ms, decoder step {step_ms:.2f} ms, "
        f"denoise step {denoise_ms:.2f} ms, peak {peak_gb:.2f} GB")
    return {
        "layers": layers, "prefill_ms": round(prefill_ms, 3), "decoder_step_ms": round(step_ms, 3),
        "denoise_step_ms": round(denoise_ms, 3), **fast, "peak_memory_gb": round(peak_gb, 3),
        "weights_memory_gb": round(weights_gb, 3), "weight_bytes": report.weight_bytes_after,
        "logits_finite": logits_ok, "build_s": round(build_s, 1),
        "quantized_fraction": round(report.quantized_fraction, 4),
    }


def measure_fast_step(denoiser: Any, view: Any, prompt: int, batch: int, steps: int, args: argparse.Namespace,
                      device: torch.device, timer: Timer, reference: Callable[[], Any]) -> dict[str, Any]:
    """Per-step time of `engine.fast_step.FastStep` eagerly and (on CUDA) as a CUDA graph; agreement with
    `Denoiser.run` (`reference`) under the same seed; peak memory while it runs."""
    from engine.denoiser import DenoiseControl
    from engine.fast_step import FastStep

    row: dict[str, Any] = {"fast_step_eager_ms": None, "fast_step_graph_ms": None, "fast_step_graph": False,
                           "fast_step_agreement": None, "fast_step_error": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for graphs in (False, True) if device.type == "cuda" else (False,):
        try:
            runner = FastStep(denoiser, graphs=graphs)
        except ValueError as exc:
            row["fast_step_error"] = str(exc)
            break

        def run(runner: FastStep = runner) -> Any:
            return runner.run(view, prompt_length=prompt, batch=batch,
                              generator=torch.Generator(device=device).manual_seed(args.seed), control=DenoiseControl())

        ours = run()  # allocates the buffers (and captures the graph)
        if graphs and not runner.graphs:
            row["fast_step_error"] = "CUDA graph capture failed (see the log); the step ran eagerly"
            break
        row["fast_step_graph"] = row["fast_step_graph"] or graphs
        key = "fast_step_graph_ms" if graphs else "fast_step_eager_ms"
        row[key] = round(timer.median_ms(run, 0, max(1, args.repeats // 2)) / steps, 3)
        row["fast_step_agreement"] = round(float((ours.canvas == reference().canvas).float().mean()), 4)
        del runner, run
        release(device)
    row["fast_step_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                     else _host_peak_gb(), 3)
    log(f"fast step: eager {row['fast_step_eager_ms']} ms, graph {row['fast_step_graph_ms']} ms a step, "
        f"agreement {row['fast_step_agreement']}" + (f" ({row['fast_step_error']})" if row["fast_step_error"] else ""))
    return row


def release(device: torch.device) -> None:
    """Free the previous model before building the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _host_peak_gb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / 2**30
    except (OSError, StopIteration):
        return 0.0


def pick_layers(config: dict[str, Any], scheme: str, args: argparse.Namespace, free_gb: float) -> int:
    """The largest multiple of 6 layers (up to 30) the planner expects to fit in `free_gb`."""
    for layers in range(FULL_LAYERS, 0, -LAYER_STEP):
        planned = plan(with_layers(config, layers), free_gb, quantize=scheme, prompt_tokens=args.prompt_tokens,
                       batch=args.batch, prompt_cache_gb=0.0, reserve_gb=0.5, expert_dequant=args.expert_dequant)
        if planned.fits:
            return layers
    return LAYER_STEP


def card_floor(config: dict[str, Any], scheme: str, args: argparse.Namespace, device: torch.device
               ) -> dict[str, Any]:
    """The planner's view of the full model on this card: floor per forward and peak."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 1e6
    planned = plan(config, memory, quantize=scheme, prompt_tokens=args.prompt_tokens, batch=args.batch,
                   prompt_cache_gb=0.0, bandwidth_gbs=args.bandwidth_gbs, expert_dequant=args.expert_dequant)
    card = next((c.name for c in CARDS if all(part in name for part in c.name.replace("SXM", "").split())), None)
    key = "custom" if args.bandwidth_gbs else card
    return {"card": card, "floor_ms": planned.floor_ms_per_forward.get(key) if key else None,
            "planned_peak_gb": planned.peak_gb, "planned_weights_gb": planned.weights_gb,
            "fits_planned": planned.fits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="diffusiongemma-26b-a4b")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    parser.add_argument("--quantize", nargs="+", default=None, choices=SCHEMES,
                        help="schemes to measure (default: none int8 fp8 int4; fp8 only where supported)")
    parser.add_argument("--layers", default="auto", help="layers to build (auto: as many as fit, multiple of 6)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 2048; tiny 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--denoise-steps", type=int, default=4)
    parser.add_argument("--expert-dequant", default="layer", choices=["layer", "expert"],
                        help="quantized experts: dequantize a layer at once (grouped GEMM) or one expert at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="floor for this bandwidth instead")
    parser.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    config = TINY_CONFIG if args.tiny else load_preset(args.preset)
    if args.prompt_tokens is None:
        args.prompt_tokens = 64 if args.tiny else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    schemes = args.quantize or ["none", "int8", "fp8", "int4"]
    full_layers = int(config["text_config"].get("num_hidden_layers", FULL_LAYERS))
    if device.type != "cuda":
        log("no CUDA device: timings are CPU timings (smoke test only)")
    results, skipped = [], {}
    for scheme in schemes:
        try:
            check_scheme(scheme, device)
        except Exception as exc:  # fp8 on a card without fp8 tensor cores
            skipped[scheme] = str(exc)
            log(f"skip {scheme}: {exc}")
            continue
        if args.tiny:
            layers = full_layers
        elif args.layers == "auto":
            free_gb = torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 1e6
            layers = pick_layers(config, scheme, args, free_gb)
        else:
            layers = int(args.layers)
        row: dict[str, Any] = {"quantize": scheme, **measure(config, scheme, layers, args, device, dtype)}
        release(device)
        if layers < full_layers and layers > LAYER_STEP:
            small = measure(config, scheme, LAYER_STEP, args, device, dtype)
            release(device)
            for key in (k for k in SCALED if row[k] is not None and small[k] is not None):
                per_layer = (row[key] - small[key]) / (layers - LAYER_STEP)
                row[f"{key}_{full_layers}_layers"] = round(row[key] + per_layer * (full_layers - layers), 3)
        elif layers < full_layers:
            for key in (k for k in SCALED if row[k] is not None):  # no slope: scale the whole (upper bound)
                row[f"{key}_{full_layers}_layers"] = round(row[key] * full_layers / layers, 3)
        else:
            for key in SCALED:
                row[f"{key}_{full_layers}_layers"] = row[key]
        row.update(card_floor(config, scheme, args, device))
        if row["floor_ms"]:
            row["step_vs_floor"] = round(row[f"decoder_step_ms_{full_layers}_layers"] / row["floor_ms"], 2)
            fast = [row.get(f"fast_step_{how}_ms_{full_layers}_layers") for how in ("graph", "eager")]
            if any(fast):
                row["fast_step_vs_floor"] = round(next(ms for ms in fast if ms) / row["floor_ms"], 2)
        results.append(row)
    summary = {
        "benchmark": "gpu_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else args.preset,
        "full_layers": full_layers,
        "prompt_tokens": args.prompt_tokens,
        "canvas": int(config.get("canvas_length", 256)),
        "batch": args.batch,
        "expert_dequant": args.expert_dequant,
        "seed": args.seed,
        "repeats": args.repeats,
        "results": results,
        "skipped": skipped,
    }
    line = json.dumps(summary)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
