"""Loading a checkpoint directory, and every way it can be wrong (each a one-line error naming the path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.checkpoint import CheckpointError, check_checkpoint_dir
from engine.loading import load_checkpoint, resolve_device, resolve_dtype


def copy_of(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def test_loads_model_tokenizer_and_dgls_keys(tiny_mask_model_dir) -> None:
    seen: list[float] = []
    loaded = load_checkpoint(tiny_mask_model_dir, device="cpu", on_progress=seen.append)
    assert type(loaded.model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.noise == "mask" and loaded.mask_token_id == 3 and loaded.template == "dgls-fim"
    assert loaded.canvas_length == 16
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 2  # progress in percent of weights


def test_explicit_dtype(tiny_model_dir) -> None:
    loaded = load_checkpoint(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("no_config", "has no config.json"),
        ("bad_json", "is not valid JSON"),
        ("wrong_type", "not 'diffusion_gemma'"),
        ("no_weights", "has no *.safetensors weights"),
        ("bin_weights", "convert them to safetensors"),
        ("no_tokenizer", "has no tokenizer files"),
        ("bad_noise", "dgls_noise must be"),
        ("mask_without_id", "needs an integer dgls_mask_token_id"),
    ],
)
def test_every_loading_error_names_the_path_and_the_problem(tiny_model_dir, tmp_path, breakage, message) -> None:
    path = copy_of(tiny_model_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    if breakage == "missing":
        path = tmp_path / "nowhere"
    elif breakage == "file":
        path = path / "config.json"
    elif breakage == "no_config":
        (path / "config.json").unlink()
    elif breakage == "bad_json":
        (path / "config.json").write_text("{oops")
    elif breakage == "wrong_type":
        (path / "config.json").write_text(json.dumps({**config, "model_type": "gemma3"}))
    elif breakage in ("no_weights", "bin_weights"):
        for weights in path.glob("*.safetensors"):
            weights.unlink()
        if breakage == "bin_weights":
            (path / "pytorch_model.bin").write_bytes(b"\0")
    elif breakage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink(missing_ok=True)
    elif breakage == "bad_noise":
        (path / "config.json").write_text(json.dumps({**config, "dgls_noise": "gaussian"}))
    elif breakage == "mask_without_id":
        (path / "config.json").write_text(json.dumps({**config, "dgls_noise": "mask"}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, device="cpu")
    assert message in str(error.value)
    assert str(path.name) in str(error.value) or breakage == "file"


def test_corrupt_weights_are_a_checkpoint_error(tiny_model_dir, tmp_path) -> None:
    path = copy_of(tiny_model_dir, tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not load the checkpoint"):
        load_checkpoint(path, device="cpu")


def test_device_and_dtype_choices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_check_does_not_need_torch_weights(tiny_model_dir) -> None:
    assert check_checkpoint_dir(tiny_model_dir)["model_type"] == "diffusion_gemma"
