"""A private engine for a benchmark run: started like `dgls complete` starts one, stopped at the end.

Benchmarks talk to the engine through the same socket client and request path as the CLI, on a socket in a
temporary directory, so they never disturb (or reuse) the user's own engine.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.client import EngineClient, EngineError, ensure_engine


@contextlib.contextmanager
def private_engine(model: Path | None, device: str = "auto", extra: list[str] | None = None) -> Iterator[
        tuple[EngineClient, dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="dgls-bench-") as folder:
        socket_path = Path(folder) / "engine.sock"
        serve_args = ["--device", device, *(extra or [])]
        if model is not None:
            serve_args += ["--model", str(model.resolve())]
        print(f"starting engine ({model or 'default model'}) ...", file=sys.stderr)
        status = ensure_engine(socket_path, serve_args)
        client = EngineClient(socket_path, timeout=600)
        try:
            yield client, status
        finally:
            with contextlib.suppress(EngineError):
                client.shutdown()
            client.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 2)
