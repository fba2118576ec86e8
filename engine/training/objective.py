"""The block-diffusion training objective with absorbing-mask noise and self-conditioning.

Owns one loss evaluation: encode each prompt once into the KV cache, repeat the cache ``noise_copies``
times (the encoder over ~400 prompt tokens dominates a CPU step, the decoder over 32 canvas tokens is cheap,
so several noise draws per encoding buy more signal per millisecond), sample a mask rate t ~ U(eps, 1) per
copy and replace that fraction of canvas positions with ``<mask>``, run a no-grad decoder pass whose logits
self-condition a second (trained) pass for half of the copies, and take the cross-entropy on the masked
positions (plain mean over masked positions).

The canvas supervises only ~10 content tokens per example, while the causal encoder (whose weights the
decoder shares) reads ~400 prompt tokens. ``ar_weight`` adds next-token cross-entropy on the encoder's
last hidden states through the tied LM head (what ``encoder_last_hidden_state`` is exposed for), giving
every prompt token a training signal for ~25% more compute. Knows nothing about files or the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DiffusionGemmaForBlockDiffusion

from engine.hf_compat import returned_cache, with_cache
from engine.training.examples import Batch
from engine.training.tokenizer import MASK_ID

MIN_MASK_RATE = 0.05


def add_noise(canvas: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy canvas, mask) with a per-example mask rate; at least one position is masked per row.

    Drawn from ``generator`` (a CPU generator: the same draws on any device), then moved to the canvas' device.
    """
    batch, length = canvas.shape
    rate = MIN_MASK_RATE + (1 - MIN_MASK_RATE) * torch.rand(batch, 1, generator=generator)
    mask = torch.rand(batch, length, generator=generator) < rate
    forced = torch.randint(0, length, (batch,), generator=generator)
    mask[torch.arange(batch), forced] = True
    mask = mask.to(canvas.device)
    return torch.where(mask, torch.full_like(canvas, MASK_ID), canvas), mask


def canvas_logits(model: DiffusionGemmaForBlockDiffusion, batch: Batch, noisy: torch.Tensor,
                  self_conditioning_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [B*k, C, V] for ``noisy`` [B*k, C] (k noise copies per prompt, interleaved); self-conditioned
    (per row) on a no-grad pass when a mask is given."""
    return forward(model, batch, noisy, self_conditioning_mask)[0]


def forward(model: DiffusionGemmaForBlockDiffusion, batch: Batch, noisy: torch.Tensor,
            self_conditioning_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas logits [B*k, C, V], encoder last hidden states [B, S, H])."""
    copies = noisy.shape[0] // batch.input_ids.shape[0]
    encoded = model.model.encoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
    )
    cache = returned_cache(encoded)
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    decoder_kwargs = dict(
        **with_cache(cache), decoder_input_ids=noisy,
        decoder_attention_mask=batch.decoder_attention_mask.repeat_interleave(copies, 0),
        decoder_position_ids=batch.decoder_position_ids.repeat_interleave(copies, 0),
    )
    previous = None
    if self_conditioning_mask is not None and bool(self_conditioning_mask.any()):
        with torch.no_grad():
            previous = model(**decoder_kwargs).logits
    else:
        self_conditioning_mask = None
    logits = model(**decoder_kwargs, self_conditioning_logits=previous,
                   self_conditioning_mask=self_conditioning_mask).logits
    return logits, encoded.last_hidden_state


def encoder_ar_loss(model: DiffusionGemmaForBlockDiffusion, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the causal encoder over the real (unpadded) prompt tokens."""
    valid = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()  # [B, S-1]
    logits = model.lm_head(hidden[:, :-1][valid]).float()  # [N, V]
    cap = model.final_logit_softcapping
    logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, batch.input_ids[:, 1:][valid])


def losses(model: DiffusionGemmaForBlockDiffusion, batch: Batch, generator: torch.Generator,
           self_conditioning_rate: float = 0.5, noise_copies: int = 1, ar_weight: float = 0.0
           ) -> dict[str, torch.Tensor]:
    """``canvas``: mean CE over the masked canvas positions of ``noise_copies`` noise draws per example;
    ``encoder_ar``: the encoder's next-token CE (only computed when ``ar_weight`` > 0); ``total``."""
    clean = batch.canvas.repeat_interleave(noise_copies, 0)
    noisy, mask = add_noise(clean, generator)
    use_sc = (torch.rand(clean.shape[0], generator=generator) < self_conditioning_rate).to(clean.device)
    logits, hidden = forward(model, batch, noisy, use_sc)
    logits = logits.clone()
    logits[..., MASK_ID] = float("-inf")  # the model never emits <mask>
    parts = {"canvas": F.cross_entropy(logits[mask], clean[mask])}
    parts["total"] = parts["canvas"]
    if ar_weight > 0:
        parts["encoder_ar"] = encoder_ar_loss(model, batch, hidden)
        parts["total"] = parts["canvas"] + ar_weight * parts["encoder_ar"]
    return parts


def loss(model: DiffusionGemmaForBlockDiffusion, batch: Batch, generator: torch.Generator,
         self_conditioning_rate: float = 0.5, noise_copies: int = 1, ar_weight: float = 0.0) -> torch.Tensor:
    """The training loss (``losses(...)["total"]``)."""
    return losses(model, batch, generator, self_conditioning_rate, noise_copies, ar_weight)["total"]
