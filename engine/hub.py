"""`dgls model pull`: download a DiffusionGemma checkpoint into the standard Hugging Face cache.

Only the files a checkpoint needs (configs, safetensors, tokenizer) are fetched; the result is checked like
any `--model` directory and its path returned. `endpoint` (or the HF_ENDPOINT variable) points at a mirror.
No torch here.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import CheckpointError, check_checkpoint_dir

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def pull_checkpoint(
    repo_id: str, revision: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise CheckpointError(
            f"{repo_id!r} is not a repository id; use OWNER/NAME, e.g. google/diffusiongemma-26B-A4B-it"
        )
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint, allow_patterns=CHECKPOINT_PATTERNS
        )
    except RepositoryNotFoundError:
        raise CheckpointError(f"repository {repo_id} was not found (or needs `hf auth login` for access)") from None
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"could not reach the hub to download {repo_id}: {exc}") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"download of {repo_id} failed: {exc}") from None
    check_checkpoint_dir(Path(path))
    return Path(path)
