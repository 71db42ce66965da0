"""Concurrency proofs: the bug report's test cases, the ABBA regression and a delay sweep."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mlx_jupyter.engine import locks
from mlx_jupyter.engine.errors import AllModelsBusyError, ModelNotFoundError
from mlx_jupyter.engine.locks import LOCK_RANKS, LockOrderViolation
from tests.abba import BeforeFixManager, run_interleaving
from tests.helpers import SpawnSpy, child_pids, commit_seam, wait_for
from tests.models import TINY, TINY_A, TINY_B

# Errors a request may get under load by design; anything else fails the stress tests.
DOCUMENTED = (AllModelsBusyError, ModelNotFoundError)


def test_case_1_idle_deadline_fires_while_another_model_is_loading(make_manager, model_dir):
    loader_spawned, reaper_committing = threading.Event(), threading.Event()
    met = []

    def after_spawn(model, worker):
        if model == TINY_B:
            loader_spawned.set()
            met.append(("loader", reaper_committing.wait(20)))

    def before_commit(model):
        reaper_committing.set()
        met.append(("reaper", loader_spawned.wait(20)))

    manager = make_manager(
        commit_seam(),
        model_dirs=[str(model_dir)],
        max_loaded_models=2,
        warm_spare=False,
        spawn=SpawnSpy(after=after_spawn),
    )
    manager.load(TINY_A, keep_alive=3600)
    manager.before_commit = before_commit
    results = []
    loader = threading.Thread(target=lambda: results.append(manager.generate("x", model=TINY_B, max_tokens=2)))
    loader.start()
    assert loader_spawned.wait(20)
    # tiny-a's deadline passes now, while tiny-b's worker is spawned but not yet loaded.
    manager.generate("x", model=TINY_A, max_tokens=1, keep_alive=0)
    loader.join(30)
    assert sorted(met) == [("loader", True), ("reaper", True)], "the two paths did not overlap"
    assert results and results[0].finish_reason == "length"
    assert wait_for(lambda: [s.id for s in manager.status()] == [TINY_B], timeout=5)


def test_case_2_ten_concurrent_requests_complete_and_log_acquisitions_in_rank_order(make_manager, caplog):
    manager = make_manager()
    manager.load(TINY)
    caplog.set_level(logging.DEBUG, logger="mlx_jupyter.engine.locks")
    locks.set_mode("observe")
    try:
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(manager.generate("x", max_tokens=8)), name=f"client-{i}")
            for i in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        locks.set_mode("validate")
    assert len(results) == 10 and all(r.finish_reason == "length" for r in results)
    held: dict[str, list[str]] = {}
    acquisitions = 0
    for record in caplog.records:
        if record.name != "mlx_jupyter.engine.locks":
            continue
        verb, name = record.getMessage().split()
        stack = held.setdefault(record.threadName, [])
        if verb == "acquire":
            acquisitions += 1
            assert all(LOCK_RANKS[h] < LOCK_RANKS[name] for h in stack), f"{record.threadName}: {stack} then {name}"
            stack.append(name)
        else:
            stack.remove(name)
    clients = {r.threadName for r in caplog.records if r.threadName.startswith("client-")}
    assert len(clients) == 10 and acquisitions > 40
    assert not locks.violations()


def test_case_3_rapid_switching_under_load_with_one_slot_and_a_tiny_idle_timeout(make_manager, model_dir):
    seconds = float(os.environ.get("MLX_JUPYTER_STRESS_SECONDS", "10"))
    manager = make_manager(model_dirs=[str(model_dir)], max_loaded_models=1, idle_timeout=0.05, queue_timeout=60)
    deadline = time.monotonic() + seconds
    served = {TINY_A: 0, TINY_B: 0}
    documented, unexpected = [], []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            model = rng.choice([TINY_A, TINY_B])
            try:
                if rng.random() < 0.1:
                    manager.unload(model)
                    continue
                stream = manager.stream_generate("x", model=model, max_tokens=rng.randint(1, 12))
                if rng.random() < 0.2:
                    next(stream)
                    stream.close()  # a client that leaves early
                else:
                    assert list(stream)[-1].finish_reason == "length"
                served[model] += 1
            except DOCUMENTED as exc:
                documented.append(exc)
            except Exception as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"stress-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    assert not any(t.is_alive() for t in threads), "a client is stuck: deadlock?"
    assert not unexpected, unexpected[:3]
    assert served[TINY_A] and served[TINY_B]
    manager.shutdown()
    assert wait_for(lambda: not child_pids(), timeout=10)


def test_case_4_abba_orders_are_caught_before_blocking_sequentially_and_interleaved():
    manager = BeforeFixManager(idle_timeout=0)
    try:
        with pytest.raises(LockOrderViolation, match=r"activity_lock \(rank 1\) taken while holding state_lock"):
            manager.load_model_original()
        with pytest.raises(LockOrderViolation, match="activity_lock"):
            manager.generate_before_fix(lambda: None)
        outcome = run_interleaving(manager, timeout=10)
        # The request thread was refused while the monitor held activity_lock, so it
        # never blocked; releasing its state lock let the monitor finish.
        assert isinstance(outcome["request"], LockOrderViolation), outcome
        assert "generate_before_fix" in str(outcome["request"])
        assert outcome["monitor"] is None
        assert len(locks.violations()) == 3
    finally:
        locks.clear_violations()
        manager.shutdown()


def test_case_4_with_the_checker_off_the_same_interleaving_really_deadlocks():
    code = textwrap.dedent(
        """
        import faulthandler, sys
        from tests.abba import BeforeFixManager, run_interleaving

        faulthandler.dump_traceback_later(3, exit=True)
        run_interleaving(BeforeFixManager(idle_timeout=0), timeout=30)
        print("no deadlock")
        """
    )
    env = dict(os.environ, MLX_JUPYTER_LOCKDEP="off", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "no deadlock" not in proc.stdout
    assert proc.returncode != 0
    assert "Timeout" in proc.stderr
    # both threads are stuck inside a lock acquisition, one in each wrong-ordered path
    stacks = proc.stderr.split("Thread 0x")
    monitor = [s for s in stacks if "unload_model_if_idle" in s]
    request = [s for s in stacks if "generate_before_fix" in s]
    assert monitor and request, proc.stderr
    for stack in (monitor[0], request[0]):
        innermost = next(line for line in stack.splitlines() if line.strip().startswith("File"))
        assert "engine/locks.py" in innermost, f"not blocked on a RankedLock: {stack}"


def test_case_5_seeded_delay_injection_sweep_finds_no_violation(make_manager, model_dir):
    seeds = int(os.environ.get("MLX_JUPYTER_SWEEP_SEEDS", "8"))
    picks: list[random.Random] = []  # this seed's generator, shared by every thread

    def delay(*_ctx) -> None:
        # ~half the seams sleep a little: shifts every interleaving the seed picks
        if picks and picks[-1].random() < 0.5:
            time.sleep(picks[-1].uniform(0, 0.02))

    def clock() -> float:  # read at each lease decision, each reaper pass and commit: no lock held
        delay()
        return time.monotonic()

    manager = make_manager(
        commit_seam(),
        model_dirs=[str(model_dir)],
        max_loaded_models=2,
        idle_timeout=0.2,
        queue_timeout=60,
        spawn=SpawnSpy(before=delay, after=delay),
        clock=clock,
    )
    manager.before_commit = delay
    unexpected = []
    for seed in range(seeds):
        picks.append(random.Random(seed))

        def client(i: int, seed: int = seed) -> None:
            crng = random.Random(seed * 100 + i)
            for _ in range(3):
                model = crng.choice([TINY_A, TINY_B, TINY])
                try:
                    action = crng.random()
                    if action < 0.15:
                        manager.unload(model)
                    elif action < 0.3:
                        manager.load(model, keep_alive=crng.choice([0, 0.1, 5]))
                    else:
                        manager.generate(
                            "x", model=model, max_tokens=crng.randint(1, 6), keep_alive=crng.choice([None, 0])
                        )
                except DOCUMENTED:
                    pass
                except Exception as exc:
                    unexpected.append((seed, exc))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), f"seed {seed}: a client is stuck"
    assert not unexpected, unexpected[:3]
    assert not locks.violations()
