"""Ranked locks, the lock-order checker ("lockdep") and the lock watchdog."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

# The whole lock order of the engine. A thread may only take a lock whose rank is
# higher than the rank of every lock it already holds. Add new locks here, never inline.
LOCK_RANKS: dict[str, int] = {
    "activity_lock": 1,  # Registry: leases, last use, keep-alive, idle deadlines
    "state_lock": 2,  # Registry: records by id, states, workers, claims, waiters, counters
    "spare_lock": 3,  # WarmSpare: the spare worker and its refill
    "routes_lock": 4,  # WorkerProcess: request id -> frame queue
}

MODES = ("validate", "observe", "off")


class LockOrderViolation(RuntimeError):
    """A lock was taken against the rank order, or a lock was held where none may be."""


_mode = "off"
_monotonic = time.monotonic


class _Held(threading.local):
    """Per-thread stack of ``[lock, frame, line, since, held]`` entries, outermost first.

    Each thread's stack is also published in ``_stacks`` so the watchdog can read it;
    an entry is pushed (not yet held) before blocking, so waiting shows up too.
    """

    def __init__(self) -> None:
        self.stack: list[list] = []
        _stacks[threading.get_ident()] = (threading.current_thread(), self.stack)


_stacks: dict[int, tuple[threading.Thread, list[list]]] = {}
_held = _Held()
# Learned order: edges between lock names, with the stack that first showed each edge.
_graph: dict[str, dict[str, str]] = {}
_graph_lock = threading.Lock()  # guards _graph; a leaf taken only inside this module
_violations: list[str] = []


def set_mode(mode: str) -> None:
    """Switch the checker mode: ``validate`` raises, ``observe`` logs, ``off`` does nothing."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"MLX_JUPYTER_LOCKDEP must be one of {', '.join(MODES)}, not {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


def violations() -> list[str]:
    """Violations seen so far in any thread (tests fail the run when this is not empty)."""
    return list(_violations)


def clear_violations() -> None:
    _violations.clear()


def reset_graph() -> None:
    """Forget the learned order (tests that build deliberately wrong orders use this)."""
    with _graph_lock:
        _graph.clear()


def _format_frame(frame: FrameType | None, line: int | None = None) -> str:
    """The stack from ``frame`` outwards; ``line`` is where the innermost frame was then."""
    if frame is None:
        return "    <unknown>\n"
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=12)
    if line is not None:
        inner = summary[0]
        summary[0] = traceback.FrameSummary(inner.filename, line, inner.name)
    summary.reverse()
    return "".join(summary.format())


def _report(message: str) -> None:
    _violations.append(message)
    log.error("lock order violation: %s", message)
    if _mode == "validate":
        raise LockOrderViolation(message)


def _path(src: str, dst: str) -> list[str] | None:
    """A path src -> ... -> dst in the learned graph (caller holds _graph_lock)."""
    todo, seen = [[src]], {src}
    while todo:
        path = todo.pop()
        for nxt in _graph.get(path[-1], {}):
            if nxt == dst:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                todo.append([*path, nxt])
    return None


class RankedLock:
    """A non-reentrant lock with a rank from ``LOCK_RANKS``, checked before it blocks.

    In every mode the calling thread's held stack records the lock with the time it was
    requested, which the watchdog reads; ``validate`` and ``observe`` add the rank and
    order checks and remember where each lock was taken.
    """

    def __init__(self, name: str) -> None:
        if name not in LOCK_RANKS:
            raise ValueError(f"lock {name!r} has no rank: add it to LOCK_RANKS in locks.py")
        self.name = name
        self.rank = LOCK_RANKS[name]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RankedLock {self.name} rank={self.rank}>"

    def _check(self, stack: list[list], here: FrameType) -> None:
        for held, frame, line, _since, is_held in stack:
            if not is_held:
                continue
            if held is self:
                _report(
                    f"{self.name} taken again by the thread that holds it\n"
                    f"  held at:\n{_format_frame(frame, line)}  taken again at:\n{_format_frame(here)}"
                )
            elif held.rank >= self.rank:
                _report(
                    f"{self.name} (rank {self.rank}) taken while holding {held.name} "
                    f"(rank {held.rank}); the order is "
                    + " -> ".join(sorted(LOCK_RANKS, key=LOCK_RANKS.__getitem__))
                    + f"\n  {held.name} acquired at:\n{_format_frame(frame, line)}"
                    f"  {self.name} requested at:\n{_format_frame(here)}"
                )
        for entry in stack:
            if entry[4] and self.name not in _graph.get(entry[0].name, ()):
                self._learn(entry[0].name, here)

    def _learn(self, before: str, here: FrameType) -> None:
        with _graph_lock:
            if self.name in _graph.get(before, {}):
                return
            cycle = _path(self.name, before)
            where = _format_frame(here)
            if cycle is None:
                _graph.setdefault(before, {})[self.name] = where
        if cycle is not None:
            first = _graph.get(cycle[0], {}).get(cycle[1], "    <unknown>\n")
            _report(
                f"{before} -> {self.name} closes the cycle {' -> '.join(cycle)}\n"
                f"  {' -> '.join(cycle[:2])} first seen at:\n{first}"
                f"  {before} -> {self.name} now at:\n{where}"
            )

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._acquire(sys._getframe(1) if _mode != "off" else None, blocking, timeout)

    def __enter__(self) -> bool:
        if _mode != "off":
            return self._acquire(sys._getframe(1), True, -1)
        # The manager's hot path: only what the watchdog needs, inlined.
        stack = _held.stack
        entry = [self, None, None, _monotonic(), False]
        stack.append(entry)
        try:
            # Stored straight from the call, so an interrupt can never find the lock held
            # while the entry says it is not.
            entry[4] = self._lock.acquire()
            entry[3] = _monotonic()
        except BaseException:
            self._unwind(stack, entry)
            raise
        return True

    def __exit__(self, *exc: object) -> None:
        stack = _held.stack
        if _mode == "off" and stack and stack[-1][0] is self:
            try:
                stack.pop()
            finally:  # even if an interrupt lands here, the lock is released
                self._lock.release()
        else:
            self.release()

    def _acquire(self, here: FrameType | None, blocking: bool, timeout: float) -> bool:
        stack = _held.stack
        if here is not None:
            self._check(stack, here)
            if _mode == "observe":
                log.debug("acquire %s", self.name)
        entry = [self, here, here.f_lineno if here is not None else None, _monotonic(), False]
        stack.append(entry)
        try:
            entry[4] = self._lock.acquire(blocking, timeout)
            if entry[4]:
                entry[3] = _monotonic()
        except BaseException:
            self._unwind(stack, entry)
            raise
        if not entry[4]:
            _remove(stack, entry)
        return entry[4]

    def _unwind(self, stack: list[list], entry: list) -> None:
        """An exception during or right after the acquire (KeyboardInterrupt in the kernel's
        main thread): leave neither the lock held nor an entry the watchdog would read as a stall."""
        if entry[4]:
            self._lock.release()
        _remove(stack, entry)

    def release(self) -> None:
        stack = _held.stack
        if stack and stack[-1][0] is self:
            try:
                stack.pop()
                if _mode == "observe":
                    log.debug("release %s", self.name)
            finally:  # even if an interrupt lands here, the lock is released
                self._lock.release()
            return
        if not self._forget(stack):
            if _mode != "off":  # validate raises here and the holder keeps its lock
                _report(f"{self.name} released by {threading.current_thread().name}, which does not hold it")
            for _thread, other in list(_stacks.values()):  # drop the real holder's entry
                if self._forget(other):
                    break
        if _mode == "observe":
            log.debug("release %s", self.name)
        self._lock.release()

    def _forget(self, stack: list[list]) -> bool:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is self and stack[i][4]:
                del stack[i]
                return True
        return False

    def locked(self) -> bool:
        return self._lock.locked()


def _remove(stack: list[list], entry: list) -> None:
    """Remove ``entry`` itself (entries of one lock compare equal, so not ``list.remove``)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entry:
            del stack[i]
            return


def held_locks() -> list[str]:
    """Names of the ranked locks the calling thread holds, outermost first."""
    return [entry[0].name for entry in _held.stack if entry[4]]


def assert_no_locks_held(where: str) -> None:
    """Mark a boundary (IPC, spawn, join, sleep, wait, yield) where no lock may be held."""
    if _mode == "off":
        return
    stack = _held.stack
    if stack:
        _report(
            f"{', '.join(e[0].name for e in stack)} held across {where}\n"
            + "".join(f"  {e[0].name} acquired at:\n{_format_frame(e[1], e[2])}" for e in stack)
        )


def _mode_from_env() -> None:
    set_mode(os.environ.get("MLX_JUPYTER_LOCKDEP", "off").strip().lower() or "off")


_mode_from_env()


def all_thread_stacks() -> str:
    """Every thread's stack, as faulthandler would show it but with names."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"Thread {names.get(ident, ident)} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(out)


class LockWatchdog:
    """Logs every thread's stack once when a ranked lock is waited on or held too long.

    A hang is then never silent: ``stall`` says what is stalled (None when nothing is),
    ``on_stall`` runs once per stall and ``on_clear`` once it is over, when no lock is
    over the threshold any more; then the watchdog re-arms.
    """

    def __init__(
        self,
        threshold: float,
        on_stall: Callable[[str], None] | None = None,
        interval: float | None = None,
        on_clear: Callable[[], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.interval = interval if interval is not None else max(0.05, threshold / 4)
        self.stall: str | None = None
        self._on_stall = on_stall
        self._on_clear = on_clear
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-lock-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def stalled(self) -> list[str]:
        now = time.monotonic()
        found = []
        for ident, (thread, stack) in list(_stacks.items()):
            if not thread.is_alive():
                if _stacks.get(ident, (None,))[0] is thread:  # the id may be reused already
                    _stacks.pop(ident, None)
                continue
            for lock, _frame, _line, since, is_held in list(stack):
                if now - since > self.threshold:
                    what = "held" if is_held else "waiting"
                    found.append(f"{lock.name} {what} by {thread.name} for {now - since:.1f}s")
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            stalls = self.stalled()
            if stalls and self.stall is None:
                summary = "; ".join(stalls)
                log.error("lock watchdog: %s\n%s", summary, all_thread_stacks())
                self.stall = summary  # after the stacks are logged: whoever reads it can find them
                self._call(self._on_stall, summary)
            elif not stalls and self.stall is not None:
                log.warning("lock watchdog: the stall is over (%s)", self.stall)
                self.stall = None
                self._call(self._on_clear)

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: str) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("lock watchdog callback failed")
