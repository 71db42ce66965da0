"""Admission as a pure function: arrival order, LRU eviction, claims and the memory bound, without processes."""

from __future__ import annotations

import pytest

from mlx_jupyter.engine.admission import Decision, Resident, decide
from mlx_jupyter.engine.errors import MemoryLimitError

MB = 1 << 20


def resident(model, state="ready", leases=0, last_used=0.0, claimed_by=None, memory=MB):
    return Resident(model, state, leases, last_used, claimed_by, memory)


def ask(seq=1, model="b", size=MB, resident_=(), waiting=None, max_loaded=2, memory_limit=0):
    waiting = [(seq, model)] if waiting is None else waiting
    return decide(seq, model, size, list(resident_), waiting, max_loaded, memory_limit)


def test_a_ready_model_is_granted_and_a_starting_one_is_waited_for():
    assert ask(model="a", resident_=[resident("a")]) == Decision("grant")
    assert ask(model="a", resident_=[resident("a", state="starting")]) == Decision("wait")


def test_a_model_that_fits_is_loaded():
    assert ask(resident_=[resident("a")]) == Decision("load")


def test_the_least_recently_used_idle_model_is_evicted_when_the_slots_are_full():
    full = [resident("a", last_used=5.0), resident("c", last_used=1.0)]
    assert ask(resident_=full) == Decision("evict", "c")


def test_a_busy_model_is_never_evicted_it_is_claimed_and_the_request_waits():
    busy = [resident("a", leases=1, last_used=1.0), resident("c", leases=2, last_used=5.0)]
    assert ask(resident_=busy) == Decision("claim", "a")
    claimed = [resident("a", leases=1, last_used=1.0, claimed_by=1), resident("c", leases=2, last_used=5.0)]
    assert ask(resident_=claimed) == Decision("wait"), "one claim per request"
    idle_now = [resident("a", leases=0, last_used=1.0, claimed_by=1), resident("c", leases=2, last_used=5.0)]
    assert ask(resident_=idle_now) == Decision("evict", "a"), "the claimed model makes room once idle"


def test_a_model_claimed_by_an_earlier_request_takes_no_later_lease():
    claimed = [resident("a", claimed_by=1), resident("c")]
    assert ask(seq=2, model="a", resident_=claimed, waiting=[(1, "b"), (2, "a")]) == Decision("wait")
    assert ask(seq=0, model="a", resident_=claimed, waiting=[(0, "a"), (1, "b")]) == Decision("grant")


def test_requests_needing_a_slot_are_served_in_arrival_order():
    full = [resident("a"), resident("c")]
    waiting = [(1, "b"), (2, "d")]
    assert ask(seq=2, model="d", resident_=full, waiting=waiting) == Decision("wait")
    assert ask(seq=1, model="b", resident_=full, waiting=waiting) == Decision("evict", "a")


def test_a_model_an_earlier_request_waits_for_is_not_evicted():
    full = [resident("a", last_used=1.0), resident("c", last_used=5.0)]
    # Request 0, ahead of this one, is about to lease idle "a": it is not evicted under it.
    waiting = [(0, "a"), (1, "b")]
    assert ask(seq=1, model="b", resident_=full, waiting=waiting) == Decision("evict", "c")


def test_draining_and_stopping_models_count_against_the_slots_but_are_never_victims():
    leaving = [resident("a", state="stopping"), resident("c", state="draining", leases=1)]
    assert ask(resident_=leaving) == Decision("wait")


def test_the_memory_limit_counts_what_is_resident_and_refuses_a_model_that_can_never_fit():
    assert ask(size=3 * MB, resident_=[resident("a", memory=2 * MB)], memory_limit=4 * MB) == Decision("evict", "a")
    assert ask(size=2 * MB, resident_=[resident("a", memory=2 * MB)], memory_limit=4 * MB) == Decision("load")
    with pytest.raises(MemoryLimitError, match="needs 5242880 bytes but memory_limit is 4194304"):
        ask(size=5 * MB, memory_limit=4 * MB)
