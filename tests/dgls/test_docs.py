"""The README documents every option (the lead merges docs_lsp.md into README.md)."""

from __future__ import annotations

from pathlib import Path

from dgls.options import describe_options

ROOT = Path(__file__).resolve().parents[2]


def test_every_option_has_a_row() -> None:
    texts = [path.read_text(encoding="utf-8") for path in (ROOT / "README.md", ROOT / "docs_lsp.md") if path.is_file()]
    keys = [row[0] for row in describe_options()]
    assert any(all(f"| `{key}` |" in text for key in keys) for text in texts), "an option is missing from the docs"
