"""The shipped model directory: Hugging Face layout plus corpus provenance, written atomically.

Owns what ``engine/default_model/`` contains (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``SOURCES.md``, ``SOURCES.json``,
``TRAINING.json``) and the write-to-temp-then-rename that keeps it from ever being half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from engine.training.examples import CANVAS_LENGTH
from engine.training.tokenizer import BOS_ID, EOS_ID, PAD_ID

DEFAULT_SAMPLER: dict[str, Any] = dict(
    max_denoising_steps=12, t_min=0.1, t_max=0.5, entropy_bound=1.5,
    stability_threshold=2, confidence_threshold=0.05,
)


def generation_config(sampler: dict[str, Any] | None = None) -> DiffusionGemmaGenerationConfig:
    """The sampler defaults shipped with the model (tuned on held-out tasks; see engine/training/README.md)."""
    values = {**DEFAULT_SAMPLER, **(sampler or {})}
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=CANVAS_LENGTH,
        max_denoising_steps=int(values["max_denoising_steps"]),
        t_min=float(values["t_min"]), t_max=float(values["t_max"]),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(values["entropy_bound"])),
        stability_threshold=int(values["stability_threshold"]),
        confidence_threshold=float(values["confidence_threshold"]),
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
    )


def sources_markdown(sources: dict[str, dict[str, Any]]) -> str:
    lines = ["# Training corpus sources", "",
             "Permissively licensed source files found on the build machine (see engine/training/corpus.py).",
             "Held-out packages/files were never trained on; files mentioning HumanEval were excluded.", ""]
    for split, table in sources.items():
        lines += [f"## {split}", "", "| package | language | license | files | chars |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {row['language']} | {row['license']} | {row['files']} | {row['chars']} |"
                  for name, row in table.items()]
        lines.append("")
    return "\n".join(lines)


def write(model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerBase, target: Path,
          sources: dict[str, dict[str, Any]] | None = None, training: dict[str, Any] | None = None,
          sampler: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write the HF layout to ``target`` atomically (temp dir, then rename over the old one)."""
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.generation_config = generation_config(sampler)
    original_dtype = next(model.parameters()).dtype
    movable: Any = model  # PreTrainedModel.to is typed through a wrapper mypy cannot see through
    movable.to(dtype).save_pretrained(str(staging), safe_serialization=True)
    movable.to(original_dtype)
    tokenizer.save_pretrained(str(staging))
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (staging / extra).unlink(missing_ok=True)
    if sources is not None:
        (staging / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
        (staging / "SOURCES.md").write_text(sources_markdown(sources))
    if training is not None:
        (staging / "TRAINING.json").write_text(json.dumps(training, indent=1) + "\n")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    """`python -m engine.training.export RUN_DIR TARGET`: export RUN_DIR/checkpoint.pt as an HF layout."""
    import sys

    from transformers import AutoTokenizer

    from engine.training import model_config

    run, target = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    preset = state.get("preset", "small")
    model = model_config.build_model(model_config.build_config(preset, vocab_size=len(tokenizer)))
    model.load_state_dict(state["model"])
    sampler_file = run / "sampler.json"
    sampler = json.loads(sampler_file.read_text()) if sampler_file.exists() else None
    finished = run / "model"  # the run's own export, when it got that far: its corpus record and full history
    sources = json.loads((finished / "SOURCES.json").read_text()) if (finished / "SOURCES.json").exists() else None
    record = json.loads((finished / "TRAINING.json").read_text()) if (finished / "TRAINING.json").exists() else {}
    training: dict[str, Any] = {"steps": state["step"], "train_seconds": state["elapsed_s"]}
    if record.get("steps") == state["step"]:
        training = record
    elif state.get("initialized_from"):  # a continued run: keep where it came from
        from engine.training import continuation

        training.update(continuation.totals(state["initialized_from"], state["step"], state["elapsed_s"]))
    write(model, tokenizer, target, sources=sources, training=training, sampler=sampler)


if __name__ == "__main__":
    main()
