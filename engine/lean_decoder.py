"""The decoder side of dgls' lean forward (`engine/lean_forward.py`): one request's denoising steps.

`PromptKV` is what the engine hands the denoiser instead of an encoded prompt: the cached prefix and the tokens
still to encode. `DecoderSession` sets up the request once (the prompt's keys and values copied into one buffer
per layer with room for the canvas, rotary rows for the canvas) and then computes each step's logits; its first
step also runs the pending prompt tokens through the layers, in the same matmuls as the canvas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.lean_forward import LeanForward, rms


@dataclass(slots=True)
class PromptKV:
    """An encoded prompt prefix and the rest of the prompt, still to encode. The engine hands this to the
    denoiser instead of encoding the rest itself: the first decoder step runs those tokens through the layers
    together with the canvas (one forward instead of two) and appends their keys and values to `cache`."""

    cache: Any  # recording DynamicCache with positions 0..start-1 (see engine.prompt_cache)
    pending: torch.Tensor  # [1, n] token ids at positions start..start+n-1 (n may be 0)
    length: int  # the whole prompt: start + n

    @property
    def start(self) -> int:
        return self.length - self.pending.shape[1]


class StepCancelled(Exception):
    """Raised inside a decoder step when the request's `cancelled` callback says so (checked between layers)."""


class DecoderSession:
    """The decoder steps of one request. Rows are flattened to one token axis [1, T, hidden] so that the first
    step's pending prompt tokens and the B canvases share every projection; attention is split per part."""

    def __init__(self, lean: LeanForward, prompt: Any, length: int, batch: int, canvas_length: int) -> None:
        self.lean = lean
        self.batch, self.canvas_length = batch, canvas_length
        self.cancelled: Callable[[], bool] | None = None  # polled before each layer (set by `Denoiser.run`)
        self.cut_tables: tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.prompt = prompt if isinstance(prompt, PromptKV) else None
        self.source = prompt.cache if isinstance(prompt, PromptKV) else prompt  # where the prompt's KV is read
        canvas_tables = lean.rope(lean.decoder, length, canvas_length)
        self.canvas_tables = {kind: (cos.repeat(1, batch, 1, 1), sin.repeat(1, batch, 1, 1)) if batch > 1
                              else (cos, sin) for kind, (cos, sin) in canvas_tables.items()}
        pending = self.prompt.pending.shape[1] if self.prompt is not None else 0
        if pending and not lean.shared_layers and self.prompt is not None:  # encoder weights of its own
            lean.encode(self.prompt.cache, self.prompt.pending, self.prompt.start)
            self.prompt.pending, pending = self.prompt.pending[:, :0], 0
        # the share of the first call's rows that are canvas: what the deadline check expects of later steps
        self.canvas_share = batch * canvas_length / (pending + batch * canvas_length)
        self.first_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if pending:  # prompt rows rotate as the encoder does, canvas rows as the decoder does
            prompt_tables = lean.rope(lean.encoder, length - pending, pending)
            self.first_tables = {kind: (torch.cat((cos, self.canvas_tables[kind][0]), dim=1),
                                        torch.cat((sin, self.canvas_tables[kind][1]), dim=1))
                                 for kind, (cos, sin) in prompt_tables.items()}
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not pending:
            for index in range(len(lean.layers)):
                self._allocate(index)

    def _allocate(self, index: int) -> None:
        """Layer `index`'s key/value buffers [B, kv_heads, prompt + C, D]: the prompt part copied once (sliding
        layers keep their last window - 1 positions, as transformers' decoder sees them)."""
        source = self.source.layers[index]
        cached_keys, cached_values = source.keys, source.values
        window = getattr(source, "sliding_window", None)
        if window is not None and cached_keys.shape[-2] >= window:
            cached_keys, cached_values = cached_keys[..., -window + 1 :, :], cached_values[..., -window + 1 :, :]
        prompt = cached_keys.shape[2]
        shape = (self.batch, cached_keys.shape[1], prompt + self.canvas_length, cached_keys.shape[3])
        keys, values = cached_keys.new_empty(shape), cached_values.new_empty(shape)
        keys[:, :, :prompt] = cached_keys
        values[:, :, :prompt] = cached_values
        self.kv.append((keys, values))

    def _tables(self, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rotary rows of the first `length` canvas positions of every row (kept for the next step)."""
        if length == self.canvas_length:
            return self.canvas_tables
        if self.cut_tables is None or self.cut_tables[0] != length:
            self.cut_tables = (length, {kind: (_first_positions(cos, self.batch, length),
                                               _first_positions(sin, self.batch, length))
                                        for kind, (cos, sin) in self.canvas_tables.items()})
        return self.cut_tables[1]

    @torch.inference_mode()
    def __call__(self, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits [B, L, V] for `canvas` [B, L], as DiffusionGemmaForBlockDiffusion's forward gives them;
        the first call (the whole canvas) also encodes the prompt's pending tokens into its cache. Later calls may
        pass only the first L positions of each row (the denoiser cuts the canvas after its text's end)."""
        lean, eps = self.lean, self.lean.eps
        decoder, embed = lean.decoder, lean.embed
        batch, canvas_length = canvas.shape
        x = embed(canvas)
        if self_conditioning_logits is not None:
            conditioning = decoder.self_conditioning
            soft = torch.matmul(torch.softmax(self_conditioning_logits, dim=-1, dtype=torch.float32)
                                .to(embed.weight.dtype), embed.weight) * embed.embed_scale.to(x.dtype)
            h = rms(soft, conditioning.pre_norm.weight, eps)
            gate, up = F.linear(h, conditioning.gate_proj.weight), F.linear(h, conditioning.up_proj.weight)
            x = x + F.linear(lean.act(gate) * up, conditioning.down_proj.weight)
        x = rms(x, None, eps).reshape(1, batch * canvas_length, -1)  # no signal: transformers adds zeros
        prompt = self.prompt if self.prompt is not None and self.prompt.pending.shape[1] else None
        pending, tables = 0, self._tables(canvas_length)
        if prompt is not None and self.first_tables is not None:
            if canvas_length != self.canvas_length:
                raise ValueError("the first decoder step runs the whole canvas (it encodes the prompt's rest)")
            pending, tables = prompt.pending.shape[1], self.first_tables
            x = torch.cat((lean.encoder.embed_tokens(prompt.pending), x), dim=1)
        last = len(lean.layers) - 1
        for index, spec in enumerate(lean.layers):
            if self.cancelled is not None and self.cancelled():
                raise StepCancelled  # a first step stopped here leaves `prompt.pending` set: nothing is cached
            cos, sin = tables[lean.layer_types[index]]
            q, k, v = lean.qkv(spec, rms(x, spec.norms["input_layernorm"], eps), cos, sin)
            parts = []
            if prompt is not None:  # the prompt's rows: causal attention over the cache, which they extend
                keys, values = prompt.cache.update(k[:, :, :pending], v[:, :, :pending], index)
                positions = torch.arange(prompt.start, prompt.length, device=x.device)
                mask = lean.causal_mask(spec, positions, keys.shape[-2]) if pending > 1 else None
                attended = F.scaled_dot_product_attention(q[:, :, :pending], keys, values, attn_mask=mask,
                                                          scale=1.0, enable_gqa=spec.heads != spec.kv_heads)
                parts.append(attended[0].transpose(0, 1).reshape(pending, -1))
                self._allocate(index)
            keys, values = self.kv[index]  # the canvas rows: bidirectional over the prompt and the canvas
            end = keys.shape[2] - self.canvas_length + canvas_length
            if end < keys.shape[2]:
                keys, values = keys[:, :, :end], values[:, :, :end]
            keys[:, :, -canvas_length:] = _per_canvas(k[:, :, pending:], batch)
            values[:, :, -canvas_length:] = _per_canvas(v[:, :, pending:], batch)
            attended = F.scaled_dot_product_attention(_per_canvas(q[:, :, pending:], batch), keys, values,
                                                      scale=1.0, enable_gqa=spec.heads != spec.kv_heads)
            parts.append(attended.transpose(1, 2).reshape(batch * canvas_length, -1))
            out = torch.cat(parts).unsqueeze(0) if pending else parts[0].unsqueeze(0)
            x = lean.after_attention(spec, x, out)
            if pending and index == last:  # nothing reads the prompt rows' last feed-forward
                x = x[:, pending:]
            x = lean.feed_forward(spec, x)
        if prompt is not None:
            prompt.pending = prompt.pending[:, :0]
        x = rms(x.view(batch, canvas_length, -1), decoder.norm.weight, eps)
        logits = F.linear(x, embed.weight).float()
        if lean.softcap:
            logits = torch.tanh(logits / lean.softcap) * lean.softcap
        return logits


def _per_canvas(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """[1, heads, B*C, D] flattened canvas rows -> [B, heads, C, D]."""
    return rows[0].unflatten(1, (batch, -1)).transpose(0, 1)


def _first_positions(table: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[1, B*C, 1, D] per-row rotary table -> the first `length` positions of each row, [1, B*length, 1, D]."""
    return table.unflatten(1, (batch, -1))[:, :, :length].flatten(1, 2)
