"""WorkerManager behaviour with real worker processes on the built-in tiny model."""

from __future__ import annotations

import threading
import time

import pytest

from mlx_jupyter.engine.errors import AllModelsBusyError, MemoryLimitError, ModelNotFoundError
from tests.helpers import Latch, SpawnSpy, pid_alive, process_started_at, wait_for
from tests.models import LONG, TINY, TINY_A, TINY_B


def test_generate_streams_text_then_a_final_chunk_with_usage_and_timings(make_manager):
    manager = make_manager()
    chunks = list(manager.stream_generate("Beautiful is better", model=TINY, max_tokens=8))
    assert all(c.finish_reason is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.finish_reason in ("length", "stop")
    assert final.usage["completion_tokens"] == 8 or final.finish_reason == "stop"
    assert final.usage["total_tokens"] == final.usage["prompt_tokens"] + final.usage["completion_tokens"]
    assert set(final.timings) >= {"load_s", "ttft_s", "prompt_tps", "generation_tps", "peak_memory_bytes"}
    assert final.timings["load_s"] is not None, "the request that loaded the model reports the load time"
    assert "".join(c.text for c in chunks)


def test_the_load_time_counts_starting_the_worker_process(make_manager):
    # No warm spare: the request that loads the model starts the worker process, and waits for it.
    manager = make_manager(warm_spare=False)
    final = list(manager.stream_generate("x", model=TINY, max_tokens=1))[-1]
    status = manager.status()[0]
    process_age_when_loaded = status.loaded_at - process_started_at(status.pid)
    assert final.timings["load_s"] >= process_age_when_loaded - 0.05, (final.timings, process_age_when_loaded)


def test_seeded_generation_is_reproducible_and_greedy_matches_blocking(make_manager):
    manager = make_manager()
    a = manager.generate("Simple is", model=TINY, max_tokens=12, temperature=0.9, seed=7)
    b = manager.generate("Simple is", model=TINY, max_tokens=12, temperature=0.9, seed=7)
    assert a.text == b.text
    streamed = "".join(c.text for c in manager.stream_generate("Simple is", model=TINY, max_tokens=12))
    assert streamed == manager.generate("Simple is", model=TINY, max_tokens=12).text


def test_chat_messages_use_the_chat_template(make_manager):
    manager = make_manager()
    result = manager.generate(messages=[{"role": "user", "content": "hello"}], model=TINY, max_tokens=4)
    # <|user|>\nhello<|end|>\n<|assistant|>\n is longer than the bare prompt
    assert result.usage["prompt_tokens"] > len(["hello"])
    assert result.finish_reason in ("length", "stop")


def test_stop_strings_end_the_answer_before_the_stop_text(make_manager):
    manager = make_manager()
    full = manager.generate("Beautiful is", model=TINY, max_tokens=20).text
    stop = full[3:6]
    cut = manager.generate("Beautiful is", model=TINY, max_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_two_requests_for_an_unloaded_model_start_one_load(make_manager):
    spawn = SpawnSpy()
    manager = make_manager(warm_spare=False, spawn=spawn)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(manager.generate("a", model=TINY, max_tokens=2)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    assert spawn.models == [TINY]


def test_status_shows_ready_idle_model_with_its_deadline(make_manager):
    manager = make_manager(idle_timeout=120)
    before = time.time()
    manager.load(TINY)
    (status,) = manager.status()
    assert status.id == TINY and status.state == "ready" and status.active_requests == 0
    assert pid_alive(status.pid)
    assert status.memory_bytes > 0
    assert status.keep_alive_s == 120
    assert before + 120 <= status.expires_at <= time.time() + 120


def test_expires_at_is_null_while_busy_and_set_when_the_lease_ends(make_manager):
    manager = make_manager(idle_timeout=60)
    stream = manager.stream_generate("x", model=TINY, max_tokens=50)
    next(stream)
    (busy,) = manager.status()
    assert busy.active_requests == 1 and busy.expires_at is None
    for _ in stream:
        pass
    (idle,) = manager.status()
    assert idle.active_requests == 0 and idle.expires_at is not None


def test_status_never_waits_behind_a_generation(make_manager):
    manager = make_manager()
    stream = manager.stream_generate("x", model=TINY, max_tokens=200)
    next(stream)  # the request holds its lease and the worker is mid-answer
    seen = []
    t = threading.Thread(target=lambda: seen.append((manager.status(), manager.health())))
    t.start()
    t.join(5)
    assert seen, "status() blocked while a generation was in flight"
    assert seen[0][0][0].active_requests == 1
    assert seen[0][1]["active_requests"] == 1
    stream.close()


def test_keep_alive_negative_never_expires_and_zero_unloads_after_the_request(make_manager):
    manager = make_manager(idle_timeout=300)
    manager.generate("x", model=TINY, max_tokens=2, keep_alive=-1)
    (status,) = manager.status()
    assert status.expires_at is None and status.keep_alive_s == -1
    manager.generate("x", model=TINY, max_tokens=2, keep_alive=0)
    assert wait_for(lambda: not manager.status(), timeout=5)


def test_idle_timeout_zero_keeps_models_forever(make_manager):
    manager = make_manager(idle_timeout=0)
    manager.load(TINY)
    (status,) = manager.status()
    assert status.expires_at is None


def test_lru_idle_model_is_evicted_to_make_room(make_manager, model_dir):
    manager = make_manager(max_loaded_models=2, model_dirs=[str(model_dir)])
    manager.load(TINY_A)
    manager.load(TINY_B)
    manager.generate("x", model=TINY_A, max_tokens=1)  # tiny-b is now least recently used
    manager.load(TINY)
    assert sorted(s.id for s in manager.status()) == [TINY, TINY_A]


def test_a_busy_model_is_never_evicted_and_the_waiter_gets_all_models_busy(make_manager, model_dir):
    manager = make_manager(max_loaded_models=1, model_dirs=[str(model_dir)], queue_timeout=1.5)
    stream = manager.stream_generate("x", model=TINY_A, max_tokens=LONG)
    next(stream)
    pid = manager.status()[0].pid
    with pytest.raises(AllModelsBusyError, match="slots stayed busy"):
        manager.load(TINY_B)
    (status,) = manager.status()
    assert status.id == TINY_A and status.pid == pid and status.state == "ready"
    assert next(stream).finish_reason is None, "the busy model kept streaming"
    stream.close()
    manager.load(TINY_B)
    assert [s.id for s in manager.status()] == [TINY_B]


def test_a_waiting_request_for_another_model_is_served_before_later_requests_for_the_resident_one(
    make_manager, model_dir
):
    manager = make_manager(max_loaded_models=1, model_dirs=[str(model_dir)], queue_timeout=60)
    busy = manager.stream_generate("x", model=TINY_A, max_tokens=LONG)
    next(busy)  # tiny-a is busy and holds the only slot
    order = []

    def ask(model):
        manager.generate("x", model=model, max_tokens=2)
        order.append(model)

    b = threading.Thread(target=ask, args=(TINY_B,))
    b.start()
    assert wait_for(lambda: len(manager._registry.waiters) == 1, timeout=10)
    late_a = threading.Thread(target=ask, args=(TINY_A,))
    late_a.start()
    # Without arrival order, this later request would take a lease on the resident
    # tiny-a at once and keep it busy: a steady stream of them starves tiny-b.
    late_a.join(1.5)
    assert order == [], "a later request for the resident model jumped the queue"
    busy.close()
    b.join(30)
    late_a.join(30)
    assert order == [TINY_B, TINY_A]


def test_memory_limit_counts_loads_before_they_start(make_manager, model_dir):
    manager = make_manager(max_loaded_models=5, model_dirs=[str(model_dir)])
    size = manager.resolver.resolve(TINY_A).size_bytes
    manager.settings.memory_limit = int(size * 1.5)  # room for one tiny model, not two
    manager.load(TINY_A)
    manager.load(TINY_B)
    assert [s.id for s in manager.status()] == [TINY_B]
    manager.settings.memory_limit = size // 2
    with pytest.raises(MemoryLimitError, match="memory_limit"):
        manager.load(TINY_A)


def test_unload_stops_the_worker_and_unknown_unload_is_a_clear_error(make_manager):
    manager = make_manager()
    pid = manager.load(TINY).pid
    manager.unload(TINY)
    assert manager.status() == []
    assert wait_for(lambda: not pid_alive(pid), timeout=5)
    with pytest.raises(ModelNotFoundError, match="not loaded") as info:
        manager.unload(TINY)
    assert (info.value.model, info.value.loaded) == (TINY, []), "the data a front end renders its hint from"


def test_unload_waits_for_in_flight_requests_to_drain(make_manager):
    manager = make_manager()
    stream = manager.stream_generate("x", model=TINY, max_tokens=40)
    next(stream)
    done = threading.Event()
    t = threading.Thread(target=lambda: (manager.unload(TINY), done.set()))
    t.start()
    assert wait_for(lambda: manager.status()[0].state == "draining", timeout=5)
    assert not done.is_set()
    second_unload = []  # a second unload of a draining model waits with the first
    second = threading.Thread(target=lambda: second_unload.append(manager.unload(TINY).state))
    second.start()
    rest = list(stream)
    assert rest[-1].finish_reason == "length", "the draining request finished normally"
    t.join(10)
    second.join(10)
    assert done.is_set() and second_unload == ["draining"] and manager.status() == []
    # a new request loads a fresh worker instead of reviving the drained one
    assert manager.generate("x", model=TINY, max_tokens=1).finish_reason == "length"


def test_a_ping_during_a_stream_is_answered_without_taking_the_streams_text(make_manager):
    manager = make_manager()
    expected = manager.generate("Beautiful is", model=TINY, max_tokens=40).text
    stream = manager.stream_generate("Beautiful is", model=TINY, max_tokens=40)
    text = [next(stream).text]
    rtts = [manager.ping(TINY) for _ in range(5)]
    text += [c.text for c in stream]
    assert all(rtt is not None for rtt in rtts)
    assert "".join(text) == expected


def test_a_lock_held_past_the_watchdog_threshold_turns_health_degraded_until_it_is_released(make_manager, caplog):
    manager = make_manager(watchdog_threshold=0.2)
    assert manager.health()["status"] == "ok"
    held, release = threading.Event(), Latch()  # Latch: it waits holding the lock, on purpose

    def hold_the_activity_lock():
        with manager._registry.activity_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_activity_lock, name="stuck-holder")
    with caplog.at_level("ERROR", logger="mlx_jupyter.engine.locks"):
        holder.start()
        assert held.wait(10)
        assert wait_for(lambda: manager.degraded, timeout=5)
    assert "activity_lock held by stuck-holder" in manager.degraded
    assert "hold_the_activity_lock" in caplog.text, "the holder's stack was logged"
    release.set()
    holder.join(10)
    assert wait_for(lambda: manager.health()["status"] == "ok", timeout=5), "degraded outlived its cause"
    assert manager.health()["degraded_reason"] is None


def test_a_claim_ends_when_its_request_evicts_another_model_instead(make_manager, model_dir):
    loading, gate = threading.Event(), threading.Event()

    def slow_spawn(model):
        if model == TINY:
            loading.set()
            gate.wait(30)

    spawn = SpawnSpy(before=slow_spawn)
    manager = make_manager(
        max_loaded_models=2, model_dirs=[str(model_dir)], queue_timeout=5, warm_spare=False, spawn=spawn
    )
    manager.load(TINY_A)
    manager.load(TINY_B)
    busy_a = manager.stream_generate("x", model=TINY_A, max_tokens=LONG)
    next(busy_a)  # tiny-a is the least recently used busy model: the one a waiter claims
    busy_b = manager.stream_generate("x", model=TINY_B, max_tokens=LONG)
    next(busy_b)
    third = threading.Thread(target=manager.load, args=(TINY,))
    third.start()
    assert wait_for(lambda: len(manager._registry.waiters) == 1, timeout=10)
    busy_b.close()  # the waiter evicts idle tiny-b instead and starts loading
    assert loading.wait(10)
    busy_a.close()
    try:
        assert manager.generate("x", model=TINY_A, max_tokens=2).finish_reason == "length"
    finally:
        gate.set()
        third.join(30)
