"""The sampler's rules, apart from the loop that applies them (`engine/denoiser.py`): its settings as a
checkpoint's generation_config gives them, the entropy that decides what a step accepts, the two ways of drawing
a token, and the score that ranks candidates. Stateless; knows nothing about models, caches or text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class SamplerSettings:
    """transformers' DiffusionGemma sampler (its defaults), plus dgls' canvas cut."""

    max_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # absorbing noise: once every row has a decided end (EOS or padding), later steps run the canvas only up to
    # the last row's end (a checkpoint's generation_config can set `dgls_cut_canvas: false`)
    cut_canvas: bool = True

    @classmethod
    def from_generation_config(cls, config: Any) -> SamplerSettings:
        """Read the checkpoint's generation_config, falling back to transformers' own defaults."""
        defaults = cls()
        sampler = getattr(config, "sampler_config", None)
        bound = getattr(sampler, "entropy_bound", None) if sampler is not None else None

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(config, name, None)
            return fallback if value is None else value

        return cls(
            max_steps=int(pick("max_denoising_steps", defaults.max_steps)),
            t_min=float(pick("t_min", defaults.t_min)),
            t_max=float(pick("t_max", defaults.t_max)),
            entropy_bound=float(bound if bound is not None else defaults.entropy_bound),
            stability_threshold=int(pick("stability_threshold", defaults.stability_threshold)),
            confidence_threshold=float(pick("confidence_threshold", defaults.confidence_threshold)),
            cut_canvas=bool(pick("dgls_cut_canvas", defaults.cut_canvas)),
        )

    def temperature(self, cur_step: int) -> float:
        """The schedule's temperature at `cur_step` (counting down from `max_steps` to 1)."""
        return self.t_min + (self.t_max - self.t_min) * (cur_step / self.max_steps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position, computed exactly as `torch.distributions.Categorical(logits=...).entropy()`
    (same operations, so the same bits) without its argument validation, which costs ~1 ms a step."""
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(normalized, dim=-1)
    return -(normalized.clamp(min=torch.finfo(normalized.dtype).min) * probs).sum(-1)


def sample_multinomial(processed: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `processed` [N, V] from its softmax; [N]."""
    if processed.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=processed.device)
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(-1)


def sample_by_cdf(processed: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `processed` [N, V] from its softmax, by inverting the cumulative distribution:
    one uniform draw per row where `multinomial` draws V exponentials (~3 ms a step for a 32x4096 canvas
    on a CPU). Used where no reference sampler's random stream has to be reproduced."""
    if processed.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=processed.device)
    cdf = torch.softmax(processed, dim=-1, dtype=torch.float32).cumsum(dim=-1)  # [N, V]
    draws = torch.rand((processed.shape[0], 1), generator=generator, device=processed.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, draws, right=True)  # first token whose cumulative mass exceeds the draw
    past_end = tokens >= processed.shape[-1]  # a draw rounded up to the total (about 2**-24 of them)
    return torch.where(past_end, processed.argmax(dim=-1, keepdim=True), tokens).view(-1)


def mean_log_probability(processed: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """[B] mean log-probability of each row of `argmax` [B, C] under `processed` [B, C, V] (-inf as -1e4)."""
    log_probs = torch.log_softmax(processed.float(), dim=-1).gather(-1, argmax.unsqueeze(-1)).squeeze(-1)
    return torch.nan_to_num(log_probs, neginf=-1e4).mean(dim=-1)
