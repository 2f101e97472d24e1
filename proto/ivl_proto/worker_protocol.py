"""The wire between a sandboxed worker process and its pool: framed messages over two pipes.

Every message is a JSON header (a dict, at most MAX_HEADER_BYTES) optionally followed by one raw
payload frame, whose length the header announces as "payload_bytes". JSON, never pickle: a worker
handles untrusted input, so nothing it sends back may run code in the parent. Frames are those of
multiprocessing.connection.Connection (a length prefix, then the bytes), which reads a payload
straight into a caller's buffer (`recv_bytes_into`), so pixels cross the pipe with no extra copy.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection
from typing import Any

MAX_HEADER_BYTES = 1 << 20
PAYLOAD_KEY = "payload_bytes"


class ProtocolError(RuntimeError):
    """The other side sent something that is not a message of this protocol."""


def send_message(conn: Connection, header: dict[str, Any], payload: bytes | memoryview | None = None) -> None:
    framed = dict(header)
    framed[PAYLOAD_KEY] = -1 if payload is None else memoryview(payload).nbytes
    conn.send_bytes(json.dumps(framed, separators=(",", ":")).encode())
    if payload is not None:
        conn.send_bytes(payload)


def recv_header(conn: Connection) -> dict[str, Any]:
    raw = conn.recv_bytes(MAX_HEADER_BYTES)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ProtocolError(f"a message header is not JSON ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get(PAYLOAD_KEY), int):
        raise ProtocolError("a message header is not an object with payload_bytes")
    return header


def payload_size(header: dict[str, Any]) -> int | None:
    """The announced payload length, or None when the message has no payload."""
    size = int(header[PAYLOAD_KEY])
    return None if size < 0 else size
