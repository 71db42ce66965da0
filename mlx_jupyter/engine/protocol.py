"""IPC framing between the manager and its workers: length-prefixed JSON messages."""

from __future__ import annotations

import json
import os
import re
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

# Rows a worker decodes together unless its load message says otherwise.
BATCH_SIZE = 32

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
# A bad frame's first bytes are kept to find the request it belongs to.
_SCAN = 4096
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([^"\\]{1,200})"')


class ChannelClosed(EOFError):
    """The other end closed its pipe (the process exited or dropped the channel)."""


class FrameTooLarge(ValueError):
    """A message whose encoding is over ``MAX_FRAME``; nothing was sent."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a message of {size} bytes is over the {MAX_FRAME} byte limit of a frame")
        self.size = size


class BadFrame(ValueError):
    """A whole frame was read but it is no message (over the limit, not JSON, not an object).

    ``request_id`` is the id found in its first bytes, if any, so the reader can answer it.
    """

    def __init__(self, reason: str, head: bytes) -> None:
        super().__init__(reason)
        found = _REQUEST_ID.search(head[:_SCAN])
        self.request_id = found.group(1).decode(errors="replace") if found else None


def encode(message: dict[str, Any]) -> bytes:
    """One frame; raises FrameTooLarge rather than make a frame the reader would refuse."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(len(body))
    return _HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """Write encoded frames whole; a closed pipe raises BrokenPipeError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_frame(fd: int, message: dict[str, Any]) -> None:
    write_all(fd, encode(message))


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise ChannelClosed
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _skip(fd: int, n: int) -> bytes:
    """Read and drop ``n`` bytes in chunks, keeping the first ones."""
    head = _read_exact(fd, min(n, _SCAN))
    n -= len(head)
    while n:
        n -= len(_read_exact(fd, min(n, 1 << 20)))
    return head


def read_frame(fd: int) -> dict[str, Any]:
    """Read one frame; raises ChannelClosed at end of stream, BadFrame for a frame that is no message.

    After a BadFrame the stream is still in step: the whole frame was consumed.
    """
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise BadFrame(f"a frame of {size} bytes is over the {MAX_FRAME} byte limit", _skip(fd, size))
    body = _read_exact(fd, size)
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(f"the frame is not JSON ({type(exc).__name__}: {exc})", body) from None
    if not isinstance(message, dict):
        raise BadFrame(f"the frame is JSON but not an object (a {type(message).__name__})", body)
    return message
