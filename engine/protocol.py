"""The engine's wire protocol: versioned, length-prefixed JSON over a local (Unix) socket.

Each frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. A request is
`{"v": 1, "id": N, "type": "fill"|"cancel"|"status"|"shutdown", ...}`; the reply carries the same id and
either `{"ok": true, "result": {...}}` or `{"ok": false, "error": {"code": ..., "message": ...}}`.
No torch here: the language server and the CLI import this module.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024
HEADER = struct.Struct(">I")
MESSAGE_TYPES = ("fill", "cancel", "status", "shutdown")


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; `code` is what the error reply carries."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Error codes a client can see, one line each (the README lists them).
ERROR_CODES = {
    "bad_json": "the frame was not valid UTF-8 JSON",
    "bad_message": "the message is not an object with a known 'type' and an integer 'id'",
    "bad_version": "the client speaks another protocol version",
    "too_large": f"the frame is larger than {MAX_FRAME_BYTES} bytes",
    "bad_request": "the fill request has a missing or invalid field",
    "superseded": "a newer request for the same document replaced this one",
    "cancelled": "the request was cancelled",
    "out_of_memory": "the device ran out of memory for this request; the engine keeps serving",
    "not_ready": "the model is still loading",
    "internal": "the request failed inside the engine; the engine keeps serving",
    "shutting_down": "the engine is stopping",
}


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts frames out of a byte stream as its pieces arrive (both ends of a connection use one)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The bodies of the frames that `data` completes, in order; raises ProtocolError (`too_large`) at a frame
        longer than MAX_FRAME_BYTES, after the ones before it (the stream cannot be resynchronised)."""
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self.buffer)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError("too_large", f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            end = HEADER.size + length
            if len(self.buffer) < end:
                return
            body = bytes(self.buffer[HEADER.size : end])
            del self.buffer[:end]
            yield body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse and check one frame body; raises ProtocolError with the code to reply with."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad_json", f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    if message.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"protocol version {message.get('v')!r} is not supported; this engine speaks 1"
        )
    if message.get("type") not in MESSAGE_TYPES:
        raise ProtocolError("bad_message", f"unknown message type {message.get('type')!r}; use {MESSAGE_TYPES}")
    if not isinstance(message.get("id"), int):
        raise ProtocolError("bad_message", "message needs an integer 'id'")
    return message


def ok_reply(message_id: int | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": message_id, "ok": True, "result": result}


def error_reply(message_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": message_id, "ok": False, "error": {"code": code, "message": message}}


def default_socket_path() -> Path:
    """`$XDG_RUNTIME_DIR/dgls/engine.sock`, else `/tmp/dgls-$UID/engine.sock`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "dgls" if runtime else Path(tempfile.gettempdir()) / f"dgls-{os.getuid()}"
    return base / "engine.sock"


def prepare_socket_dir(socket_path: Path) -> None:
    """Create the socket's directory with mode 0700 (only this user may connect)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(socket_path.parent, 0o700)
