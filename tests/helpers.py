"""Test helpers: polling with a deadline, finding this process's children (and workers), running IPython cells
and concurrent requests."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_jupyter.engine.types import GenerationResult
from tests.models import TINY


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` while letting the event loop run, until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def child_pids(parent: int | None = None) -> list[int]:
    """Live (non-zombie) child processes of ``parent`` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def worker_pids() -> list[int]:
    """This process's live children that run a model worker."""
    found = []
    for pid in child_pids():
        with contextlib.suppress(OSError):
            if b"worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def pid_alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def process_started_at(pid: int) -> float:
    """The epoch time a process started, to 10 ms, from /proc (ticks since boot, and the uptime now)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    booted_at = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return booted_at + ticks / os.sysconf("SC_CLK_TCK")


def run_cell(shell, cell: str):
    """Run ``cell`` in an IPython shell; returns its ExecutionResult and the captured output."""
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = shell.run_cell(cell)
    return result, captured


class Latch:
    """A one-shot event on a raw lock, for tests that hold an engine lock while they wait on
    purpose (the suite's guard refuses ``threading.Event.wait`` under an engine lock)."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float) -> bool:
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True


class SpawnSpy:
    """An injected ``spawn`` for WorkerManager: starts real workers, records the model of each
    start (the warm spare's too, as ``SPARE_ID``), and runs a test's ``before(model_id)`` and
    ``after(model_id, worker)`` around it (to hold a load at that moment, or count it)."""

    def __init__(self, before=None, after=None) -> None:
        self.started: list[str] = []
        self.before = before
        self.after = after

    def __call__(self, model_id, on_exit, timeout):
        from mlx_jupyter.engine.lifecycle import spawn_worker

        self.started.append(model_id)
        if self.before is not None:
            self.before(model_id)
        worker = spawn_worker(model_id, on_exit, timeout)
        if self.after is not None:
            self.after(model_id, worker)
        return worker

    @property
    def models(self) -> list[str]:
        """The models started, the warm spare's starts left out."""
        from mlx_jupyter.engine.spare import SPARE_ID

        return [m for m in self.started if m != SPARE_ID]


def commit_seam():
    """A WorkerManager class whose instances run ``before_commit(model)`` right before each idle
    unload commits (in the reaper's thread, with no lock held): the moment a request may
    lease the model, or the unload may fail."""
    from mlx_jupyter.engine.manager import WorkerManager

    class CommitSeam(WorkerManager):
        def before_commit(self, model: str) -> None:
            pass

        def _commit_reap(self, record, now):
            self.before_commit(record.spec.id)
            return super()._commit_reap(record, now)

    return CommitSeam


def run_concurrently(manager, requests: list[dict[str, Any]], model: str = TINY) -> list[GenerationResult]:
    """Each request through ``manager.generate`` on its own thread, all released at once; their results in order."""
    results: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        start.wait(10)
        try:
            results[i] = manager.generate(model=model, **requests[i])
        except Exception as exc:  # reported by the assert below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request did not finish within 60s"
    assert all(isinstance(r, GenerationResult) for r in results), results
    return results
