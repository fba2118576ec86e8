"""Build tiny random DiffusionGemma checkpoints (with a real byte-level BPE tokenizer) for tests.

The same class, files and loading path as a real checkpoint, small enough to build and run in well under a
second on a CPU. Used instead of mocks: every engine test runs the real denoising loop on a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<mask>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"]
SAMPLE_CODE = '''
def add(a, b):
    """Return the sum."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

for i in range(10):
    print(i, add(i, i * 2))
'''


def build_tokenizer(directory: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([SAMPLE_CODE] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", mask_token="<mask>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.save_pretrained(directory)


def build_checkpoint(
    directory: Path,
    noise: str = "uniform",
    sliding_window: int = 512,
    canvas_length: int = 16,
    seed: int = 0,
    max_denoising_steps: int = 8,
) -> Path:
    """Write a random-weight checkpoint directory and return it."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(directory)
    text_config = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, num_global_key_value_heads=1,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"], num_experts=4,
        top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096, enable_moe_block=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision_config = dict(
        model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=16,
    )
    extra = {"dgls_noise": noise, "dgls_template": "dgls-fim"}
    if noise == "mask":
        extra["dgls_mask_token_id"] = 3
    config = DiffusionGemmaConfig(
        text_config=text_config, vision_config=vision_config, canvas_length=canvas_length, **extra
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    # Sharper logits than the random init gives, so the adaptive stop and acceptance actually vary.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=canvas_length, max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.5), t_min=0.4, t_max=0.8,
        stability_threshold=1, confidence_threshold=0.05, eos_token_id=1, pad_token_id=0, bos_token_id=2,
    )
    model.save_pretrained(directory)
    return directory
