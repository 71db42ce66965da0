"""IdleReaper: one thread that unloads idle models when their deadline passes."""

from __future__ import annotations

import logging
import threading
import time

from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.manager import WorkerManager

log = logging.getLogger(__name__)


class IdleReaper:
    """Sleeps until the earliest ``expires_at`` and unloads what is due.

    It never polls on a fixed period: the manager calls ``wake`` whenever a deadline
    changes, and the thread recomputes its sleep. The wake flag is cleared *before*
    the deadlines are read, so a change that lands while it computes is never lost.
    """

    def __init__(self, manager: WorkerManager) -> None:
        self.manager = manager
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx-idle-reaper", daemon=True)
        manager.add_listener(self.wake)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self.manager.reap_expired()
                deadline = self.manager.next_expiry()
            except Exception:
                log.exception("idle reaper pass failed")
                deadline = time.time() + 1.0
            if self._stopping:
                break
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            assert_no_locks_held("reaper sleep")
            self._wake.wait(timeout)
