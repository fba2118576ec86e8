"""What a dgls-servable checkpoint directory is, checked without torch and without reading weights.

A DiffusionGemma checkpoint in the Hugging Face layout: `config.json` with `model_type: diffusion_gemma`,
one or more `*.safetensors`, tokenizer files, optionally `generation_config.json`. dgls-specific keys a
checkpoint may declare in `config.json`: `dgls_noise` (`uniform`, the default, or `mask`),
`dgls_mask_token_id` (required with `mask`) and `dgls_template` (the prompt template to use).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class CheckpointError(Exception):
    """A model directory that cannot be loaded; the message names the path, the problem and the fix."""


def default_model_dir() -> Path:
    """The small model shipped inside the package (used whenever no model is given)."""
    return Path(str(resources.files("engine") / "default_model"))


def check_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Validate `path` without loading weights; returns the parsed config.json."""
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist; pass --model DIR with a checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is a file; pass the checkpoint *directory* to --model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}); re-download the checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "diffusion_gemma":
        raise CheckpointError(
            f"{config_file} declares model_type {model_type!r}, not 'diffusion_gemma': dgls serves "
            "DiffusionGemma checkpoints only"
        )
    if not any(path.glob("*.safetensors")):
        extra = " (found PyTorch .bin weights: convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path} has no *.safetensors weights{extra}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    noise = config.get("dgls_noise", "uniform")
    if noise not in ("uniform", "mask"):
        raise CheckpointError(f"{config_file}: dgls_noise must be 'uniform' or 'mask', got {noise!r}")
    if noise == "mask" and not isinstance(config.get("dgls_mask_token_id"), int):
        raise CheckpointError(f"{config_file}: dgls_noise 'mask' needs an integer dgls_mask_token_id")
    return config
