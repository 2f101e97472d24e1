"""The wire between a sandboxed worker process and its pool: framed messages over two pipes.

Every message is a JSON header (a dict, at most MAX_HEADER_BYTES) optionally followed by one raw
payload frame, whose length the header announces as "payload_bytes". JSON, never pickle: a worker
handles untrusted input, so nothing it sends back may run code in the parent. A frame is an 8-byte
little-endian length and the bytes. Payloads are written from, and read straight into, the caller's
buffer (os.write / os.readv on a memoryview): 20 MB of pixels cross with no copy in Python, and a
payload longer than the buffer its reader expects is refused before it is read.
"""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any

MAX_HEADER_BYTES = 1 << 20
PAYLOAD_KEY = "payload_bytes"
_LENGTH = struct.Struct("<Q")


class ProtocolError(RuntimeError):
    """The other side sent something that is not a message of this protocol."""


class PipeEnd:
    """One end of a pipe (read or write), by file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def poll(self, timeout: float | None) -> bool:
        """True when there is something to read (or the other end has closed)."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        return bool(readable)

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < view.nbytes:
            sent += os.write(self.fd, view[sent:])

    def read_into(self, view: memoryview) -> None:
        """Fill `view` completely; EOFError when the other end closes first."""
        got = 0
        while got < view.nbytes:
            count = os.readv(self.fd, [view[got:]])
            if count == 0:
                raise EOFError("the other end of the pipe closed")
            got += count

    def send_frame(self, data: bytes | memoryview) -> None:
        self.write_all(_LENGTH.pack(memoryview(data).nbytes))
        self.write_all(data)

    def frame_length(self) -> int:
        header = bytearray(_LENGTH.size)
        self.read_into(memoryview(header))
        return int(_LENGTH.unpack(header)[0])

    def recv_frame(self, max_bytes: int) -> bytes:
        length = self.frame_length()
        if length > max_bytes:
            raise ProtocolError(f"a frame of {length} bytes is over the limit of {max_bytes}")
        data = bytearray(length)
        self.read_into(memoryview(data))
        return bytes(data)

    def recv_frame_into(self, buffer: memoryview) -> None:
        """Read the next frame into `buffer`, which must be exactly its length."""
        length = self.frame_length()
        if length != buffer.nbytes:
            raise ProtocolError(f"a frame of {length} bytes where {buffer.nbytes} were expected")
        self.read_into(buffer.cast("B"))


def send_message(end: PipeEnd, header: dict[str, Any], payload: bytes | memoryview | None = None) -> None:
    framed = dict(header)
    framed[PAYLOAD_KEY] = -1 if payload is None else memoryview(payload).nbytes
    end.send_frame(json.dumps(framed, separators=(",", ":")).encode())
    if payload is not None:
        end.send_frame(payload)


def recv_header(end: PipeEnd) -> dict[str, Any]:
    raw = end.recv_frame(MAX_HEADER_BYTES)
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
