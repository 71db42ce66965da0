"""Tests for the lock-order checker (validate, observe, off) and the lock watchdog."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlx_jupyter.engine import locks
from mlx_jupyter.engine.locks import LockOrderViolation, LockWatchdog, RankedLock
from tests.helpers import Latch

ROOT = Path(__file__).resolve().parent.parent
LOCKS_LOGGER = "mlx_jupyter.engine.locks"
WAIT = 5.0  # seconds any synchronisation in these tests may take before it counts as a hang


@pytest.fixture(autouse=True)
def checker_state() -> Iterator[None]:
    """Each test starts with no learned order and leaves the suite's validate mode behind."""
    locks.reset_graph()
    try:
        yield
    finally:
        locks.set_mode("validate")
        locks.reset_graph()


def take_violations() -> list[str]:
    """The violations this test provoked on purpose; they are cleared so the suite passes."""
    found = locks.violations()
    locks.clear_violations()
    return found


def run_in_thread(fn: Callable[[], object], name: str) -> BaseException | None:
    """Run ``fn`` in a thread and return what it raised; fail if it is still blocked after WAIT."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"{name} still blocked after {WAIT}s"
    return raised[0] if raised else None


@contextmanager
def held_by_thread(lock: RankedLock, name: str = "holder") -> Iterator[threading.Thread]:
    """Another thread holds ``lock`` for the duration of the block."""
    taken, done = threading.Event(), Latch()  # Latch: it waits holding the lock, on purpose

    def hold_until_told() -> None:
        with lock:
            taken.set()
            done.wait(WAIT * 2)

    thread = threading.Thread(target=hold_until_told, name=name, daemon=True)
    thread.start()
    assert taken.wait(WAIT), f"{name} never took {lock.name}"
    try:
        yield thread
    finally:
        done.set()
        thread.join(WAIT)
        assert not thread.is_alive(), f"{name} never released {lock.name}"


def section(message: str, start: str, end: str | None = None) -> str:
    """The part of a violation message from ``start`` up to ``end``."""
    assert start in message, message
    rest = message.split(start, 1)[1]
    return rest.split(end, 1)[0] if end else rest


# validate mode


def test_wrong_order_raises_before_blocking_on_a_lock_another_thread_holds() -> None:
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")

    def state_then_activity() -> None:
        with state:
            activity.acquire()
            activity.release()  # only reached when the check failed to refuse the lock

    with held_by_thread(activity):
        # Had the check run after blocking, this thread would wait for the holder and time out.
        raised = run_in_thread(state_then_activity, "wrong-order")
        assert isinstance(raised, LockOrderViolation), raised
        assert activity.locked(), "the holder lost activity_lock"
    assert not state.locked()
    assert len(take_violations()) == 1


def test_violation_message_names_both_locks_the_rank_order_and_both_stacks() -> None:
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    state.acquire()
    try:
        with pytest.raises(LockOrderViolation) as info:
            activity.acquire()  # the request the checker refuses
    finally:
        state.release()
    message = str(info.value)
    assert "activity_lock (rank 1) taken while holding state_lock (rank 2)" in message
    assert "the order is activity_lock -> state_lock -> spare_lock -> routes_lock" in message
    held = section(message, "state_lock acquired at:", "activity_lock requested at:")
    requested = section(message, "activity_lock requested at:")
    me = "test_violation_message_names_both_locks_the_rank_order_and_both_stacks"
    assert f"in {me}" in held
    assert f"in {me}" in requested
    assert "activity.acquire()  # the request the checker refuses" in requested
    assert take_violations() == [message]


def test_violation_shows_the_line_where_the_held_lock_was_acquired() -> None:
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    state.acquire()  # where the held lock was acquired
    try:
        with pytest.raises(LockOrderViolation) as info:
            activity.acquire()  # where the refused lock was requested
    finally:
        state.release()
    take_violations()
    held = section(str(info.value), "state_lock acquired at:", "activity_lock requested at:")
    assert "state.acquire()  # where the held lock was acquired" in held, held


def test_reacquiring_a_held_lock_is_reported_instead_of_deadlocking() -> None:
    state = RankedLock("state_lock")
    still_held: list[list[str]] = []

    def take_twice() -> None:
        with state:
            try:
                state.acquire()
            finally:
                still_held.append(locks.held_locks())

    raised = run_in_thread(take_twice, "reentrant")
    assert isinstance(raised, LockOrderViolation), raised
    assert "state_lock taken again by the thread that holds it" in str(raised)
    assert still_held == [["state_lock"]]
    assert not state.locked()
    assert len(take_violations()) == 1


def test_release_by_a_thread_that_does_not_hold_the_lock_is_reported() -> None:
    state = RankedLock("state_lock")
    with held_by_thread(state):
        raised = run_in_thread(state.release, "intruder")
        assert isinstance(raised, LockOrderViolation), raised
        assert "state_lock released by intruder, which does not hold it" in str(raised)
        assert state.locked(), "the refused release freed the holder's lock"
    assert not state.locked()
    assert len(take_violations()) == 1


def test_assert_no_locks_held_raises_while_a_lock_is_held_and_is_silent_otherwise() -> None:
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    locks.assert_no_locks_held("spawn")
    with activity, state, pytest.raises(LockOrderViolation) as info:
        locks.assert_no_locks_held("spawn")
    message = str(info.value)
    assert message.startswith("activity_lock, state_lock held across spawn")
    assert "activity_lock acquired at:" in message
    assert "state_lock acquired at:" in message
    locks.assert_no_locks_held("spawn")
    assert take_violations() == [message]


def test_held_locks_lists_the_calling_threads_locks_outermost_first() -> None:
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    seen_elsewhere: list[list[str]] = []
    look, looked = Latch(), Latch()  # the other thread is started before, not under, the locks

    def look_when_told() -> None:
        look.wait(WAIT)
        seen_elsewhere.append(locks.held_locks())
        looked.set()

    other = threading.Thread(target=look_when_told, name="other", daemon=True)
    other.start()
    assert locks.held_locks() == []
    with activity:
        assert locks.held_locks() == ["activity_lock"]
        with state:
            assert locks.held_locks() == ["activity_lock", "state_lock"]
            look.set()
            assert looked.wait(WAIT)
        assert locks.held_locks() == ["activity_lock"]
    assert locks.held_locks() == []
    other.join(WAIT)
    assert seen_elsewhere == [[]]


# the learned order graph


def test_order_graph_records_a_cycle_built_by_two_threads_in_observe_mode() -> None:
    locks.set_mode("observe")
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")

    def take_activity_then_state() -> None:
        with activity, state:
            pass

    def take_state_then_activity() -> None:
        with state, activity:
            pass

    assert run_in_thread(take_activity_then_state, "first-order") is None
    assert take_violations() == []
    assert run_in_thread(take_state_then_activity, "second-order") is None
    found = take_violations()
    cycles = [v for v in found if "closes the cycle" in v]
    assert len(cycles) == 1, found
    assert cycles[0].startswith("state_lock -> activity_lock closes the cycle activity_lock -> state_lock")
    assert "in take_activity_then_state" in section(cycles[0], "first seen at:", "now at:")
    assert "in take_state_then_activity" in section(cycles[0], "now at:")


def test_order_graph_catches_a_cycle_the_ranks_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    # test_outer's rank changes between the two orders, so no rank check can see the
    # cycle: only the learned graph can.
    monkeypatch.setitem(locks.LOCK_RANKS, "test_outer", 10)
    monkeypatch.setitem(locks.LOCK_RANKS, "test_inner", 11)
    outer, inner = RankedLock("test_outer"), RankedLock("test_inner")
    monkeypatch.setitem(locks.LOCK_RANKS, "test_outer", 12)
    outer_ranked_later = RankedLock("test_outer")

    def outer_then_inner() -> None:
        with outer, inner:
            pass

    def inner_then_outer() -> None:
        with inner, outer_ranked_later:
            pass

    assert run_in_thread(outer_then_inner, "first-order") is None
    raised = run_in_thread(inner_then_outer, "second-order")
    assert isinstance(raised, LockOrderViolation), raised
    assert str(raised).startswith("test_inner -> test_outer closes the cycle test_outer -> test_inner")
    assert not outer.locked() and not inner.locked()
    assert take_violations() == [str(raised)]


def test_reset_graph_forgets_the_learned_order() -> None:
    locks.set_mode("observe")
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    with activity, state:
        pass
    locks.reset_graph()
    with state, activity:
        pass
    found = take_violations()
    assert len(found) == 1 and "taken while holding" in found[0], found


# observe and off modes


def test_observe_mode_logs_each_acquisition_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    locks.set_mode("observe")
    caplog.set_level(logging.DEBUG, logger=LOCKS_LOGGER)
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    with activity, state:
        pass
    acquires = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == LOCKS_LOGGER and "acquire" in r.getMessage()
    ]
    assert acquires == [(logging.DEBUG, "acquire activity_lock"), (logging.DEBUG, "acquire state_lock")]


def test_observe_mode_records_a_wrong_order_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    locks.set_mode("observe")
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    with state, activity:
        assert locks.held_locks() == ["state_lock", "activity_lock"]
    assert not activity.locked() and not state.locked()
    found = take_violations()
    assert len(found) == 1, found
    assert found[0].startswith("activity_lock (rank 1) taken while holding state_lock (rank 2)")
    errors = [r for r in caplog.records if r.name == LOCKS_LOGGER and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"lock order violation: {found[0]}"]


def test_off_mode_checks_nothing_but_the_lock_still_excludes() -> None:
    locks.set_mode("off")
    activity, state = RankedLock("activity_lock"), RankedLock("state_lock")
    other_got_it: list[bool] = []
    with state:
        activity.acquire()  # wrong order: not checked
        activity.release()
        assert state.acquire(blocking=False) is False  # not reentrant, and not reported
        locks.assert_no_locks_held("spawn")
        run_in_thread(lambda: other_got_it.append(state.acquire(blocking=False)), "other")
    assert other_got_it == [False]
    assert state.acquire(blocking=False) is True
    state.release()
    assert locks.violations() == []


def test_failed_try_acquire_by_the_holder_keeps_the_lock_visible_to_the_watchdog() -> None:
    locks.set_mode("off")
    state = RankedLock("state_lock")
    me = threading.current_thread().name
    with state:
        assert state.acquire(blocking=False) is False
        stalled = LockWatchdog(threshold=0, on_stall=lambda _: None).stalled()
        assert any(s.startswith(f"state_lock held by {me} ") for s in stalled), stalled


def test_release_by_another_thread_in_observe_mode_leaves_no_phantom_holder() -> None:
    locks.set_mode("observe")
    state = RankedLock("state_lock")
    taken, done = threading.Event(), Latch()  # Latch: it waits holding the lock, on purpose

    def take_and_keep() -> None:
        state.acquire()
        taken.set()
        done.wait(WAIT * 2)

    holder = threading.Thread(target=take_and_keep, name="holder", daemon=True)
    holder.start()
    try:
        assert taken.wait(WAIT)
        assert run_in_thread(state.release, "intruder") is None
        assert not state.locked()
        assert len(take_violations()) == 1
        stalled = LockWatchdog(threshold=0, on_stall=lambda _: None).stalled()
        assert not [s for s in stalled if s.startswith("state_lock")], stalled
    finally:
        done.set()
        holder.join(WAIT)


# configuration


def test_unknown_lock_name_is_refused_with_a_hint_to_add_it_to_lock_ranks() -> None:
    with pytest.raises(ValueError, match=r"lock 'cache_lock' has no rank: add it to LOCK_RANKS"):
        RankedLock("cache_lock")


def test_invalid_mode_name_is_refused_and_the_mode_is_kept() -> None:
    with pytest.raises(ValueError, match=r"must be one of validate, observe, off, not 'strict'"):
        locks.set_mode("strict")
    assert locks.get_mode() == "validate"


def mode_in_subprocess(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLX_JUPYTER_LOCKDEP"}
    if value is not None:
        env["MLX_JUPYTER_LOCKDEP"] = value
    return subprocess.run(
        [sys.executable, "-c", "from mlx_jupyter.engine import locks; print(locks.get_mode())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("value", "mode"), [("validate", "validate"), ("observe", "observe"), ("off", "off"), (None, "off")]
)
def test_mode_comes_from_mlx_jupyter_lockdep(value: str | None, mode: str) -> None:
    done = mode_in_subprocess(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == mode


def test_invalid_mlx_jupyter_lockdep_fails_the_import() -> None:
    done = mode_in_subprocess("strict")
    assert done.returncode != 0
    assert "MLX_JUPYTER_LOCKDEP must be one of validate, observe, off, not 'strict'" in done.stderr


# the watchdog


class CountingWatchdog(LockWatchdog):
    """A watchdog a test can wait on, check by check, instead of sleeping."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checks = 0
        self.last: list[str] = []
        self._checked = threading.Condition()

    def stalled(self) -> list[str]:
        found = super().stalled()
        with self._checked:
            self.checks += 1
            self.last = found
            self._checked.notify_all()
        return found

    def wait_until(self, predicate: Callable[[CountingWatchdog], bool]) -> bool:
        with self._checked:
            return self._checked.wait_for(lambda: predicate(self), WAIT)


def thread_stacks(message: str) -> dict[str, str]:
    """The per-thread stacks of a watchdog log message, by thread name."""
    return {part.split(" (", 1)[0]: part for part in message.split("\nThread ")[1:]}


def watchdog_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOCKS_LOGGER and r.levelno == logging.ERROR and r.getMessage().startswith("lock watchdog:")
    ]


def test_watchdog_reports_a_held_lock_once_per_stall_and_rearms(caplog: pytest.LogCaptureFixture) -> None:
    state = RankedLock("state_lock")
    summaries: list[str] = []
    stalled = threading.Event()

    def on_stall(summary: str) -> None:
        summaries.append(summary)
        stalled.set()

    dog = CountingWatchdog(threshold=0.2, on_stall=on_stall, interval=0.02)
    dog.start()
    try:
        with held_by_thread(state, "stall-holder"):
            assert stalled.wait(WAIT), "the watchdog never reported the held lock"
            first = dog.checks
            assert dog.wait_until(lambda d: d.checks >= first + 5)
            assert len(summaries) == 1, summaries
        assert summaries[0].startswith("state_lock held by stall-holder for ")
        reports = watchdog_reports(caplog)
        assert len(reports) == 1, reports
        assert reports[0].startswith(f"lock watchdog: {summaries[0]}\n")
        stacks = thread_stacks(reports[0])
        assert "in hold_until_told" in stacks["stall-holder"], reports[0]
        assert "mlx-lock-watchdog" in stacks

        # Released: once a check finds nothing stalled, the next stall is reported again.
        assert dog.wait_until(lambda d: d.last == [])
        clear = dog.checks
        assert dog.wait_until(lambda d: d.checks > clear)
        stalled.clear()
        with held_by_thread(state, "second-holder"):
            assert stalled.wait(WAIT), "the watchdog did not re-arm after the first stall ended"
        assert len(summaries) == 2, summaries
        assert summaries[1].startswith("state_lock held by second-holder for ")
    finally:
        dog.stop()


def test_watchdog_reports_a_lock_waited_on_too_long_as_waiting(caplog: pytest.LogCaptureFixture) -> None:
    state = RankedLock("state_lock")
    summaries: list[str] = []
    stalled, about_to_wait = threading.Event(), threading.Event()

    def wait_for_state_lock() -> None:
        about_to_wait.set()
        with state:
            pass

    with held_by_thread(state, "stall-holder"):
        waiter = threading.Thread(target=wait_for_state_lock, name="stall-waiter", daemon=True)
        waiter.start()
        assert about_to_wait.wait(WAIT)
        # The first check comes one interval after start, when both entries are past the
        # threshold: that one report then names the waiter as well as the holder.
        dog = LockWatchdog(threshold=0.2, on_stall=lambda s: (summaries.append(s), stalled.set()), interval=0.4)
        dog.start()
        try:
            assert stalled.wait(WAIT), "the watchdog never reported the awaited lock"
        finally:
            dog.stop()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert len(summaries) == 1
    assert "state_lock waiting by stall-waiter for " in summaries[0], summaries
    reports = watchdog_reports(caplog)
    assert len(reports) == 1, reports
    assert "in wait_for_state_lock" in thread_stacks(reports[0])["stall-waiter"], reports[0]


# interrupts (the kernel's main thread hosts the engine and takes its locks)


def interrupt_main_when_waiting(lock: RankedLock) -> threading.Thread:
    """A thread that sends SIGINT to the main thread once it waits for ``lock``."""
    main = threading.main_thread()

    def waiting() -> bool:
        _thread, stack = locks._stacks.get(main.ident, (None, []))
        return any(entry[0] is lock and not entry[4] for entry in stack)

    def send() -> None:
        deadline = time.monotonic() + WAIT
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.005)
        signal.pthread_kill(main.ident, signal.SIGINT)

    thread = threading.Thread(target=send, name="interrupter", daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["off", "validate"])
def test_an_interrupt_while_waiting_for_a_lock_leaves_no_stale_entry(mode: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    locks.set_mode(mode)
    state = RankedLock("state_lock")
    with held_by_thread(state):
        interrupter = interrupt_main_when_waiting(state)
        with pytest.raises(KeyboardInterrupt), state:
            pytest.fail("the lock was taken while another thread held it")
        interrupter.join(WAIT)
    assert locks._held.stack == [], "the interrupted wait left an entry the watchdog reads as a stall"
    assert not state.locked()
    with state:  # usable again
        assert locks.held_locks() == ["state_lock"]


@pytest.mark.parametrize("mode", ["off", "validate"])
def test_an_interrupt_right_after_the_acquire_releases_the_lock(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    locks.set_mode(mode)
    state = RankedLock("state_lock")
    real = time.monotonic
    calls = []

    def interrupted_clock() -> float:
        # The second reading is the one taken once the lock is held: a signal landing there.
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(locks, "_monotonic", interrupted_clock)
    with pytest.raises(KeyboardInterrupt), state:
        pytest.fail("the body ran although the acquire was interrupted")
    monkeypatch.setattr(locks, "_monotonic", real)
    assert not state.locked(), "an interrupt after the acquire left the lock held forever"
    assert locks._held.stack == []


def test_watchdog_reports_the_stall_cleared_once_no_lock_is_over_the_threshold() -> None:
    state = RankedLock("state_lock")
    stalled, cleared = threading.Event(), threading.Event()
    dog = LockWatchdog(threshold=0.2, on_stall=lambda s: stalled.set(), on_clear=cleared.set, interval=0.02)
    dog.start()
    try:
        with held_by_thread(state):
            assert stalled.wait(WAIT)
            assert dog.stall is not None and "state_lock held" in dog.stall
            assert not cleared.is_set()
        assert cleared.wait(WAIT), "the watchdog never said the stall was over"
        assert dog.stall is None
    finally:
        dog.stop()
