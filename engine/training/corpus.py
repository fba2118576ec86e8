"""The training corpus: permissively licensed source files found on this machine.

Owns where source comes from (the Python standard library, installed distributions whose license
metadata is permissive, and JavaScript packages under node's global ``node_modules``), their
de-duplication, the HumanEval exclusion, and the fixed train/held-out split. It knows nothing about
tokens or FIM spans.

The split is deterministic: whole held-out packages (``HELDOUT_PACKAGES``) plus every standard-library
file whose relative path hashes into the held-out bucket. De-duplication runs before the split and a
content hash that occurs in any held-out file never reaches the training split.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HELDOUT_PACKAGES = frozenset({"click", "flask", "idna"})
STDLIB_HELDOUT_BUCKETS = 50  # 1 in 50 stdlib files (by path hash) is held out
MAX_FILE_BYTES = 200_000
MAX_PACKAGE_BYTES = 6_000_000  # keep the big frameworks from dominating
HUMANEVAL_MARKERS = ("humaneval", "human_eval", "human-eval")
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|ISC|Unlicense|0BSD|Zlib)\b", re.I)
COPYLEFT = re.compile(r"\b(GPL|LGPL|AGPL|MPL|Mozilla|EUPL|CC-BY-SA)\b", re.I)
NODE_MODULES = Path("/usr/lib/node_modules")


@dataclass(slots=True)
class SourceFile:
    """One source file of the corpus, with where it came from and under which license."""

    path: str  # display path, "<package>/<relative path>"
    package: str
    license: str
    language: str
    text: str

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


def content_hash(text: str) -> str:
    """Hash of the normalized content: trailing whitespace stripped, blank lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    normalized = "\n".join(line for line in lines if line)
    return hashlib.sha1(normalized.encode("utf-8")).hexdigest()


def mentions_humaneval(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in HUMANEVAL_MARKERS)


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES or path.stat().st_size < 64:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _stdlib_files() -> Iterator[SourceFile]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        if text := _read(path):
            yield SourceFile(f"stdlib/{rel}", "stdlib", "PSF-2.0", "python", text)


def distribution_license(dist: metadata.Distribution) -> str | None:
    """The permissive license a distribution declares, or None when it is not clearly permissive."""
    meta: Any = dist.metadata
    candidates = [meta.get("License-Expression") or ""]
    candidates += [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    candidates.append((meta.get("License") or "").splitlines()[0][:100] if meta.get("License") else "")
    declared = "; ".join(c for c in candidates if c)
    if not declared or COPYLEFT.search(declared) or not PERMISSIVE.search(declared):
        return None
    return declared


def _distribution_name(dist: metadata.Distribution) -> str:
    meta: Any = dist.metadata
    return str(meta.get("Name") or "").lower()


def _site_package_files() -> Iterator[SourceFile]:
    seen: set[str] = set()
    for dist in sorted(metadata.distributions(), key=_distribution_name):
        name = _distribution_name(dist)
        if not name or name in seen or name in ("dgls",):
            continue
        seen.add(name)
        license_name = distribution_license(dist)
        if license_name is None:
            continue
        total = 0
        for entry in sorted(dist.files or [], key=str):
            if not str(entry).endswith(".py") or "__pycache__" in str(entry):
                continue
            text = _read(Path(str(dist.locate_file(entry))))
            if text is None:
                continue
            total += len(text)
            if total > MAX_PACKAGE_BYTES:
                break
            yield SourceFile(f"{name}/{entry}", name, license_name, "python", text)


def _node_files() -> Iterator[SourceFile]:
    for manifest in sorted(NODE_MODULES.rglob("package.json")):
        if "test" in manifest.parts:
            continue
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        license_name = info.get("license") if isinstance(info.get("license"), str) else None
        if not license_name or COPYLEFT.search(license_name) or not PERMISSIVE.search(license_name):
            continue
        package = str(info.get("name", manifest.parent.name))
        for path in sorted(manifest.parent.glob("**/*.js")):
            if "node_modules" in path.relative_to(manifest.parent).parts[:-1] or ".min." in path.name:
                continue
            if text := _read(path):
                yield SourceFile(f"npm/{package}/{path.relative_to(manifest.parent)}", package,
                                 license_name, "javascript", text)


def is_heldout(source: SourceFile) -> bool:
    """The fixed split: whole held-out packages plus a path-hash bucket of the standard library."""
    if source.package in HELDOUT_PACKAGES:
        return True
    if source.package == "stdlib":
        return int(hashlib.sha1(source.path.encode()).hexdigest(), 16) % STDLIB_HELDOUT_BUCKETS == 0
    return False


def collect() -> tuple[list[SourceFile], list[SourceFile]]:
    """Walk every source, de-duplicate, drop HumanEval mentions; return (train, heldout)."""
    by_hash: dict[str, SourceFile] = {}
    heldout_hashes: set[str] = set()
    for iterator in (_stdlib_files(), _site_package_files(), _node_files()):
        for source in iterator:
            if mentions_humaneval(source.text):
                continue
            digest = source.content_hash
            if is_heldout(source):
                heldout_hashes.add(digest)
            by_hash.setdefault(digest, source)
    train = [s for h, s in by_hash.items() if h not in heldout_hashes]
    heldout = [s for h, s in by_hash.items() if h in heldout_hashes and is_heldout(s)]
    return train, heldout


def save(sources: list[SourceFile], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for source in sources:
            handle.write(json.dumps(asdict(source)) + "\n")


def load(path: Path) -> list[SourceFile]:
    with path.open(encoding="utf-8") as handle:
        return [SourceFile(**json.loads(line)) for line in handle]


def license_table(sources: list[SourceFile]) -> dict[str, dict[str, object]]:
    """Per package: its license and how many files and characters it contributes."""
    table: dict[str, dict[str, object]] = {}
    for source in sources:
        row = table.setdefault(source.package, {"license": source.license, "language": source.language,
                                                "files": 0, "chars": 0})
        row["files"] = int(row["files"]) + 1  # type: ignore[call-overload]
        row["chars"] = int(row["chars"]) + len(source.text)  # type: ignore[call-overload]
    return dict(sorted(table.items()))


def main() -> None:
    """`python -m engine.training.corpus [OUT_DIR]`: collect and cache the corpus as JSONL."""
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/corpus")
    train, heldout = collect()
    save(train, out / "train.jsonl")
    save(heldout, out / "heldout.jsonl")
    (out / "sources.json").write_text(json.dumps({"train": license_table(train),
                                                  "heldout": license_table(heldout)}, indent=1))
    print(json.dumps({"train_files": len(train), "heldout_files": len(heldout),
                      "train_chars": sum(len(s.text) for s in train),
                      "heldout_chars": sum(len(s.text) for s in heldout)}))


if __name__ == "__main__":
    main()
