"""Shared fixtures: tiny real checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-uniform"))


@pytest.fixture(scope="session")
def tiny_mask_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-mask"), noise="mask")


@pytest.fixture(scope="session")
def tiny_sliding_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sliding window (16) shorter than the test prompts, to prove cache reuse stays exact past the window."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-sliding"), sliding_window=16)
