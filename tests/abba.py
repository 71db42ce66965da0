"""The original server's lock orders, rebuilt on WorkerManager's locks for regression tests."""

from __future__ import annotations

import threading
from collections.abc import Callable

from mlx_jupyter.engine.manager import WorkerManager
from tests.helpers import Latch


class BeforeFixManager(WorkerManager):
    """WorkerManager plus the bug report's code paths, wrong orders included on purpose."""

    def unload_model_if_idle(self, between: Callable[[], object]) -> None:
        """The report's idle monitor: activity_lock, then state lock (the right order)."""
        with self._registry.activity_lock:
            between()
            with self._registry.state_lock:
                pass

    def generate_before_fix(self, between: Callable[[], object]) -> None:
        """The report's "before" generate: state lock to find the worker, then activity_lock."""
        with self._registry.state_lock:
            between()
            with self._registry.activity_lock:
                pass

    def load_model_original(self) -> None:
        """The published fix's load_model, which still nests state lock -> activity_lock."""
        with self._registry.state_lock, self._registry.activity_lock:
            pass


def run_interleaving(manager: BeforeFixManager, timeout: float) -> dict[str, BaseException | None]:
    """Idle monitor holds activity_lock while a request holds the state lock; then each asks
    for the other's lock. Returns each thread's exception (None when it finished)."""
    monitor_holds, request_holds = Latch(), Latch()
    outcome: dict[str, BaseException | None] = {}

    def run(name: str, body: Callable[[], None]) -> None:
        try:
            body()
            outcome[name] = None
        except BaseException as exc:
            outcome[name] = exc

    monitor = threading.Thread(
        target=run,
        args=(
            "monitor",
            lambda: manager.unload_model_if_idle(lambda: (monitor_holds.set(), request_holds.wait(timeout))),
        ),
        name="idle-monitor",
    )
    request = threading.Thread(
        target=run,
        args=(
            "request",
            lambda: manager.generate_before_fix(lambda: (request_holds.set(), monitor_holds.wait(timeout))),
        ),
        name="request-handler",
    )
    monitor.start()
    request.start()
    monitor.join(timeout)
    request.join(timeout)
    return outcome
