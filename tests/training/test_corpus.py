"""The corpus split: held-out sources (and their duplicates) never reach training; HumanEval is excluded."""

from __future__ import annotations

import pytest

from engine.training import corpus


def _source(path: str, package: str, text: str) -> corpus.SourceFile:
    return corpus.SourceFile(path, package, "MIT", "python", text)


@pytest.fixture
def fake_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    heldout_text = "def held():\n    return 'out'\n"
    stdlib = [_source(f"stdlib/m{i}.py", "stdlib", f"X = {i}\n") for i in range(200)]
    packages = [
        _source("click/core.py", "click", heldout_text),
        _source("vendored/click_copy.py", "vendored", heldout_text + "\n\n"),  # a duplicate after normalizing
        _source("pkg/a.py", "pkg", "A = 1\n"),
        _source("pkg/b.py", "pkg", "A = 1   \n"),  # duplicate of a.py
        _source("pkg/he.py", "pkg", "# adapted from HumanEval/12\nx = 1\n"),
    ]
    monkeypatch.setattr(corpus, "_stdlib_files", lambda: iter(stdlib))
    monkeypatch.setattr(corpus, "_site_package_files", lambda: iter(packages))
    monkeypatch.setattr(corpus, "_node_files", lambda: iter([]))


@pytest.mark.usefixtures("fake_sources")
def test_heldout_sources_never_in_training_split() -> None:
    train, heldout = corpus.collect()
    train_hashes = {s.content_hash for s in train}
    assert {s.package for s in heldout} >= {"click", "stdlib"}
    assert not train_hashes & {s.content_hash for s in heldout}
    assert all(not corpus.is_heldout(s) for s in train)
    assert "vendored" not in {s.package for s in train}


@pytest.mark.usefixtures("fake_sources")
def test_duplicates_and_humaneval_are_dropped() -> None:
    train, heldout = corpus.collect()
    paths = {s.path for s in train + heldout}
    assert "pkg/he.py" not in paths
    assert len([p for p in paths if p.startswith("pkg/")]) == 1


def test_stdlib_split_is_deterministic() -> None:
    files = [_source(f"stdlib/m{i}.py", "stdlib", "") for i in range(1000)]
    first = [corpus.is_heldout(f) for f in files]
    assert first == [corpus.is_heldout(f) for f in files]
    assert 5 <= sum(first) <= 60


def test_license_filter() -> None:
    assert corpus.COPYLEFT.search("GPL-3.0") and not corpus.PERMISSIVE.search("Proprietary")
    assert corpus.PERMISSIVE.search("BSD-3-Clause") and corpus.PERMISSIVE.search("Apache-2.0")
