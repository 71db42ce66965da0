"""The worker's two pipes: the outbox that writes its frames, the reader thread that takes its commands."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from mlx_jupyter.engine import protocol as p

log = logging.getLogger("mlx_jupyter.worker")


class Outbox:
    """Frames to the parent, written by one thread so token frames and pongs never interleave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                p.write_frame(self._fd, message)
            except OSError:
                os._exit(0)  # the parent is gone
            except Exception:  # e.g. MemoryError at a load's bound: this frame is lost, the thread lives on
                log.exception("could not send a %r frame", message.get("type"))


class Commands:
    """The reader thread's side of a worker: cancels and pings act at once, loads and generates queue.

    ``inbox`` takes loads and generates to the main thread (``None`` asks it to stop).
    Threads: the reader adds a generate's id to ``live`` before queuing it, and records a
    cancel only for an id in ``live``; the main thread takes an id out of ``live``, then
    out of ``cancelled``, when its request ends (``end``). So ``cancelled`` holds only
    requests the worker has, plus the few that raced their own end, which ``drop_stale``
    clears on each loop turn.
    """

    def __init__(self, cmd_fd: int, out: Outbox) -> None:
        self.cmd_fd = cmd_fd
        self.out = out
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.live: set[str] = set()
        self.cancelled: set[str] = set()

    def read(self) -> None:
        """Reader thread: read and act on commands until the command pipe closes.

        A frame that is no request is answered with an error when its request id can be
        found, logged, and skipped: the other requests go on.
        """
        while True:
            try:
                msg = p.read_frame(self.cmd_fd)
            except (p.ChannelClosed, OSError):
                os._exit(0)  # the command pipe doubles as the death pipe
            except p.BadFrame as exc:
                log.warning("bad frame for request %s: %s", exc.request_id, exc)
                if exc.request_id is not None:
                    self.error(exc.request_id, "invalid_request", f"the worker could not read the request: {exc}")
                continue
            try:
                self.command(msg)
            except Exception as exc:
                log.exception("message %.200r failed", msg)
                if isinstance(rid := msg.get("request_id"), str):
                    self.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def command(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("request_id")
        if op == p.OP_PING:
            self.out.send({"type": p.T_PONG, "request_id": rid if isinstance(rid, str) else "", "seq": msg.get("seq")})
        elif op == p.OP_SHUTDOWN:
            self.inbox.put(None)
        elif not isinstance(rid, str):
            log.warning("message %.200r has no request id; dropped", msg)
        elif op == p.OP_CANCEL:
            if rid in self.live:  # a finished or unknown request has nothing to cancel
                self.cancelled.add(rid)
        elif op == p.OP_GENERATE:
            self.live.add(rid)
            self.inbox.put(msg)
        elif op == p.OP_LOAD:
            self.inbox.put(msg)
        else:
            self.error(rid, "invalid_request", f"unknown operation {op!r}")

    def end(self, rid: str) -> None:
        """Request ``rid`` has ended: forget it (its id out of ``live`` first, see the class docstring)."""
        self.live.discard(rid)
        self.cancelled.discard(rid)

    def error(self, rid: str, code: str, message: str, **details: Any) -> None:
        """End request ``rid`` with an error; ``details`` are the error's data (``param``, ``limit``, ``value``)."""
        self.end(rid)
        self.out.send({"type": p.T_ERROR, "request_id": rid, "code": code, "message": message, **details})

    def drop_stale(self) -> None:
        """Forget cancels that raced their request's end."""
        self.cancelled.intersection_update(self.live)
