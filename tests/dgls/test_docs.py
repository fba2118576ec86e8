"""The README documents every language-server option, one table row each."""

from __future__ import annotations

from pathlib import Path

from dgls.options import describe_options

ROOT = Path(__file__).resolve().parents[2]


def test_every_option_has_a_row() -> None:
    texts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    keys = [row[0] for row in describe_options()]
    assert any(all(f"| `{key}` |" in text for key in keys) for text in texts), "an option is missing from the docs"
