"""Model state changes as events for Server-Sent Events clients (mlx/api/events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor
from typing import Any

from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.types import ModelStatus

log = logging.getLogger(__name__)


def diff(before: dict[str, ModelStatus], after: dict[str, ModelStatus]) -> list[dict[str, Any]]:
    """Events that take a client from ``before`` to ``after``: load, ready, unloading,
    busy, idle (with the new ``expires_at``) and unload, each with the model's status."""
    events: list[tuple[str, ModelStatus]] = []
    for model_id, new in after.items():
        old = before.get(model_id)
        old_state, old_busy = (old.state, old.active_requests > 0) if old else (None, False)
        if new.state != old_state:
            kind = {"starting": "load", "ready": "ready"}.get(new.state, "unloading")
            events.append((kind, new))
        if (new.active_requests > 0) != old_busy:
            events.append(("busy" if new.active_requests else "idle", new))
        elif old and new.state == "ready" and not new.active_requests and old.expires_at != new.expires_at:
            events.append(("idle", new))
    events += [("unload", old) for model_id, old in before.items() if model_id not in after]
    return [{"type": kind, "model": status.to_dict()} for kind, status in events]


class EventHub:
    """Fans model events out to SSE clients.

    The manager calls ``notify`` from engine threads (no lock held); the hub then takes
    a fresh status snapshot on a pool thread and diffs it on the event loop, so snapshots
    are applied in order and a burst of changes costs one snapshot.
    """

    def __init__(self, manager: WorkerManager, loop: asyncio.AbstractEventLoop, executor: Executor) -> None:
        self._manager = manager
        self._loop = loop
        self._executor = executor
        self._clients: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._last: dict[str, ModelStatus] = {}
        self._refreshing = False
        self._dirty = False
        self._closed = False
        self._task: asyncio.Future[None] | None = None
        manager.add_listener(self.notify)

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: the server is shutting down
            self._loop.call_soon_threadsafe(self._schedule)

    def snapshot(self) -> list[ModelStatus]:
        """The statuses of the last refresh (read on the loop, no engine lock)."""
        return list(self._last.values())

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._clients.discard(queue)

    def close(self) -> None:
        self._closed = True
        for queue in self._clients:
            queue.put_nowait(None)

    def _schedule(self) -> None:
        if self._closed:
            return
        if self._refreshing:
            self._dirty = True
            return
        self._refreshing = True
        self._task = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            while True:
                self._dirty = False
                statuses = await self._loop.run_in_executor(self._executor, self._manager.status)
                now = {s.id: s for s in statuses}
                events = diff(self._last, now)
                self._last = now
                for event in events:
                    event["server_time"] = time.time()
                    for queue in self._clients:
                        queue.put_nowait(event)
                if not self._dirty or self._closed:
                    return
        except Exception:
            log.exception("model event refresh failed")
        finally:
            self._refreshing = False
