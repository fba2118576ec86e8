"""Shared fixtures for the training tests: a small tokenizer trained in-process on synthetic code."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from engine.training.tokenizer import train_tokenizer

SAMPLE_CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "import os\nimport sys\n\n\ndef main() -> None:\n    print(os.getcwd(), sys.argv)\n",
    "const x = [1, 2, 3].map((v) => v * 2);\nconsole.log(x);\n",
    "def greet(name: str) -> str:\n    \"\"\"Say hello.\"\"\"\n    return f\"héllo, {name} 😀\"\n",
] * 20


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(SAMPLE_CODE, vocab_size=400)
