"""The checks of a request's fields: each gives the field's value or raises InvalidRequestError naming it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_jupyter.engine.errors import InvalidRequestError
from mlx_jupyter.engine.keep_alive import parse_keep_alive

ROLES = ("system", "user", "assistant")
# What one request may cost every other request on its model: the stop strings are
# matched against the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


# The largest max_tokens when the host sets no bound of its own: the model's context bounds it.
MAX_TOKENS_CEILING = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """The host's bounds on a request. Args: max_tokens (0 = only the model's context), max_prompt_chars."""

    max_tokens: int = 0
    max_prompt_chars: int = 1_000_000

    @property
    def max_tokens_bound(self) -> int:
        return self.max_tokens or MAX_TOKENS_CEILING


Check = Callable[[str, Any, Limits], Any]


def show(value: Any) -> str:
    """A short repr for an error message (a 5,000-digit integer has no repr at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(lo: float, hi: float | None = None, *, integer: bool = False) -> Check:
    def check(name: str, value: Any, limits: Limits) -> Any:
        top = limits.max_tokens_bound if hi is None else hi
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InvalidRequestError(
                f"{name} must be {'an integer' if integer else 'a number'}, not {show(value)}", param=name
            )
        if not (lo <= value <= top) or (not integer and not math.isfinite(value)):
            limit = top if value > top else lo
            shown = value if abs(value) < 2**53 else None  # JSON keeps a number exact only so far
            raise InvalidRequestError(
                f"{name} must be between {lo:g} and {top:g}, not {show(value)}", param=name, limit=limit, value=shown
            )
        return value if integer else float(value)

    return check


def model_id(name: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"model must be a non-empty string, not {show(value)}", param=name)
    return value


def prompt(name: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("prompt must be a non-empty string", param=name)
    return value


def messages(name: str, value: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects", param=name)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'content'", param=name)
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role {show(m.get('role'))} is not supported: use one of {', '.join(ROLES)}", param=name
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def stops(name: str, value: Any, limits: Limits) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop must be a non-empty string or a list of them", param=name)
    _at_most(name, len(stops), MAX_STOP_STRINGS, f"{name} has {len(stops)} strings")
    longest = max((len(s) for s in stops), default=0)
    _at_most(name, longest, MAX_STOP_CHARS, f"a stop string is {longest} characters long")
    return list(stops)


def _at_most(name: str, count: int, limit: int, what: str) -> None:
    """Refuse ``count`` over ``limit``: the message says ``what`` and the limit."""
    if count > limit:
        raise InvalidRequestError(f"{what}; the limit is {limit}", param=name, limit=limit, value=count)


def flag(name: str, value: Any, limits: Limits) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, not {show(value)}", param=name)
    return value


MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOP_LOGPROBS = 20


def logit_bias(name: str, value: Any, limits: Limits) -> dict[int, float]:
    """``{token id: bias}``; ids come as JSON object keys (strings) or integers."""
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be an object of token id -> bias, not {show(value)}", param=name)
    _at_most(name, len(value), MAX_LOGIT_BIAS, f"{name} has {len(value)} entries")
    bias = number(-100.0, 100.0)
    out = {}
    for token, weight in value.items():
        token_id = _token_id(name, token)
        out[token_id] = bias(f"{name}[{token_id}]", weight, limits)
    return out


MAX_TOKEN_ID = 2**31 - 1  # what an mx.array of ids holds


def _token_id(name: str, token: Any) -> int:
    """A token id from a JSON object key (ASCII digits) or an integer."""
    digits = isinstance(token, str) and token.isascii() and token.isdigit() and len(token) <= 10
    if isinstance(token, bool) or not (isinstance(token, int) or digits):
        raise InvalidRequestError(f"{name} keys must be token ids (integers), not {show(token)}", param=name)
    if not 0 <= int(token) <= MAX_TOKEN_ID:
        raise InvalidRequestError(
            f"{name} names token {show(int(token))}; token ids are from 0 to {MAX_TOKEN_ID}",
            param=name,
            limit=MAX_TOKEN_ID,
        )
    return int(token)


def keep_alive(name: str, value: Any, limits: Limits) -> float | None:
    return parse_keep_alive(value)
