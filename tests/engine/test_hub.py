"""`dgls model pull` against a Hub-shaped server on loopback that serves a local checkpoint directory.

No hub is reachable here, so the test stands one up: the few endpoints `huggingface_hub.snapshot_download`
calls (repo info, file tree, resolve), answering from a tiny checkpoint built in the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", head: bool = False, **headers: str) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            path = self.path.split("?")[0]
            if not path.startswith(("/api/models/dgls/tiny", "/dgls/tiny/")):
                return self._send(404, b'{"error": "Repository not found"}', head, X_Error_Code="RepoNotFound")
            if "/tree/" in path:
                entries = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in root.iterdir()]
                return self._send(200, json.dumps(entries).encode(), head, Content_Type="application/json")
            if path.startswith("/api/models/"):
                info = {"id": "dgls/tiny", "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in root.iterdir()]}
                return self._send(200, json.dumps(info).encode(), head, Content_Type="application/json")
            file = root / path.split(f"/resolve/{COMMIT}/", 1)[-1]
            if not file.is_file():
                return self._send(404, b"", head, X_Error_Code="EntryNotFound")
            data = file.read_bytes()
            return self._send(200, data, head, ETag=f'"{hashlib.sha256(data).hexdigest()}"', X_Repo_Commit=COMMIT)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

    return Hub


@pytest.fixture()
def fake_hub(tiny_model_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(tiny_model_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pull(endpoint: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "dgls", "model", "pull", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_pull_downloads_into_the_hub_cache_and_prints_a_loadable_path(fake_hub, tmp_path) -> None:
    result = pull(fake_hub, tmp_path, "dgls/tiny", "--revision", "main")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_dir() and str(path).startswith(str(tmp_path / "hub"))
    assert f"snapshots/{COMMIT}" in str(path)
    from engine.loading import load_checkpoint

    assert load_checkpoint(path, device="cpu").canvas_length == 16


def test_pull_of_an_unknown_repository_is_one_line(fake_hub, tmp_path) -> None:
    result = pull(fake_hub, tmp_path, "nobody/nothing")
    assert result.returncode == 1
    assert "nobody/nothing" in result.stderr and "Traceback" not in result.stderr


def test_pull_rejects_a_malformed_repo_id(tmp_path) -> None:
    result = pull("http://127.0.0.1:9", tmp_path, "not-a-repo-id")
    assert result.returncode == 1 and "OWNER/NAME" in result.stderr
