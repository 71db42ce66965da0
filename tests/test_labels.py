"""`%mlx list`, the notebook snapshot, the panel and the widget name a model's state and countdown in the same words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_jupyter.kernel.labels import countdown_text, state_label
from mlx_jupyter.kernel.render import loaded_table
from mlx_jupyter.kernel.widgets import ModelDashboard

# The same cases run against labextension/src/logic.ts in labextension/test/labels.test.ts.
CASES = json.loads((Path(__file__).parent / "labels.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['state']}-{c['countdown'] or 'none'}")
def test_state_and_countdown_words_match_the_shared_cases(case):
    assert state_label(case["status"]) == case["state"]
    assert countdown_text(case["status"], case["now"]) == case["countdown"]


def snapshot(**status) -> dict:
    model = {"id": "m", "pid": 1, "memory_bytes": 10**6, "loaded_at": 900, "last_used_at": 990, "keep_alive_s": 300}
    return {"server_time": 1001, "models": [{**model, **status}]}


def test_mlx_list_shows_the_state_once_and_the_countdown_in_panel_words():
    idle = loaded_table(snapshot(state="ready", active_requests=0, expires_at=1300))
    assert idle.splitlines()[2].split()[1:] == ["idle", "1", "1.0", "MB", "unloads", "in", "4:59"]
    busy = loaded_table(snapshot(state="ready", active_requests=1, expires_at=None))
    assert busy.splitlines()[2].split()[1:] == ["busy", "(1", "request)", "1", "1.0", "MB"]
    loading = loaded_table(snapshot(state="starting", active_requests=0, expires_at=None, pid=None, memory_bytes=0))
    assert loading.splitlines()[2].split()[1:] == ["loading", "-", "-"]  # no pid or memory yet, no countdown


class SnapshotHost:
    """A host that only answers with one snapshot: enough for the dashboard's static views."""

    host = "a test host"

    def __init__(self, models: dict) -> None:
        self._models = models

    def models(self) -> dict:
        return self._models

    def available(self) -> list:
        return []


def test_notebook_snapshot_uses_the_same_words():
    dashboard = ModelDashboard(SnapshotHost(snapshot(state="ready", active_requests=2, expires_at=None)))
    assert "<td>busy (2 requests)</td><td>1.0 MB</td><td></td>" in dashboard.snapshot_html()
    assert "busy (2 requests)" in dashboard.snapshot_text()
