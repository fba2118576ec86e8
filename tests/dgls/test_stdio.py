"""`dgls lsp` on stdio: an asyncio pipe reader where stdin is a pipe (every other LSP test), pygls' own reader
where it is a regular file; both answer the same messages and exit as LSP says (1 without a `shutdown`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def replies(output: bytes) -> list[dict]:
    messages = []
    while output:
        header, _, rest = output.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", header).group(1))  # type: ignore[union-attr]
        messages.append(json.loads(rest[:length]))
        output = rest[length:]
    return messages


# All at once, as a file can only give them: the command may still run when `exit` arrives (its answer is then
# dropped, quietly), and an `exit` without a `shutdown` ends with status 1.
SESSION = b"".join(frame(m) for m in (
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None}},
    {"jsonrpc": "2.0", "method": "initialized", "params": {}},
    {"jsonrpc": "2.0", "id": 2, "method": "workspace/executeCommand", "params": {"command": "dgls.status"}},
    {"jsonrpc": "2.0", "method": "exit"},
))


def stop_engines_on(socket: Path) -> None:
    """SIGTERM every engine process serving `socket` (found by its command line: one that has not opened its
    socket yet cannot be asked to shut down) and wait for them to exit."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(socket).encode() in argv:
            pids.append(int(entry.name))
            os.kill(pids[-1], signal.SIGTERM)
    for pid in pids:
        for _ in range(200):
            try:  # gone, or exited and not yet reaped (a zombie)
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                    break
            except OSError:
                break
            time.sleep(0.05)


def test_stdin_from_a_pipe_and_from_a_file_serve_alike(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "dgls", "lsp", "--socket", str(tmp_path / "engine.sock")]
    try:
        piped = subprocess.run(command, input=SESSION, capture_output=True, timeout=60)
        session_file = tmp_path / "session.bin"
        session_file.write_bytes(SESSION)
        with session_file.open("rb") as stdin:
            from_file = subprocess.run(command, stdin=stdin, capture_output=True, timeout=60)
    finally:  # the servers started a resident engine, which outlives them by design (and may still be importing)
        stop_engines_on(tmp_path / "engine.sock")
    for run in (piped, from_file):
        assert run.returncode == 1 and b"Traceback" not in run.stderr, run.stderr.decode()
        answers = {m["id"]: m for m in replies(run.stdout) if "id" in m}
        assert answers[1]["result"]["capabilities"]["inlineCompletionProvider"] is not None
        assert 2 not in answers or answers[2]["result"]["state"] in ("starting", "ready", "stopped")


def test_stdin_from_dev_null_ends_the_session_at_once(tmp_path: Path) -> None:
    """/dev/null is a character device epoll cannot watch: pygls' own reader serves it and sees the end."""
    command = [sys.executable, "-m", "dgls", "lsp", "--socket", str(tmp_path / "engine.sock")]
    with open("/dev/null", "rb") as stdin:
        run = subprocess.run(command, stdin=stdin, capture_output=True, timeout=60)
    assert run.returncode == 1 and b"Traceback" not in run.stderr  # no `shutdown` came
