"""The words every view uses for a model's state and idle countdown (the panel's, in logic.ts, match)."""

from __future__ import annotations

import math
from typing import Any

# labextension/src/logic.ts says the same for the JupyterLab panel, its status bar and the
# notebook widget; tests/labels.json holds the cases both must meet.


def state_kind(status: dict[str, Any]) -> str:
    """``loading``, ``busy``, ``idle`` or ``unloading``, from a status of ``GET mlx/api/models``."""
    state = status.get("state")
    if state == "starting":
        return "loading"
    if state != "ready":
        return "unloading"  # draining, stopping
    return "busy" if status.get("active_requests") else "idle"


def state_label(status: dict[str, Any]) -> str:
    """The state: ``loading``, ``busy (N requests)``, ``idle`` or ``unloading``."""
    kind = state_kind(status)
    if kind == "busy":
        n = status["active_requests"]
        return f"busy ({n} request{'' if n == 1 else 's'})"
    return kind


def format_duration(seconds: float) -> str:
    """Seconds as ``m:ss``, or ``h:mm:ss`` from an hour; rounded up, negative counts as zero."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def countdown_text(status: dict[str, Any], now: float) -> str:
    """An idle model's countdown (``unloads in 4:59``, ``unloading now``, ``kept loaded``); else empty."""
    if state_kind(status) != "idle":
        return ""
    expires_at = status.get("expires_at")
    if expires_at is None:
        return "kept loaded"
    left = expires_at - now
    return f"unloads in {format_duration(left)}" if left > 0 else "unloading now"
