"""IdleReaper: deadline-driven sleeps, early wake-ups, and the re-check at commit."""

from __future__ import annotations

import logging
import time

from tests.helpers import commit_seam, wait_for
from tests.models import LONG, TINY, TINY_A, TINY_B


def test_reaper_unloads_at_the_deadline_and_not_before(make_manager):
    manager = make_manager(idle_timeout=1)
    unloaded_at = []
    manager.add_listener(lambda: unloaded_at.append(time.time()) if not manager.status() else None)
    deadline = manager.load(TINY).expires_at
    assert wait_for(lambda: unloaded_at, timeout=30, interval=0.01), "the reaper never unloaded the idle model"
    assert unloaded_at[0] >= deadline, "unloaded before its deadline"


def test_reaper_wakes_early_when_a_deadline_moves_closer(make_manager):
    manager = make_manager(idle_timeout=0)
    manager.load(TINY, keep_alive=3600)  # the reaper now sleeps for an hour
    manager.generate("x", model=TINY, max_tokens=1, keep_alive=0.3)
    assert wait_for(lambda: manager.status() == [], timeout=5), "the reaper slept through the new deadline"


def test_reaper_never_unloads_a_worker_leased_at_the_moment_of_commit(make_manager):
    manager = make_manager(commit_seam(), idle_timeout=0)
    streams = []

    def lease_just_before_commit(model):
        if not streams:
            stream = manager.stream_generate("x", model=model, max_tokens=LONG, keep_alive=-1)
            next(stream)
            streams.append(stream)

    manager.before_commit = lease_just_before_commit
    pid = manager.load(TINY, keep_alive=0.2).pid
    assert wait_for(lambda: streams, timeout=5)
    (status,) = manager.status()
    assert status.pid == pid and status.state == "ready" and status.active_requests == 1
    assert next(streams[0]).finish_reason is None, "the leased worker is still streaming"
    streams[0].close()
    (status,) = manager.status()
    assert status.expires_at is None, "keep_alive=-1 from the last request keeps it forever"


def test_a_failing_unload_is_logged_and_the_others_are_still_reaped(make_manager, model_dir, caplog):
    manager = make_manager(commit_seam(), idle_timeout=0, model_dirs=[str(model_dir)])
    failures = []

    def fail_for_a(model):
        if model == TINY_A:
            failures.append(model)
            raise RuntimeError("injected")

    manager.load(TINY_A, keep_alive=-1)
    manager.load(TINY_B, keep_alive=-1)
    manager.before_commit = fail_for_a
    with caplog.at_level(logging.ERROR, logger="mlx_jupyter.engine.manager"):
        manager.load(TINY_A, keep_alive=0)
        manager.load(TINY_B, keep_alive=0)
        assert wait_for(lambda: [s.id for s in manager.status()] == [TINY_A], timeout=5)
        time.sleep(1.5)  # lets a hot retry loop show itself
    assert "idle unload of tiny-a failed" in caplog.text
    assert 1 <= len(failures) <= 3, f"{len(failures)} retries in 1.5s: the reaper spins on a failing unload"
