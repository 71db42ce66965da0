"""Log-probability entries of generated tokens: each token's text, its bytes and its likeliest alternatives."""

from __future__ import annotations

import math
from typing import Any

from mlx_jupyter.engine.token_text import TokenBytes

# What a token impossible after the penalties scores: JSON has no -Infinity, and OpenAI uses this.
FLOOR = -9999.0


def _text(raw: bytes) -> str:
    """A token's text: part of a UTF-8 character shows as ``\\xNN`` escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def entry(token: int, logprob: float, alternatives: list[tuple[int, float]], spell: TokenBytes) -> dict[str, Any]:
    """One generated token as the worker reports it: ``{token, bytes, logprob, top_logprobs}``."""
    raw = spell(token)
    return {
        "token": _text(raw),
        "bytes": list(raw),
        "logprob": _logprob(logprob),
        "top_logprobs": [
            {"token": _text(b := spell(t)), "bytes": list(b), "logprob": _logprob(lp)} for t, lp in alternatives
        ],
    }
