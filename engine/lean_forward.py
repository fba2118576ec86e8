"""dgls' own forward pass of DiffusionGemma's text stack: the prompt encode and the decoder step, written for the
small batches an editor sends.

Why: transformers' forward is general (any cache, any mask, recorded outputs, per-expert loops); on a small model
on a CPU its bookkeeping costs more than its arithmetic. Shipped model, 2-core CPU: a decoder step over the
32-token canvas 13.3 ms there, 9.9 ms here; encoding the 2 tokens a keystroke adds 12.9 ms there, nothing extra
here (they ride along in the first decoder step); `benchmarks/engine_latency.py` measures both side by side.

What it does differently, never what it computes:
- reads the weights of the loaded model's own modules; q/k/v and gate/up become row blocks of one tensor each
  (`_fused`: the model's parameters turn into views of it, so there is no second copy);
- the decoder's attention keys and values live in one buffer per layer for the whole request: the prompt's part
  is copied in once, each step writes only the canvas's part (transformers concatenates them every step);
- a `PromptKV`'s pending prompt tokens run through the layers in the first decoder step together with the canvas
  (the encoder and the decoder share their layers), causal over the cache they extend (`engine/lean_decoder.py`);
- one RMS normalisation for all heads' q/k/v norms, one for the three norms of a layer's input; rotary tables
  computed once per model; no masks where attention is unmasked; masks from positions otherwise;
- the mixture of experts runs densely (every expert on every token, unchosen ones weighted 0) when the model
  has few experts and the step few tokens, else through transformers' own expert module;
- the prompt rows skip the last layer's feed-forward block, whose output nothing reads.

Exactness: logits equal transformers' within float rounding (RMS norms by a reciprocal square root where
transformers raises to -0.5; expert sums in another order); tests/engine/test_lean_forward.py compares both on
the shipped model and on tiny random models with other layouts. Tokens can differ only where two are within
rounding of each other. Not served (`unsupported` says why; the engine then uses transformers' forward):
quantized weights, biased projections, a bidirectional prompt encoder, models without the layer layout read here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from engine.lean_decoder import DecoderSession

log = logging.getLogger("dgls.engine")
# Up to this many experts and tokens, run every expert on every token (wasted FLOPs beat per-expert indexing:
# 0.52 vs 0.74 ms a layer for a 32-token canvas on the shipped model, 2-core CPU); above, transformers' expert
# loop (3.0 vs 7.5 ms for a 432-token prompt).
DENSE_EXPERTS_MAX = 8
DENSE_EXPERTS_TOKENS = 64
DYNAMIC_ROPE = ("dynamic", "longrope")  # rope types whose tables change with the sequence length
ROPE_TABLE_POSITIONS = 16_384  # rotary tables are kept for prompts up to this long (a few MB for small models)
FORWARD_MODES = ("auto", "on", "off")


def select_forward(model: Any, mode: str) -> LeanForward | None:
    """`auto`: the lean forward wherever it serves the model, else transformers' (logged); `on`: the lean
    forward, else a ValueError saying why; `off`: transformers' forward (None)."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"unknown forward mode {mode!r}; use auto, on or off")
    if mode == "off":
        return None
    reason = LeanForward.unsupported(model)
    if reason and mode == "on":
        raise ValueError(f"--lean-forward on: {reason}")
    if reason:
        log.info("lean forward off: %s", reason)
        return None
    try:
        return LeanForward(model)
    except Exception as exc:  # auto never lets the optional fast path stop the engine
        if mode == "on":
            raise
        log.warning("lean forward off: %s: %s", type(exc).__name__, exc)
        return None


def rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' DiffusionGemmaRMSNorm: computed in float32, scaled by `weight` (if any), cast back."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / rms(x)` over the last axis, in float32 (an RMS norm before its weight)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` with rotate_half's sign folded into `sin_signed` (x: [B, T, heads, D])."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def _rope_tables(rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor, layer_type: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [1 or B, T, 1, D] from transformers' own rotary module (any rope type)."""
    cos, sin = rotary(like, positions, layer_type)
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), sin_signed.unsqueeze(2)


@dataclass(slots=True)
class _Layer:
    """One layer's weights, looked up once (module attribute lookups cost more than small ops here)."""

    module: Any  # the transformers layer (its expert module serves the routed path)
    sliding: bool
    heads: int
    kv_heads: int
    qkv: torch.Tensor  # [q + k (+ v) rows, hidden]: the projections' own storage (see `_fused`)
    separate_values: bool  # False: the values are the keys before their norm
    qk_norm: torch.Tensor  # [heads + kv_heads, D] float32: q_norm's then k_norm's weight per head
    norms: dict[str, torch.Tensor]  # float32 weights of the layer's other norms
    o: torch.Tensor
    gate_up: torch.Tensor  # [2I, hidden]: the dense MLP's gate and up rows (their own storage)
    down: torch.Tensor
    router_scale: torch.Tensor
    router_root: float
    router: torch.Tensor
    per_expert_scale: torch.Tensor
    expert_gate_up: torch.Tensor  # [E, 2I', hidden]
    expert_down: torch.Tensor  # [E, hidden, I']
    dense_experts: bool
    scalar: torch.Tensor | None  # the layer scalar, None when it is 1


def _fused(parameters: list[nn.Parameter]) -> torch.Tensor:
    """One [sum of rows, in] tensor whose row blocks *are* `parameters`: their data become views of it, so
    the model keeps working, holds no second copy, and one matmul computes all of them. Idempotent."""
    first = parameters[0]
    fused = getattr(first, "_dgls_fused", None)
    if fused is not None and fused.shape[0] == sum(p.shape[0] for p in parameters) and all(
        p.data_ptr() == fused[offset:].data_ptr()
        for p, offset in zip(parameters, _offsets(parameters), strict=True)
    ):
        return fused
    fused = torch.cat([p.data for p in parameters])
    for p, offset in zip(parameters, _offsets(parameters), strict=True):
        p.data = fused[offset : offset + p.shape[0]]
    first._dgls_fused = fused  # type: ignore[attr-defined]
    return fused


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two layers compute the same function: the same parameters and equal buffers."""
    parameters_a, parameters_b = dict(a.named_parameters()), dict(b.named_parameters())
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    return (parameters_a.keys() == parameters_b.keys() and buffers_a.keys() == buffers_b.keys()
            and all(parameters_a[name] is parameters_b[name] for name in parameters_a)
            and all(torch.equal(buffers_a[name], buffers_b[name]) for name in buffers_a))


def _offsets(parameters: list[nn.Parameter]) -> list[int]:
    offsets, total = [], 0
    for p in parameters:
        offsets.append(total)
        total += p.shape[0]
    return offsets


class LeanForward:
    """The encode and decoder step of one loaded DiffusionGemma, over transformers' cache objects."""

    def __init__(self, model: Any) -> None:
        reason = self.unsupported(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self.eps = float(self.config.rms_norm_eps)
        self.window = int(self.config.sliding_window or 0)
        self.layer_types = list(self.config.layer_types)
        self.decoder = model.model.decoder
        self.encoder = model.model.encoder.language_model
        self.embed = self.decoder.embed_tokens
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.top_k = int(self.config.top_k_experts)
        self.gelu_tanh = self.config.hidden_activation == "gelu_pytorch_tanh"
        self.layers = [self._describe(layer) for layer in self.decoder.layers]
        self._rope_tables: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # rotary tables can be reused unless their values depend on the longest position of a call
        self.rope_reusable = not set(self.decoder.rotary_emb.rope_type.values()) & set(DYNAMIC_ROPE)
        # the first step can run pending prompt tokens through the decoder's layers only if they are the encoder's
        self.shared_layers = all(_same_weights(a, b) for a, b in zip(self.encoder.layers, self.decoder.layers,
                                                                       strict=True))
        self.encoder_layers = self.layers if self.shared_layers else [self._describe(layer)
                                                                      for layer in self.encoder.layers]

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why this forward cannot serve `model`, or None."""
        try:
            config = model.config.get_text_config(decoder=True)
            decoder, encoder = model.model.decoder, model.model.encoder.language_model
        except AttributeError as exc:
            return f"not a DiffusionGemmaForBlockDiffusion layout ({exc})"
        if config.use_bidirectional_attention == "all":
            return "the prompt encoder is bidirectional (use_bidirectional_attention='all')"
        for stack in (decoder, encoder):
            for layer in stack.layers:
                linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.router.proj)
                if any(type(linear) is not nn.Linear for linear in linears):
                    return "quantized or replaced linear layers"
                if any(linear.bias is not None for linear in linears):
                    return "projections with biases"
                if not isinstance(getattr(layer.experts, "gate_up_proj", None), torch.Tensor):
                    return "quantized experts"
        if type(decoder.embed_tokens.weight) is not nn.Parameter or type(model.lm_head) is not nn.Linear:
            return "quantized embeddings or head"
        if model.lm_head.weight.data_ptr() != decoder.embed_tokens.weight.data_ptr():
            return "the head is not tied to the embeddings"
        return None

    @staticmethod
    def _describe(layer: Any) -> _Layer:
        attention, mlp, router, experts = layer.self_attn, layer.mlp, layer.router, layer.experts
        projections = [attention.q_proj.weight, attention.k_proj.weight]
        if attention.v_proj is not None:
            projections.append(attention.v_proj.weight)
        heads = attention.q_proj.out_features // attention.head_dim
        kv_heads = attention.k_proj.out_features // attention.head_dim
        qk_norm = torch.cat((attention.q_norm.weight.float().expand(heads, -1),
                             attention.k_norm.weight.float().expand(kv_heads, -1)))
        norms = {name: getattr(layer, name).weight.float() for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
            "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")}
        scalar = layer.layer_scalar
        return _Layer(
            module=layer,
            sliding=bool(attention.is_sliding),
            heads=heads,
            kv_heads=kv_heads,
            qkv=_fused(projections),
            separate_values=attention.v_proj is not None,
            qk_norm=qk_norm,
            norms=norms,
            o=attention.o_proj.weight,
            gate_up=_fused([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
            router_scale=router.scale,
            router_root=router.scalar_root_size,
            router=router.proj.weight,
            per_expert_scale=router.per_expert_scale,
            expert_gate_up=experts.gate_up_proj,
            expert_down=experts.down_proj,
            dense_experts=experts.num_experts <= DENSE_EXPERTS_MAX,
            scalar=None if bool((scalar == 1).all()) else scalar,
        )

    # --- shared layer pieces -------------------------------------------------------------------------------

    def qkv(self, spec: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, heads, T, D], keys and values [B, kv_heads, T, D] of normed input `h` [B, T, hidden]:
        one projection, one norm over every head (q_norm, k_norm and the unscaled v_norm), one rotation."""
        batch, length = h.shape[:2]
        heads, kv_heads = spec.heads, spec.kv_heads
        states = F.linear(h, spec.qkv).view(batch, length, -1, spec.qk_norm.shape[-1])
        normed = _normalized(states, self.eps)  # float32
        qk = _rope((normed[:, :, : heads + kv_heads] * spec.qk_norm).to(h.dtype), cos, sin)
        v = normed[:, :, heads + kv_heads :] if spec.separate_values else normed[:, :, heads : heads + kv_heads]
        return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.to(h.dtype).transpose(1, 2)

    def after_attention(self, spec: _Layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, post-attention norm and residual; attended: [B, T, heads * D]."""
        return x + rms(F.linear(attended, spec.o), spec.norms["post_attention_layernorm"], self.eps)

    def feed_forward(self, spec: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The dense MLP and the mixture of experts side by side, their norms, the residual and the layer scale.
        The three norms of the layer input (MLP, experts, router) share one normalisation."""
        eps, norms, dtype = self.eps, spec.norms, x.dtype
        normed = _normalized(x, eps)  # float32
        gate, up = F.linear((normed * norms["pre_feedforward_layernorm"]).to(dtype), spec.gate_up).chunk(2, dim=-1)
        h1 = rms(F.linear(self.act(gate) * up, spec.down), norms["post_feedforward_layernorm_1"], eps)
        flat = normed.view(-1, x.shape[-1])
        weights, index = self._route(spec, flat.to(dtype))
        experts_in = (flat * norms["pre_feedforward_layernorm_2"]).to(dtype)
        if spec.dense_experts and flat.shape[0] <= DENSE_EXPERTS_TOKENS:
            h2 = self._dense_experts(spec, experts_in, weights, index)
        else:
            h2 = spec.module.experts(experts_in, index, weights)
        h2 = rms(h2.view(x.shape), norms["post_feedforward_layernorm_2"], eps)
        x = x + rms(h1 + h2, norms["post_feedforward_layernorm"], eps)
        return x if spec.scalar is None else x * spec.scalar

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh") if self.gelu_tanh else self.decoder.layers[0].mlp.act_fn(x)

    def _route(self, spec: _Layer, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' DiffusionGemmaTextRouter on the normalised layer input [N, hidden]: top-k weights [N, K]
        (renormalised, per-expert scaled) and their experts."""
        h = normed * spec.router_scale * spec.router_root
        probabilities = torch.softmax(F.linear(h, spec.router), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probabilities, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * spec.per_expert_scale[index], index

    def _dense_experts(self, spec: _Layer, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
                       ) -> torch.Tensor:
        """Every expert on every token [N, hidden], each output weighted by its routing weight (0 if unchosen)."""
        gate, up = torch.matmul(x, spec.expert_gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I'] each
        out = torch.matmul(self.act(gate) * up, spec.expert_down.transpose(1, 2))  # [E, N, hidden]
        dense = torch.zeros((x.shape[0], out.shape[0]), dtype=weights.dtype, device=x.device)
        dense.scatter_(1, index, weights)  # [N, E]
        return (out * dense.t().unsqueeze(-1).to(out.dtype)).sum(dim=0)

    def rope(self, stack: Any, start: int, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type: cos and signed sin [1, length, 1, D] for positions start..start+length-1 of `stack`
        (encoder or decoder): rows of a table its rotary module computed once for positions 0..2^k-1."""
        end = start + length
        if not self.rope_reusable or end > ROPE_TABLE_POSITIONS:  # exactly these positions, as transformers does
            return self._rope_rows(stack, start, end)
        tables = self._rope_tables.get(id(stack))
        if tables is None or next(iter(tables.values()))[0].shape[1] < end:
            tables = self._rope_tables[id(stack)] = self._rope_rows(stack, 0, 1 << max(end - 1, 1).bit_length())
        return {kind: (cos[:, start:end], sin[:, start:end]) for kind, (cos, sin) in tables.items()}

    def _rope_rows(self, stack: Any, start: int, end: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        positions = torch.arange(start, end, device=self.embed.weight.device).unsqueeze(0)
        like = self.embed.weight[:1].unsqueeze(0)
        return {kind: _rope_tables(stack.rotary_emb, like, positions, kind) for kind in set(self.layer_types)}

    # --- encoder ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, cache: Any, ids: torch.Tensor, start: int) -> None:
        """Append the keys and values of `ids` [1, n] (prompt positions start..start+n-1) to `cache`, a
        transformers DynamicCache already holding positions 0..start-1, exactly as transformers' encoder would."""
        length = ids.shape[1]
        x = self.encoder.embed_tokens(ids)
        positions = torch.arange(start, start + length, device=ids.device).unsqueeze(0)
        tables = self.rope(self.encoder, start, length)
        last = len(self.encoder_layers) - 1
        for index, spec in enumerate(self.encoder_layers):
            cos, sin = tables[self.layer_types[index]]
            q, k, v = self.qkv(spec, rms(x, spec.norms["input_layernorm"], self.eps), cos, sin)
            keys, values = cache.update(k, v, index)  # what transformers' encoder attends to (window-trimmed)
            mask = self.causal_mask(spec, positions[0], keys.shape[-2]) if length > 1 else None
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                                      enable_gqa=spec.heads != spec.kv_heads)
            x = self.after_attention(spec, x, attended.transpose(1, 2).reshape(1, length, -1))
            if index < last:  # the last layer's feed-forward output is never read
                x = self.feed_forward(spec, x)

    def causal_mask(self, spec: _Layer, positions: torch.Tensor, visible: int) -> torch.Tensor:
        """[n, visible] bool: query i sees the keys at or before its position (and within the window)."""
        end = int(positions[-1]) + 1
        key_positions = torch.arange(end - visible, end, device=positions.device)
        offsets = positions[:, None] - key_positions[None, :]
        mask = offsets >= 0
        if spec.sliding and self.window:
            mask &= offsets < self.window
        return mask

    # --- decoder ---------------------------------------------------------------------------------------------

    def session(self, prompt: Any, prompt_length: int, batch: int, canvas_length: int) -> DecoderSession:
        """The decoder steps of one request (`engine/lean_decoder.py`). `prompt`: a `PromptKV` (its pending tokens
        are encoded by the first step) or transformers' decoder view of an encoded prompt (`decode_view`)."""
        from engine.lean_decoder import DecoderSession  # it builds on this module

        return DecoderSession(self, prompt, prompt_length, batch, canvas_length)
