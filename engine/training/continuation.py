"""Continuing an exported model: what ``train --init DIR`` checks, copies and records.

Owns the checks on the init directory (its files, its architecture against the preset, its tokenizer against
the run's), the copy of its weights, its sampler defaults (carried to the new export unless ``--sampler``
names others), and the provenance record: the init's ``TRAINING.json`` under ``initialized_from`` with its
resolved path and the SHA-256 of its weights, and the chain's totals.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from engine.training.export import DEFAULT_SAMPLER

REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def missing(directory: Path) -> list[str]:
    """The files an exported model needs that ``directory`` lacks."""
    return [name for name in REQUIRED if not (directory / name).is_file()]


def adopt_tokenizer(directory: Path, run_tokenizer: Path) -> None:
    """Copy the init's tokenizer into the run, or check that the run's is the same one (the weights speak its
    ids)."""
    theirs = (directory / "tokenizer.json").read_bytes()
    if not (run_tokenizer / "tokenizer.json").exists():
        run_tokenizer.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            (run_tokenizer / name).write_bytes((directory / name).read_bytes())
    elif (run_tokenizer / "tokenizer.json").read_bytes() != theirs:
        raise SystemExit(f"{run_tokenizer} differs from {directory}'s tokenizer, whose ids the --init weights use; "
                         f"remove {run_tokenizer} (the run copies {directory}'s) or give another --out")


def load_weights(model: DiffusionGemmaForBlockDiffusion, directory: Path, preset: str) -> None:
    """Copy the init's weights into ``model`` (built from ``preset``), refusing any other architecture."""
    trained = DiffusionGemmaForBlockDiffusion.from_pretrained(str(directory), dtype=torch.float32)
    theirs, ours = trained.state_dict(), model.state_dict()
    reshaped = {name for name in set(ours) & set(theirs) if ours[name].shape != theirs[name].shape}
    differ = sorted((set(ours) ^ set(theirs)) | reshaped)
    if differ:
        first = differ[0]
        shapes = (f"{tuple(theirs[first].shape) if first in theirs else 'absent'} there, "
                  f"{tuple(ours[first].shape) if first in ours else 'absent'} in preset {preset!r}")
        raise SystemExit(f"--init {directory}: its architecture is not preset {preset!r} ({len(differ)} weights "
                         f"differ; first {first}: {shapes}); give the --preset it was trained with")
    model.load_state_dict(theirs)


def record(directory: Path) -> dict[str, Any]:
    """The init's own training record, with where it was read from and a hash of the weights it held then."""
    file = directory / "TRAINING.json"
    earlier = json.loads(file.read_text()) if file.exists() else {}
    digest = hashlib.sha256()
    with (directory / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {**earlier, "path": str(directory.resolve()), "model_sha256": digest.hexdigest()}


def sampler(directory: Path) -> dict[str, Any] | None:
    """The init's sampler defaults, as ``export.generation_config`` takes them (None without a config)."""
    file = directory / "generation_config.json"
    if not file.exists():
        return None
    config = json.loads(file.read_text())
    values = {key: config[key] for key in DEFAULT_SAMPLER if key in config}
    bound = (config.get("sampler_config") or {}).get("entropy_bound")
    if bound is not None:
        values["entropy_bound"] = bound
    return values


def total_steps(earlier: dict[str, Any] | None) -> int:
    """Steps the init had been trained for, across its own chain (0 without one)."""
    if not earlier:
        return 0
    return int(earlier.get("total_steps", earlier.get("steps", 0)))


def totals(earlier: dict[str, Any], steps: int, seconds: float) -> dict[str, Any]:
    return {"initialized_from": earlier, "total_steps": steps + total_steps(earlier),
            "total_train_seconds": round(seconds + earlier.get("total_train_seconds",
                                                               earlier.get("train_seconds", 0.0)), 1)}
