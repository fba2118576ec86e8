"""Will this DiffusionGemma fit this GPU, and how fast can a forward possibly be? Answered from the config alone.

Owns: the memory plan (weight bytes per component under a quantization scheme, prompt KV cache, activation
peak of a canvas forward, a CUDA runtime reserve) and the memory-bandwidth floor per forward on named cards,
plus the `dgls engine plan` command (`main_plan`). No weight is read: the model is built on the meta device
from `config.json` (or a shipped preset) so every count comes from the real module shapes, and the
quantized sizes come from `engine.quantize`, the same selection and formats `--quantize` loads with.

Units: GB means GiB (2**30 bytes, what `nvidia-smi` and torch report); bandwidths are vendor GB/s (10**9 B/s).

Why a canvas forward streams (almost) every weight: the decoder refines a whole canvas (256 tokens) at once and
each token picks top-8 of 128 experts, so one layer sees 2048 expert slots over 128 experts; with balanced
routing an expert is missed with probability (1 - 8/128)**256 ~ 7e-8. Unlike autoregressive decoding of an
MoE (one token touches 8/128 of the experts), every forward reads ~all expert weights, and the floor is
total weight bytes / bandwidth. The tied embedding table is read twice (self-conditioning's
softmax(logits) @ table and the lm_head), and the fp32 logits [B, canvas, vocab] are written once and read
once by the next step's self-conditioning.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

GIB = 1 << 30
HALF_BYTES = 2  # bf16 weights / activations / KV
DEFAULT_RESERVE_GB = 1.0  # CUDA context (~0.4-0.6 GiB with torch), cuBLAS workspaces, allocator slack
DEFAULT_PROMPT_CACHE_GB = 0.5  # dgls engine serve --cache-mb default (512 MiB of recorded prompt KV)
# Live [B, canvas, vocab] tensors at the worst point of a denoising step (engine/denoiser.py + the model's
# forward): the fp32 logits, tempered logits, their softmax (sampling), Categorical's normalised logits and
# probs (entropy), and the previous step's logits; plus bf16 copies: the lm_head output and the
# self-conditioning logits fed to the next forward. An estimate: benchmarks/gpu_step.py measures the real peak.
LOGITS_FP32_COPIES = 6
LOGITS_HALF_COPIES = 2
PRESET_DIR = "presets"


@dataclass(frozen=True, slots=True)
class Card:
    name: str
    memory_gb: float  # total as nvidia-smi reports it, in GiB
    bandwidth_gbs: float  # vendor peak, GB/s
    bf16_tflops: float  # vendor dense BF16 tensor peak (fp32 accumulate)
    fp8: bool  # fp8 tensor cores (compute capability 8.9+)


CARDS: tuple[Card, ...] = (
    Card("RTX 4090", 23.99, 1008.0, 165.2, True),
    Card("RTX 5090", 31.84, 1792.0, 209.5, True),
    Card("H100 SXM", 79.65, 3350.0, 989.0, True),
    Card("H200", 140.4, 4800.0, 989.0, True),
)


@dataclass(slots=True)
class Component:
    parameters: int
    bytes: int
    quantized: bool

    @property
    def gb(self) -> float:
        return self.bytes / GIB


@dataclass(slots=True)
class CardPlan:
    name: str
    memory_gb: float
    bandwidth_gbs: float
    fits: bool
    headroom_gb: float
    floor_ms_per_forward: float  # max(bandwidth floor, compute floor) of one canvas forward
    bandwidth_ms: float
    compute_ms: float
    prefill_floor_ms: float  # encoder over the prompt (compute-bound for long prompts)


@dataclass(slots=True)
class Plan:
    model: str
    quantize: str
    embeddings_quantized: bool
    embeddings_reason: str
    gpu_memory_gb: float
    prompt_tokens: int
    batch: int
    canvas: int
    fits: bool
    weights_gb: float
    weights_bytes: int
    kv_cache_gb: float  # what the decoder reads: sliding layers capped at the window
    kv_recorded_gb: float  # what dgls keeps for prompt-cache reuse: sliding layers uncapped
    prompt_cache_gb: float
    activation_peak_gb: float
    reserve_gb: float
    peak_gb: float
    floor_ms_per_forward: dict[str, float]
    parameters: dict[str, int]
    components: dict[str, dict[str, Any]]
    streamed_bytes_per_forward: int
    expert_fraction_touched: float
    cards: list[CardPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Config handling


def load_preset(name: str) -> dict[str, Any]:
    """A shipped config.json-like preset by name (e.g. `diffusiongemma-26b-a4b`)."""
    presets = resources.files("engine") / PRESET_DIR
    path = presets / f"{name}.json"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".json") for p in presets.iterdir() if p.name.endswith(".json"))
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(known)}")
    return json.loads(path.read_text(encoding="utf-8"))


def _as_config(config: Any) -> Any:
    from transformers import DiffusionGemmaConfig

    if isinstance(config, DiffusionGemmaConfig):
        return config
    if isinstance(config, dict):
        return DiffusionGemmaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    raise TypeError(f"expected a DiffusionGemma config or its dict, got {type(config).__name__}")


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return DiffusionGemmaForBlockDiffusion(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def _component_of(name: str) -> str:
    if "vision_tower" in name or "embed_vision" in name:
        return "vision_tower"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if "self_conditioning" in name:
        return "self_conditioning"
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if ".self_attn." in name and name.endswith("proj.weight"):
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


# ---------------------------------------------------------------------------------------------------------------
# The plan


def plan(
    config: Any,
    gpu_memory_gb: float,
    quantize: str = "none",
    prompt_tokens: int = 2048,
    batch: int = 1,
    quantize_embeddings: bool | None = None,
    reserve_gb: float = DEFAULT_RESERVE_GB,
    prompt_cache_gb: float = DEFAULT_PROMPT_CACHE_GB,
    bandwidth_gbs: float | None = None,
    name: str = "model",
    expert_dequant: str = "expert",
) -> Plan:
    """Memory and speed plan for serving `config` on a `gpu_memory_gb` card with `quantize` weights.

    `quantize_embeddings` None (auto) quantizes the tied embedding table only when that is what makes the plan
    fit. `bandwidth_gbs` adds a `custom` card to the floor table. `expert_dequant` is how quantized experts run
    (`engine.quantize.set_expert_dequantization`): "expert" (one at a time) or "layer" (a layer's experts
    dequantized at once for the grouped GEMM: one layer of experts in bf16 is added to the activation peak).
    """
    from engine.quantize import SCHEMES, quantization_targets, quantized_nbytes

    if quantize not in SCHEMES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(SCHEMES)}")
    hf_config = _as_config(config)
    model = _meta_model(hf_config)
    text = hf_config.get_text_config(decoder=True)
    canvas = int(hf_config.canvas_length)

    def build(include_embeddings: bool) -> tuple[dict[str, Component], dict[str, int]]:
        components: dict[str, Component] = {}
        quantized_shapes: dict[int, list[tuple[int, ...]]] = {}
        if quantize != "none":
            root = model
            for target in quantization_targets(root, include_embeddings):
                module = root.get_submodule(target.paths[0])
                for attr, shape in target.shapes.items():
                    quantized_shapes[id(getattr(module, attr))] = [shape]
        counts: dict[str, int] = {}
        for param_name, param in model.named_parameters():  # tied parameters once
            kind = _component_of(param_name)
            shapes = quantized_shapes.get(id(param))
            size = quantized_nbytes(shapes[0], quantize) if shapes else param.numel() * HALF_BYTES
            entry = components.setdefault(kind, Component(0, 0, False))
            entry.parameters += param.numel()
            entry.bytes += size
            entry.quantized = entry.quantized or shapes is not None
            counts[kind] = counts.get(kind, 0) + param.numel()
        return components, counts

    # -- KV cache of the prompt (bf16): per layer kv_heads * head_dim for keys and for values
    kv_capped = kv_recorded = 0
    for index, layer_type in enumerate(text.layer_types):
        layer = text.per_layer_config[index]
        per_token = 2 * int(layer.num_key_value_heads) * int(layer.head_dim) * HALF_BYTES * batch
        kept = min(prompt_tokens, int(text.sliding_window) - 1) if layer_type == "sliding_attention" else prompt_tokens
        kv_capped += per_token * kept
        kv_recorded += per_token * prompt_tokens
    # -- activations of a canvas forward (decoder step) and of the prompt prefill
    vocab, hidden = int(text.vocab_size), int(text.hidden_size)
    rows = batch * canvas
    logits = rows * vocab * (4 * LOGITS_FP32_COPIES + HALF_BYTES * LOGITS_HALF_COPIES)
    heads = int(text.num_attention_heads)
    widest = max(int(text.per_layer_config[i].head_dim) for i in range(len(text.layer_types))) * heads
    hidden_states = rows * (8 * hidden + 3 * widest + 3 * int(text.intermediate_size)) * HALF_BYTES
    # attention through SDPA's memory-efficient kernel: no score matrix, but boolean masks (full and sliding)
    # and, per layer, the cached keys/values concatenated with the canvas's
    decode_attention = 2 * batch * canvas * (prompt_tokens + canvas) + 2 * (prompt_tokens + canvas) * widest * 2
    prefill_attention = 2 * prompt_tokens * prompt_tokens
    prefill = prompt_tokens * (8 * hidden + 3 * widest + 3 * int(text.intermediate_size)) * HALF_BYTES
    activations = max(logits + hidden_states + decode_attention, prefill + prefill_attention)
    if expert_dequant == "layer" and quantize != "none" and text.num_experts:
        activations += int(text.num_experts) * 3 * int(text.moe_intermediate_size) * hidden * HALF_BYTES

    def totals(include_embeddings: bool) -> tuple[dict[str, Component], dict[str, int], int, float]:
        components, counts = build(include_embeddings)
        weights = sum(c.bytes for c in components.values())
        transient = 0
        if include_embeddings and quantize != "none":
            transient = vocab * hidden * HALF_BYTES  # self-conditioning dequantizes the whole table (see quantize)
        peak = weights + kv_recorded + prompt_cache_gb * GIB + activations + transient + reserve_gb * GIB
        return components, counts, weights, peak / GIB

    if quantize == "none":
        include, reason = False, "no quantization"
    elif quantize_embeddings is not None:
        include, reason = quantize_embeddings, "asked for" if quantize_embeddings else "kept bf16 as asked"
    else:
        _, _, _, peak_without = totals(False)
        _, _, _, peak_with = totals(True)
        include = peak_without > gpu_memory_gb and peak_with <= gpu_memory_gb
        if include:
            reason = "quantized: it is what makes the plan fit"
        elif peak_without <= gpu_memory_gb:
            reason = "kept bf16: fits without"
        else:
            reason = ("kept bf16: quantizing them would not make it fit (a quantized table is dequantized whole "
                      "for self-conditioning until a fused kernel exists)")
    components, counts, weights, peak_gb = totals(include)

    # -- bandwidth floor: bytes a canvas forward must stream
    experts = int(text.num_experts or 0)
    top_k = int(text.top_k_experts or 0)
    touched = 1.0 - (1.0 - top_k / experts) ** rows if experts else 1.0
    streamed = 0
    for kind, component in components.items():
        if kind == "vision_tower":
            continue
        share = touched if kind == "experts" else 1.0
        streamed += int(component.bytes * share)
    streamed += components["embeddings"].bytes  # read twice: self-conditioning matmul and lm_head
    streamed += 2 * rows * vocab * 4  # fp32 logits written, then read by the next self-conditioning
    active = _active_parameters(counts, top_k, experts)
    attention_flops = prefill_attention_flops = 0  # QK^T and PV
    for index, layer_type in enumerate(text.layer_types):
        width = heads * int(text.per_layer_config[index].head_dim)
        window = int(text.sliding_window) - 1 if layer_type == "sliding_attention" else prompt_tokens
        attention_flops += 4 * rows * (min(prompt_tokens, window) + canvas) * width
        prefill_attention_flops += 4 * batch * prompt_tokens * min(prompt_tokens, window + 1) * width // 2  # causal
    forward_flops = 2 * active * rows + attention_flops + 2 * rows * vocab * hidden  # + self-conditioning matmul
    prefill_flops = 2 * (active - counts["embeddings"]) * prompt_tokens * batch  # no lm_head in the encoder
    prefill_flops += prefill_attention_flops

    cards = list(CARDS)
    if bandwidth_gbs is not None:
        cards.append(Card("custom", gpu_memory_gb, float(bandwidth_gbs), 0.0, True))
    card_plans = []
    for card in cards:
        bandwidth_ms = streamed / (card.bandwidth_gbs * 1e9) * 1e3
        compute_ms = forward_flops / (card.bf16_tflops * 1e12) * 1e3 if card.bf16_tflops else 0.0
        prefill_ms = max(prefill_flops / (card.bf16_tflops * 1e12) * 1e3 if card.bf16_tflops else 0.0,
                         (weights - components.get("vision_tower", Component(0, 0, False)).bytes)
                         / (card.bandwidth_gbs * 1e9) * 1e3)
        card_plans.append(CardPlan(
            name=card.name, memory_gb=card.memory_gb, bandwidth_gbs=card.bandwidth_gbs,
            fits=peak_gb <= card.memory_gb and (quantize != "fp8" or card.fp8),
            headroom_gb=round(card.memory_gb - peak_gb, 2),
            floor_ms_per_forward=round(max(bandwidth_ms, compute_ms), 4),
            bandwidth_ms=round(bandwidth_ms, 4), compute_ms=round(compute_ms, 4),
            prefill_floor_ms=round(prefill_ms, 4),
        ))
    notes = [
        f"experts touched per canvas forward: {touched:.6f} of {experts} "
        f"({rows} tokens x top-{top_k}); a canvas forward streams ~all weights",
        "full-attention layers reuse keys as values (no v_proj), but the cache stores the normed/rotated keys "
        "and the normed values separately, so K and V are both counted",
        "peak = weights + recorded prompt KV + prompt-cache budget + activation peak + reserve",
    ]
    return Plan(
        model=name, quantize=quantize, embeddings_quantized=include, embeddings_reason=reason,
        gpu_memory_gb=gpu_memory_gb, prompt_tokens=prompt_tokens, batch=batch, canvas=canvas,
        fits=peak_gb <= gpu_memory_gb,
        weights_gb=round(weights / GIB, 3), weights_bytes=weights,
        kv_cache_gb=round(kv_capped / GIB, 3), kv_recorded_gb=round(kv_recorded / GIB, 3),
        prompt_cache_gb=prompt_cache_gb,
        activation_peak_gb=round(activations / GIB, 3), reserve_gb=reserve_gb, peak_gb=round(peak_gb, 3),
        floor_ms_per_forward={card.name: card.floor_ms_per_forward for card in card_plans},
        parameters={**counts, "text": sum(v for k, v in counts.items() if k != "vision_tower"),
                    "total": sum(counts.values()), "active_per_token": active},
        components={kind: {"parameters": c.parameters, "bytes": c.bytes, "gb": round(c.gb, 3), "quantized": c.quantized}
                    for kind, c in sorted(components.items(), key=lambda item: -item[1].bytes)},
        streamed_bytes_per_forward=streamed, expert_fraction_touched=touched, cards=card_plans, notes=notes,
    )


def _active_parameters(counts: dict[str, int], top_k: int, experts: int) -> int:
    """Parameters one text token uses: everything but the vision tower, with top_k/experts of the experts."""
    total = sum(v for k, v in counts.items() if k not in ("vision_tower", "experts"))
    return total + (counts.get("experts", 0) * top_k // experts if experts else 0)


def plan_from_model_dir(path: Path | str, gpu_memory_gb: float = 24.0, **options: Any) -> Plan:
    """`plan` for a checkpoint directory, reading only its config.json."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return plan(config, gpu_memory_gb, name=options.pop("name", str(path)), **options)


# ---------------------------------------------------------------------------------------------------------------
# `dgls engine plan`


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dgls engine plan` (shared by `main_plan` and the dgls CLI)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="checkpoint directory (reads config.json only)")
    source.add_argument("--preset", help="shipped config, e.g. diffusiongemma-26b-a4b")
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="GPU memory to plan for, in GiB")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"])
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length for the KV cache")
    parser.add_argument("--batch", type=int, default=1, help="canvases per forward (candidates)")
    parser.add_argument("--quantize-embeddings", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB, help="CUDA context and slack")
    parser.add_argument("--prompt-cache-gb", type=float, default=DEFAULT_PROMPT_CACHE_GB,
                        help="prompt KV cache budget (engine serve --cache-mb / 1024)")
    parser.add_argument("--bandwidth-gbs", type=float, help="also give the floor for this memory bandwidth")
    parser.add_argument("--expert-dequant", choices=["expert", "layer"], default="expert",
                        help="quantized experts dequantized one at a time, or a layer at once (faster, +1 layer)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    """Run `dgls engine plan` from parsed arguments; prints a table or JSON, returns the exit status."""
    try:
        if args.preset:
            config, name = load_preset(args.preset), args.preset
        else:
            config_file = Path(args.model) / "config.json"
            if not config_file.is_file():
                raise ValueError(f"{args.model} has no config.json: pass a checkpoint directory to --model")
            config, name = json.loads(config_file.read_text(encoding="utf-8")), str(args.model)
        embeddings = {"auto": None, "yes": True, "no": False}[args.quantize_embeddings]
        result = plan(config, args.gpu_memory_gb, quantize=args.quantize, prompt_tokens=args.prompt_tokens,
                      batch=args.batch, quantize_embeddings=embeddings, reserve_gb=args.reserve_gb,
                      prompt_cache_gb=args.prompt_cache_gb, bandwidth_gbs=args.bandwidth_gbs, name=name,
                      expert_dequant=args.expert_dequant)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as exc:
        print(f"[dgls] plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_plan(result))
    return 0 if result.fits else 1


def main_plan(argv: list[str] | None = None) -> int:
    """`dgls engine plan ...` as a function: exit status 0 fits, 1 does not fit, 2 bad input."""
    parser = argparse.ArgumentParser(prog="dgls engine plan", description="Will this model fit this GPU?")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


def format_plan(result: Plan) -> str:
    """A readable report: verdict, memory breakdown, per-card table."""
    verdict = "fits" if result.fits else "does NOT fit"
    lines = [
        f"{result.model}: {result.parameters['text'] / 1e9:.2f}B text parameters "
        f"({result.parameters['active_per_token'] / 1e9:.2f}B active per token), quantize={result.quantize}, "
        f"embeddings {'quantized' if result.embeddings_quantized else 'bf16'} ({result.embeddings_reason})",
        f"{verdict} in {result.gpu_memory_gb:g} GB: peak {result.peak_gb:.2f} GB "
        f"(prompt {result.prompt_tokens} tokens, batch {result.batch}, canvas {result.canvas})",
        "",
        f"  {'weights':<22}{result.weights_gb:>8.2f} GB",
    ]
    for kind, component in result.components.items():
        mark = " (quantized)" if component["quantized"] else ""
        lines.append(f"    {kind:<20}{component['gb']:>8.2f} GB  {component['parameters'] / 1e9:6.3f}B params{mark}")
    lines += [
        f"  {'prompt KV (recorded)':<22}{result.kv_recorded_gb:>8.2f} GB  (decoder reads {result.kv_cache_gb:.2f} GB:"
        " sliding layers capped at the window)",
        f"  {'prompt cache budget':<22}{result.prompt_cache_gb:>8.2f} GB",
        f"  {'activation peak':<22}{result.activation_peak_gb:>8.2f} GB  (fp32 logits [B, canvas, vocab] dominate)",
        f"  {'CUDA reserve':<22}{result.reserve_gb:>8.2f} GB",
        f"  {'peak':<22}{result.peak_gb:>8.2f} GB",
        "",
        f"  floor per canvas forward (streams {result.streamed_bytes_per_forward / GIB:.1f} GB; "
        f"{result.expert_fraction_touched:.4%} of experts touched):",
        f"    {'card':<10}{'memory':>9}{'GB/s':>8}{'fits':>6}{'floor ms':>10}{'bw ms':>8}{'flop ms':>9}"
        f"{'prefill ms':>12}",
    ]
    for card in result.cards:
        lines.append(
            f"    {card.name:<10}{card.memory_gb:>7.1f}GB{card.bandwidth_gbs:>8.0f}{'yes' if card.fits else 'no':>6}"
            f"{card.floor_ms_per_forward:>10.2f}{card.bandwidth_ms:>8.2f}{card.compute_ms:>9.2f}"
            f"{card.prefill_floor_ms:>12.1f}"
        )
    return "\n".join(lines)


def expected_experts_touched(tokens: int, top_k: int, experts: int) -> float:
    """Expected number of distinct experts `tokens` tokens hit with balanced top-k routing."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens) if experts else 0.0


__all__ = ["CARDS", "Card", "CardPlan", "Plan", "add_plan_arguments", "expected_experts_touched", "format_plan",
           "load_preset", "main_plan", "plan", "plan_from_model_dir", "run_plan"]
