"""IPC framing between the manager and its workers: length-prefixed JSON messages."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

# Parent -> worker operations. Every message but ``shutdown`` carries a request id.
OP_LOAD = "load"
OP_GENERATE = "generate"
OP_CANCEL = "cancel"
OP_PING = "ping"
OP_SHUTDOWN = "shutdown"

# Worker -> parent frame types.
T_HELLO = "hello"  # interpreter up, mlx imported
T_LOADED = "loaded"  # model ready: memory_bytes, context_length, load_s
T_STARTED = "started"  # the worker took the request off its queue
T_TOKEN = "token"  # one chunk of text
T_DONE = "done"  # request finished: finish_reason, usage, timings
T_ERROR = "error"  # request failed: code, message
T_PONG = "pong"

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other end closed its pipe (the process exited or dropped the channel)."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def write_frame(fd: int, message: dict[str, Any]) -> None:
    """Write one whole frame; a closed pipe raises BrokenPipeError."""
    data = memoryview(encode(message))
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise ChannelClosed
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any]:
    """Read one frame; raises ChannelClosed at end of stream."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME} byte limit")
    return json.loads(_read_exact(fd, size))
