"""The warm spare: one worker process started ahead of time, with mlx imported and no model yet."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlx_jupyter.engine.locks import RankedLock
from mlx_jupyter.engine.worker import WorkerProcess

log = logging.getLogger(__name__)

OnExit = Callable[[WorkerProcess], None]
# Starts a worker process for a model id and returns it once it said hello.
Spawn = Callable[[str, OnExit, float], WorkerProcess]

SPARE_ID = "(spare)"
# A spare must answer a ping this fast to be adopted; one that does not (stopped, hung)
# is killed and the load starts a fresh worker instead.
PING_TIMEOUT_S = 5.0


class WarmSpare:
    """Keeps one started worker for the next load to adopt, and starts the next one behind it.

    Thread-safety: ``spare_lock`` guards ``_spare``, ``_spawning`` and ``_closed``, and is
    held only to read or swap them. The spare is started on a thread of its own, so a
    load that finds no spare ready starts its own worker at once instead of queuing
    behind the refill. The spare is no model: not in status, not counted against any limit.
    """

    def __init__(self, spawn: Spawn, spawn_timeout: Callable[[], float]) -> None:
        self._spawn = spawn
        self._spawn_timeout = spawn_timeout
        self._lock = RankedLock("spare_lock")
        self._spare: WorkerProcess | None = None
        self._spawning = False
        self._closed = False
        # A long-lived thread: PR_SET_PDEATHSIG is tied to the thread that started the process.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="mlx-spare-spawner")

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._spare.pid if self._spare is not None else None

    def take(self, model_id: str, on_exit: OnExit) -> WorkerProcess | None:
        """The spare, adopted for ``model_id``, if one is ready and answers a ping; a new one starts behind it."""
        with self._lock:
            spare, self._spare = self._spare, None
        self.refill()
        if spare is None or spare.exited.is_set():
            return None
        if spare.ping(PING_TIMEOUT_S) is None:
            log.warning("the warm spare worker (pid %s) did not answer a ping; killing it", spare.pid)
            spare.kill("the warm spare worker did not answer")
            return None
        spare.adopt(model_id, on_exit)
        return spare

    def refill(self) -> None:
        """Start a new spare on the spare's thread, unless one exists or is on its way."""
        with self._lock:
            if self._closed or self._spare is not None or self._spawning:
                return
            self._spawning = True
        try:  # outside the lock: the first submit starts a thread and waits for it
            self._spawner.submit(self._start)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._spawning = False

    def shutdown(self) -> None:
        """Stop the spare and the thread that starts them."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.stop()
        self._spawner.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> None:
        spare: WorkerProcess | None = None
        try:
            spare = self._spawn(SPARE_ID, self._exited, self._spawn_timeout())
        except Exception:
            log.warning("starting a warm spare worker failed; loads start their own", exc_info=True)
        with self._lock:
            self._spawning = False
            keep = spare is not None and not self._closed and self._spare is None
            if keep:
                self._spare = spare
        if spare is not None and not keep:
            spare.stop()

    def _exited(self, worker: WorkerProcess) -> None:
        """A spare that dies is dropped; the next load starts a replacement."""
        with self._lock:
            if self._spare is worker:
                self._spare = None
