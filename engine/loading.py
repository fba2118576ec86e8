"""Load a DiffusionGemma checkpoint directory (Hugging Face layout) for inference.

Owns: checking the directory before any weight is read (one clear `CheckpointError` naming the path and what
is wrong), choosing device and dtype, reporting weight-loading progress, and reading the dgls-specific keys a
checkpoint may declare in its `config.json` (`dgls_noise`, `dgls_mask_token_id`, `dgls_template`).
Safetensors only; never `trust_remote_code`. Knows nothing about prompts or denoising.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import CheckpointError, check_checkpoint_dir, default_model_dir

log = logging.getLogger("dgls.engine")



@dataclass(slots=True)
class LoadedModel:
    model: Any  # DiffusionGemmaForBlockDiffusion
    tokenizer: Any  # PreTrainedTokenizerBase
    path: Path
    device: torch.device
    dtype: torch.dtype
    noise: str
    mask_token_id: int | None
    template: str | None
    canvas_length: int
    parameters: int
    quantize: str = "none"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise CheckpointError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise CheckpointError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_checkpoint(
    path: Path | str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    on_progress: Callable[[float], None] | None = None,
    quantize: str = "none",
    quantize_embeddings: bool = False,
    expert_dequant: str = "layer",
) -> LoadedModel:
    """Load model and tokenizer from `path` (the shipped default model when None).

    With `quantize` (int8, fp8, int4) the weights are quantized while loading, shard by shard (see
    `engine.quantize`), so host memory stays near one shard.
    """
    try:
        from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise CheckpointError(
            "this transformers has no DiffusionGemma; install transformers>=5.23 (pip install -U transformers)"
        ) from None

    model_dir = Path(path) if path is not None else default_model_dir()
    config = check_checkpoint_dir(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log.info("loading %s on %s as %s", model_dir, torch_device, str(torch_dtype).removeprefix("torch."))

    def report(fraction: float) -> None:
        log.info("loading weights: %d%%", round(100 * fraction))
        if on_progress is not None:
            on_progress(fraction)

    previous_hook = hf_logging.set_tqdm_hook(_progress_hook(report))
    quantized_parameters = 0
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        if quantize == "none":
            model: Any = DiffusionGemmaForBlockDiffusion.from_pretrained(
                model_dir,
                dtype=torch_dtype,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
            )
        else:
            from engine.quantize import QuantizationError, load_quantized, set_expert_dequantization

            try:
                model, quant_report = load_quantized(model_dir, quantize, torch_device, torch_dtype,
                                                     on_progress=report, include_embeddings=quantize_embeddings)
            except QuantizationError as exc:
                raise CheckpointError(f"{model_dir}: {exc}") from exc
            set_expert_dequantization(model, whole_layer=expert_dequant == "layer")
            quantized_parameters = quant_report.quantized_parameters
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one line with the path
        raise CheckpointError(f"could not load the checkpoint in {model_dir}: {type(exc).__name__}: {exc}") from exc
    finally:
        hf_logging.set_tqdm_hook(previous_hook)
    report(1.0)
    model.to(torch_device).eval()
    if torch_device.type == "cpu" and hasattr(model, "set_experts_implementation"):
        # Measured on the shipped model, 1 thread: 53 ms a denoising step with the eager per-expert loop
        # against 70-89 ms with grouped_mm, which pays off only on GPUs.
        model.set_experts_implementation("eager")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=model_dir,
        device=torch_device,
        dtype=torch_dtype,
        noise=config.get("dgls_noise", "uniform"),
        mask_token_id=config.get("dgls_mask_token_id"),
        template=config.get("dgls_template"),
        canvas_length=int(model.config.canvas_length),
        parameters=quantized_parameters + sum(p.numel() for p in model.parameters()),
        quantize=quantize,
    )


def _progress_hook(report: Callable[[float], None]) -> Callable[..., Any]:
    """A transformers tqdm hook that turns the "Loading weights" bar into fractions for `report`."""

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") != "Loading weights" or not args:
            return factory(*args, **kwargs)
        return _Progress(list(args[0]), report)

    return hook


class _Progress:
    """Iterates like the tqdm it replaces and reports every ~10% of the weights."""

    def __init__(self, items: list[Any], report: Callable[[float], None]) -> None:
        self.items = items
        self.report = report

    def __iter__(self) -> Iterator[Any]:
        total = max(len(self.items), 1)
        step = max(total // 10, 1)
        for index, item in enumerate(self.items):
            if index % step == 0:
                self.report(index / total)
            yield item

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
