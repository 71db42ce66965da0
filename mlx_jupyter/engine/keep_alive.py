"""keep_alive: Ollama's durations (``"10m"``, ``"1h30m"``, seconds) read as seconds."""

from __future__ import annotations

import math
import re
from typing import Any

from mlx_jupyter.engine.errors import InvalidRequestError

# Go's duration units, as Ollama's keep_alive takes them.
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
_KEEP_ALIVE = re.compile(rf"([+-]?)((?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+|{_NUMBER}(?:e[+-]?\d+)?)")
# A keep_alive this long or longer means "never unload", as a negative one does: no
# deadline that far away is meant as a deadline, and it keeps every wait finite.
KEEP_ALIVE_FOREVER_S = 10 * 365 * 86400.0


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from Ollama's keep_alive: ``"10m"``, ``"1h30m"``, ``"30s"`` or a number.

    Negative means never unload, and so does anything of ``KEEP_ALIVE_FOREVER_S`` (ten
    years) or more (returned as ``-1.0``); ``0`` unloads right after the request; ``None``
    (absent) means the manager's ``idle_timeout``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(
            f"keep_alive must be a duration such as '5m' or seconds, not {value!r}", param="keep_alive"
        )
    if isinstance(value, int):
        seconds = float(min(max(value, -1), KEEP_ALIVE_FOREVER_S))  # a 5,000-digit int is no float
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        match = _KEEP_ALIVE.fullmatch(value.strip().lower())
        if match is None:
            raise InvalidRequestError(
                f"keep_alive {value[:40]!r} is not a duration: use seconds or forms like '30s', '10m', '1h30m', '-1'",
                param="keep_alive",
            )
        sign, body = match.groups()
        parts = _DURATION.findall(body)
        magnitude = sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else float(body)
        seconds = -magnitude if sign == "-" else magnitude
    else:
        raise InvalidRequestError(
            f"keep_alive must be a duration such as '5m' or seconds, not {type(value).__name__}", param="keep_alive"
        )
    if math.isnan(seconds):
        raise InvalidRequestError(f"keep_alive {value!r} is not a duration", param="keep_alive")
    if seconds < 0 or seconds >= KEEP_ALIVE_FOREVER_S:
        return -1.0
    return seconds
