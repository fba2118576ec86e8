"""The default model's architecture: a small ``DiffusionGemmaForBlockDiffusion`` config.

Owns the sizes (named presets), the dgls extra keys that ``config.json`` carries for the engine
(``dgls_noise``, ``dgls_mask_token_id``, ``dgls_template``), and the tiny vision tower the class requires.
Knows nothing about data or training.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from engine.training.examples import CANVAS_LENGTH
from engine.training.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

TINY_VISION: dict[str, Any] = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=16,
)

PRESETS: dict[str, dict[str, Any]] = {
    # test-sized: builds and steps in milliseconds
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                 num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    # the shipped default: ~8M parameters
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=64,
                  num_global_key_value_heads=2, num_experts=4, top_k_experts=2, moe_intermediate_size=256),
}


def build_config(preset: str = "small", vocab_size: int | None = None, **overrides: Any) -> DiffusionGemmaConfig:
    """A ``DiffusionGemmaConfig`` for ``preset`` with the dgls keys set."""
    text = dict(PRESETS[preset])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    text.update(overrides)
    layers = text["num_hidden_layers"]
    text.update(
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        sliding_window=512, max_position_embeddings=4096, enable_moe_block=True,
    )
    extra: dict[str, Any] = dict(  # extra keys the config keeps and round-trips through config.json
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        dgls_noise="mask", dgls_mask_token_id=MASK_ID, dgls_template="dgls-fim",
    )
    return DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=CANVAS_LENGTH,
                                **extra)


def build_model(config: DiffusionGemmaConfig, seed: int = 0, attention: str = "sdpa"
                ) -> DiffusionGemmaForBlockDiffusion:
    """A freshly initialized fp32 model (``attention``: transformers' attention implementation)."""
    torch.manual_seed(seed)
    config._attn_implementation = attention
    return DiffusionGemmaForBlockDiffusion(config).float()


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (the encoder and decoder share their weights)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
