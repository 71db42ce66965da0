"""Janitor: a thread that runs the clean-ups finalizers hand it, so no finalizer takes an engine lock."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from mlx_jupyter.engine.locks import assert_no_locks_held

log = logging.getLogger(__name__)


class Janitor:
    """Runs callables in order on one thread of its own.

    A finalizer (``__del__``, a generator closed by the garbage collector) runs in
    whatever thread triggered the collection, possibly one that holds the engine's locks,
    so it must never take one itself: it calls ``put`` (a ``SimpleQueue.put``, safe there)
    and this thread, which holds nothing, does the work.
    """

    def __init__(self, name: str = "mlx-janitor") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end the thread."""
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            assert_no_locks_held("janitor")
            try:
                work()
            except Exception:
                log.exception("clean-up of an abandoned stream failed")
