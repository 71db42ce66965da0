"""The engine at its edges: cancellation wherever a request waits, finalizers, huge keep-alives,
the loader's lease, a hung spare, bounds on what one request may cost."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time

import pytest

from mlx_jupyter.engine.errors import (
    InvalidRequestError,
    PromptTooLargeError,
    UnloadPendingError,
    WorkerTimeoutError,
)
from mlx_jupyter.engine.field_checks import MAX_STOP_CHARS, MAX_STOP_STRINGS
from mlx_jupyter.engine.lifecycle import spawn_worker
from mlx_jupyter.server.streaming import ChunkBridge
from tests.helpers import SpawnSpy, commit_seam, pid_alive, wait_for
from tests.models import LONG, TINY, TINY_A, TINY_B


def consume(stream, out: list) -> threading.Thread:
    """Iterate ``stream`` to its end on a thread of its own, appending every chunk to ``out``."""

    def run():
        try:
            out.extend(stream)
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, name="consumer", daemon=True)
    thread.start()
    return thread


# -- keep-alive and the reaper ---------------------------------------------------------


def test_huge_keep_alives_mean_never_and_the_reaper_keeps_unloading_the_others(make_manager, model_dir):
    manager = make_manager(model_dirs=[str(model_dir)], max_loaded_models=3)
    manager.load(TINY_A, keep_alive="99999999h")
    manager.generate("x", model=TINY_B, max_tokens=1, keep_alive=1e10)
    manager.load(TINY, keep_alive=0.2)
    assert wait_for(lambda: [s.id for s in manager.status()] == [TINY_A, TINY_B], timeout=10), (
        "the reaper stopped unloading idle models"
    )
    assert manager.health()["degraded_reason"] is None, "the reaper died"
    for status in manager.status():
        assert status.keep_alive_s == -1 and status.expires_at is None
    assert manager.health()["status"] == "ok"


def test_a_failing_reaper_pass_is_logged_and_retried(make_manager, monkeypatch, caplog):
    manager = make_manager()
    real = manager.next_expiry
    failures = []

    def fail_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("injected")
        return real()

    monkeypatch.setattr(manager, "next_expiry", fail_once)
    with caplog.at_level(logging.ERROR, logger="mlx_jupyter.engine.reaper"):
        manager.load(TINY, keep_alive=0.2)  # wakes the reaper, whose pass fails once
        assert wait_for(lambda: failures, timeout=10)
        assert wait_for(lambda: manager.status() == [], timeout=10)
    assert "idle reaper pass failed" in caplog.text
    assert manager.health()["status"] == "ok"


class Fatal(BaseException):
    """Not an Exception: nothing in a reaper pass catches it."""


def test_a_dead_reaper_turns_health_degraded(make_manager):
    manager = make_manager(commit_seam())

    def die(model):
        raise Fatal("injected")

    manager.before_commit = die
    manager.load(TINY, keep_alive=0)
    assert wait_for(lambda: manager.degraded, timeout=10)
    health = manager.health()
    assert health["status"] == "degraded" and "idle reaper died" in health["degraded_reason"]


def test_keep_alive_0_loads_once_even_when_the_reaper_runs_the_moment_the_model_is_ready(make_manager):
    manager = make_manager()
    reaped = []

    def reap_at_once():
        # What the reaper does when its wake-up lands first; bounded, so a bug cannot loop forever.
        if len(reaped) < 5:
            reaped.extend(manager.reap_expired())

    manager.add_listener(reap_at_once)
    result = manager.generate("x", model=TINY, max_tokens=2, keep_alive=0)
    assert result.finish_reason == "length"
    assert manager.counters["loads"] == 1, f"loaded {manager.counters['loads']} times for one request"
    assert wait_for(lambda: manager.status() == [], timeout=10), "keep_alive=0 unloads right after the request"


def test_a_new_idle_timeout_applies_to_models_already_idle(make_manager):
    manager = make_manager(idle_timeout=3600)
    status = manager.load(TINY)
    assert status.expires_at > time.time() + 3000
    manager.settings.idle_timeout = 0.2  # as %config MLXMagics.idle_timeout does to a kernel's engine
    assert wait_for(lambda: manager.status() == [], timeout=10), "the old deadline was kept"


def test_idle_deadlines_do_not_move_with_the_wall_clock(make_manager, monkeypatch):
    manager = make_manager()
    manager.load(TINY, keep_alive=3600)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # the clock is set two hours ahead
    assert manager.reap_expired() == []
    assert [s.id for s in manager.status()] == [TINY]


# -- cancellation ------------------------------------------------------------------------


def test_cancel_withdraws_a_queued_request_and_evicts_nothing_for_it(make_manager, model_dir):
    spawn = SpawnSpy()
    manager = make_manager(model_dirs=[str(model_dir)], max_loaded_models=1, warm_spare=False, spawn=spawn)
    busy = manager.stream_generate("x", model=TINY_A, max_tokens=LONG)
    next(busy)
    queued, out = manager.stream_generate("x", model=TINY_B, max_tokens=4), []
    consumer = consume(queued, out)
    assert wait_for(lambda: manager.health()["active_requests"] == 1 and len(manager._registry.waiters) == 1)
    queued.cancel()
    consumer.join(10)
    assert not consumer.is_alive(), "the queued request did not notice its cancel"
    assert out[-1].finish_reason == "cancelled" and out[-1].usage["completion_tokens"] == 0
    assert manager._registry.waiters == []
    busy.close()
    assert [s.id for s in manager.status()] == [TINY_A], "a model was evicted for a cancelled request"
    assert spawn.models == [TINY_A]


def test_cancel_during_the_load_lets_the_load_finish_and_starts_no_generation(make_manager):
    spawned, go_on = threading.Event(), threading.Event()

    def hold_the_load(model, worker):
        spawned.set()
        assert go_on.wait(30)

    manager = make_manager(warm_spare=False, spawn=SpawnSpy(after=hold_the_load))
    stream, out = manager.stream_generate("x", model=TINY, max_tokens=LONG), []
    consumer = consume(stream, out)
    assert spawned.wait(30)
    stream.cancel()
    go_on.set()
    consumer.join(30)
    assert not consumer.is_alive()
    assert [c.finish_reason for c in out] == ["cancelled"]
    (status,) = manager.status()
    assert status.state == "ready" and status.active_requests == 0, "the load finished and the lease was released"


def test_cancel_ends_a_running_generation_from_another_thread(make_manager):
    manager = make_manager()
    stream = manager.stream_generate("x", model=TINY, max_tokens=LONG)
    first = next(stream)
    out = [first]
    consumer = consume(stream, out)
    stream.cancel()
    consumer.join(30)
    assert not consumer.is_alive()
    final = out[-1]
    assert final.finish_reason == "cancelled"
    assert final.usage["completion_tokens"] < LONG
    assert manager.status()[0].active_requests == 0


def test_the_bridge_cancels_a_stream_that_has_sent_nothing_yet():
    """A client that leaves before its first text: the cancel reaches the engine stream at once."""

    class Silent:
        """An engine stream that yields nothing until it is cancelled (queued, loading, or held-back text)."""

        def __init__(self):
            self.cancelled = threading.Event()
            self.closed = False

        def __iter__(self):
            return self

        def __next__(self):
            if not self.cancelled.wait(30):
                raise AssertionError("never cancelled")
            raise StopIteration

        def cancel(self):
            self.cancelled.set()

        def close(self):
            self.closed = True

    async def leave_early():
        from concurrent.futures import ThreadPoolExecutor

        stream = Silent()
        with ThreadPoolExecutor(1) as pool:
            bridge = ChunkBridge(stream, pool)
            bridge.cancel()  # the handler's on_connection_close
            await asyncio.wait_for(bridge.wait_closed(), 10)
        return stream

    stream = asyncio.run(leave_early())
    assert stream.cancelled.is_set() and stream.closed


# -- finalizers -----------------------------------------------------------------------


def test_a_stream_dropped_in_a_reference_cycle_is_released_without_taking_a_lock_in_the_finalizer(make_manager):
    manager = make_manager()
    stream = manager.stream_generate("x", model=TINY, max_tokens=LONG)
    next(stream)
    cycle: list = [stream]
    cycle.append(cycle)
    del stream, cycle
    gc.disable()  # collected below, under the locks, and not at a random moment before
    try:
        with manager._registry.activity_lock, manager._registry.state_lock:
            gc.collect()  # the stream's finalizer runs here, in a thread that holds both locks
            assert manager._registry.models[TINY].leases == 1, "the finalizer released the lease itself"
    finally:
        gc.enable()
    assert wait_for(lambda: manager.status()[0].active_requests == 0, timeout=10), "nobody released the lease"


# -- unload, the spare, hung workers ------------------------------------------------------


def test_unload_gives_up_waiting_after_unload_timeout_and_the_model_unloads_when_its_request_ends(make_manager):
    manager = make_manager(unload_timeout=0.5)
    stream = manager.stream_generate("x", model=TINY, max_tokens=LONG)
    next(stream)
    with pytest.raises(UnloadPendingError, match=r"still has 1 requests running after 0.5s"):
        manager.unload(TINY)
    (status,) = manager.status()
    assert status.state == "draining"
    stream.close()
    assert wait_for(lambda: manager.status() == [], timeout=10)


def test_a_stopped_warm_spare_is_not_adopted(make_manager):
    manager = make_manager(load_timeout=30)
    assert wait_for(lambda: manager.spare_pid is not None, timeout=30)
    spare = manager.spare_pid
    os.kill(spare, signal.SIGSTOP)
    try:
        status = manager.load(TINY)
        assert status.pid != spare
        assert wait_for(lambda: not pid_alive(spare), timeout=10), "the stopped spare was left running"
        assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"
    finally:
        if pid_alive(spare):
            os.kill(spare, signal.SIGCONT)


def test_a_cold_start_does_not_wait_for_the_spare_being_started(make_manager):
    spare_spawning, release_spare = threading.Event(), threading.Event()

    def spawn(model_id, on_exit, timeout):
        if model_id == "(spare)":
            spare_spawning.set()
            release_spare.wait(60)
        return spawn_worker(model_id, on_exit, timeout)

    manager = make_manager(spawn=spawn)
    try:
        assert spare_spawning.wait(30)
        loaded = []
        loader = threading.Thread(target=lambda: loaded.append(manager.load(TINY)), daemon=True)
        loader.start()
        loader.join(60)
        assert loaded, "the load waited for the spare's refill"
        assert not release_spare.is_set()
    finally:
        release_spare.set()


def test_a_hung_worker_is_counted_once_however_many_requests_saw_it_hang(make_manager):
    manager = make_manager(first_token_timeout=2, token_timeout=1)
    streams = [manager.stream_generate(f"x{i}", model=TINY, max_tokens=LONG) for i in range(2)]
    for stream in streams:
        next(stream)
    pid = manager.status()[0].pid
    os.kill(pid, signal.SIGSTOP)
    errors = []
    threads = []
    for stream in streams:
        thread = threading.Thread(target=lambda s=stream: errors.append(_drain(s)), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(30)
    assert [type(e) for e in errors] == [WorkerTimeoutError, WorkerTimeoutError]
    assert manager.counters["hung_kills"] == 1
    assert wait_for(lambda: not pid_alive(pid), timeout=10)


def _drain(stream) -> BaseException | None:
    try:
        for _ in stream:
            pass
    except Exception as exc:
        return exc
    return None


# -- bounds on one request ------------------------------------------------------------------


def test_the_engine_enforces_the_prompt_size_limit_before_any_work(make_manager):
    manager = make_manager(max_prompt_chars=100)
    with pytest.raises(PromptTooLargeError, match=r"101 characters; the limit is 100"):
        manager.stream_generate("x" * 101, model=TINY)
    with pytest.raises(PromptTooLargeError):
        manager.stream_generate(messages=[{"role": "user", "content": "y" * 60}] * 2, model=TINY)
    assert manager.status() == []


@pytest.mark.parametrize(
    ("stop", "match"),
    [
        (["s"] * (MAX_STOP_STRINGS + 1), rf"{MAX_STOP_STRINGS + 1} strings; the limit is {MAX_STOP_STRINGS}"),
        ("z" * (MAX_STOP_CHARS + 1), rf"{MAX_STOP_CHARS + 1} characters long; the limit is {MAX_STOP_CHARS}"),
    ],
)
def test_the_stop_list_is_bounded(make_manager, stop, match):
    with pytest.raises(InvalidRequestError, match=match):
        make_manager().stream_generate("x", model=TINY, stop=stop)


def test_max_tokens_beyond_the_models_context_is_refused_naming_both(make_manager):
    manager = make_manager(max_tokens_limit=50_000)
    expected = r"max_tokens is 40000 but model 'builtin:tiny' has a context of 32768"
    with pytest.raises(InvalidRequestError, match=expected):
        manager.generate("x", model=TINY, max_tokens=40_000)
    (status,) = manager.status()
    assert status.active_requests == 0, "the refused request released its lease"


@pytest.mark.parametrize("value", ["--5", "5m-", "1h 30m", "-+1", "5 m", "m", "1e", "nan"])
def test_malformed_keep_alive_forms_are_refused(make_manager, value):
    with pytest.raises(InvalidRequestError, match="keep_alive"):
        make_manager().stream_generate("x", model=TINY, keep_alive=value)
