"""The warm spare worker: a load adopts it, a replacement follows, and it never outlives the manager."""

from __future__ import annotations

import os
import signal

from tests.helpers import child_pids, pid_alive, wait_for
from tests.models import TINY


def _spare(manager) -> int:
    assert wait_for(lambda: manager.spare_pid is not None, timeout=30), "no warm spare was started"
    return manager.spare_pid


def test_a_load_adopts_the_warm_spare_and_a_new_spare_replaces_it(make_manager):
    manager = make_manager(max_loaded_models=1)
    spare = _spare(manager)
    status = manager.load(TINY)
    assert status.pid == spare
    replacement = _spare(manager)
    assert replacement != spare and pid_alive(replacement)
    # The spare is no model: not listed, not loaded, not taking the only slot.
    assert [s.id for s in manager.status()] == [TINY]
    assert manager.health()["models_loaded"] == 1
    assert manager.generate("x", model=TINY, max_tokens=3).usage["completion_tokens"] == 3
    assert sorted(child_pids()) == sorted([spare, replacement])


def test_a_spare_that_died_is_not_used_and_the_next_load_starts_fresh(make_manager):
    manager = make_manager()
    dead = _spare(manager)
    os.kill(dead, signal.SIGKILL)
    assert wait_for(lambda: manager.spare_pid is None, timeout=10), "a dead spare stayed published"
    status = manager.load(TINY)
    assert status.pid != dead and pid_alive(status.pid)
    assert manager.generate("x", model=TINY, max_tokens=3).finish_reason == "length"
    assert _spare(manager) not in (dead, status.pid)


def test_shutdown_stops_the_spare(make_manager):
    manager = make_manager()
    spare = _spare(manager)
    manager.shutdown()
    assert wait_for(lambda: not pid_alive(spare), timeout=5)
    assert manager.spare_pid is None and not child_pids()


def test_with_warm_spare_off_a_load_starts_its_own_process_and_no_spare(make_manager):
    manager = make_manager(warm_spare=False)
    status = manager.load(TINY)
    assert child_pids() == [status.pid] and manager.spare_pid is None
