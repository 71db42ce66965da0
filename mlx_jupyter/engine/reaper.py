"""IdleReaper: one thread that unloads idle models when their deadline passes."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from mlx_jupyter.engine.locks import assert_no_locks_held

if TYPE_CHECKING:
    from mlx_jupyter.engine.manager import WorkerManager

log = logging.getLogger(__name__)

# The longest sleep: a deadline further away is looked at again then (Event.wait overflows
# on huge timeouts, and an hourly look costs nothing).
MAX_SLEEP_S = 3600.0
# After a pass that failed, the next one comes this much later.
RETRY_S = 1.0


class IdleReaper:
    """Sleeps until the earliest idle deadline and unloads what is due; the manager starts and stops it.

    It never polls on a fixed period: the manager calls ``wake`` whenever a deadline
    changes, and the thread recomputes its sleep. The wake flag is cleared *before*
    the deadlines are read, so a change that lands while it computes is never lost.
    A pass that fails is logged and retried; if the thread dies all the same, the
    manager's health turns ``degraded`` and says so.
    """

    def __init__(self, manager: WorkerManager) -> None:
        self.manager = manager
        self._wake = threading.Event()
        self._stopping = False
        self._died: str | None = None
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

    def health(self) -> str | None:
        """Why idle models are no longer unloaded, or None."""
        if self._died is not None:
            return f"the idle reaper died ({self._died}); idle models are no longer unloaded"
        return None

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    self.manager.reap_expired()
                    deadline = self.manager.next_expiry()
                    timeout = MAX_SLEEP_S if deadline is None else deadline - self.manager.clock()
                except Exception:
                    log.exception("idle reaper pass failed; retrying in %gs", RETRY_S)
                    timeout = RETRY_S
                if self._stopping:
                    break
                assert_no_locks_held("reaper sleep")
                self._wake.wait(min(max(0.0, timeout), MAX_SLEEP_S))
        except BaseException as exc:
            self._died = f"{type(exc).__name__}: {exc}"
            log.critical("the idle reaper thread died: %s", self._died, exc_info=True)
            raise
