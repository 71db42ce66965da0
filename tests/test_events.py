"""The event hub's diff: which change of a model's status becomes which event of mlx/api/events."""

from __future__ import annotations

from mlx_jupyter.engine.types import ModelStatus
from mlx_jupyter.server import events


def status(state: str = "ready", active: int = 0, expires: float | None = None, model: str = "m") -> ModelStatus:
    return ModelStatus(
        id=model,
        state=state,
        pid=123,
        active_requests=active,
        memory_bytes=1000,
        loaded_at=1.0,
        last_used_at=2.0,
        keep_alive_s=300.0,
        expires_at=expires,
    )


def kinds(before: dict[str, ModelStatus], after: dict[str, ModelStatus]) -> list[tuple[str, str]]:
    return [(e["type"], e["model"]["id"]) for e in events.diff(before, after)]


def test_events_diff_a_new_starting_model_is_load():
    new = status("starting")
    assert events.diff({}, {"m": new}) == [{"type": "load", "model": new.to_dict()}]


def test_events_diff_starting_to_ready_is_ready():
    assert kinds({"m": status("starting")}, {"m": status("ready")}) == [("ready", "m")]


def test_events_diff_a_lease_taken_is_busy_and_released_is_idle_with_the_new_expiry():
    idle, leased = status(expires=100.0), status(active=1)
    assert kinds({"m": idle}, {"m": leased}) == [("busy", "m")]
    released = status(expires=400.0)
    (event,) = events.diff({"m": leased}, {"m": released})
    assert event["type"] == "idle"
    assert event["model"]["expires_at"] == 400.0


def test_events_diff_a_new_expiry_on_an_idle_model_is_idle_and_no_change_is_nothing():
    assert kinds({"m": status(expires=100.0)}, {"m": status(expires=700.0)}) == [("idle", "m")]
    assert events.diff({"m": status(expires=100.0)}, {"m": status(expires=100.0)}) == []
    assert events.diff({"m": status(active=2)}, {"m": status(active=3)}) == [], "still busy: nothing new"


def test_events_diff_a_busy_model_draining_is_unloading_and_a_vanished_model_is_unload():
    assert kinds({"m": status(active=1)}, {"m": status("draining", active=1)}) == [("unloading", "m")]
    old = status("stopping")
    assert events.diff({"m": old}, {}) == [{"type": "unload", "model": old.to_dict()}]


def test_events_diff_an_idle_model_stopping_is_only_unloading():
    # Unload, idle reap and eviction all take an idle model (expires_at set) to stopping
    # and clear expires_at in one step: that is one "unloading", not also an "idle".
    before, after = status(expires=100.0), status("stopping")
    assert kinds({"m": before}, {"m": after}) == [("unloading", "m")]


def test_events_diff_reports_each_model_on_its_own():
    before = {"a": status(model="a", expires=1.0), "b": status("starting", model="b")}
    after = {"b": status(model="b"), "c": status("starting", model="c")}
    assert sorted(kinds(before, after)) == [("load", "c"), ("ready", "b"), ("unload", "a")]
