"""Validation of generation requests and keep-alive durations, done before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlx_jupyter.engine.errors import InvalidRequestError, PromptTooLargeError

ROLES = ("system", "user", "assistant")
# Go's duration units, as Ollama's keep_alive takes them.
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
_KEEP_ALIVE = re.compile(rf"([+-]?)((?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+|{_NUMBER}(?:e[+-]?\d+)?)")
# A keep_alive this long or longer means "never unload", as a negative one does: no
# deadline that far away is meant as a deadline, and it keeps every wait finite.
KEEP_ALIVE_FOREVER_S = 10 * 365 * 86400.0
# What one request may cost every other request on its model: the stop strings are
# matched against the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from Ollama's keep_alive: ``"10m"``, ``"1h30m"``, ``"30s"`` or a number.

    Negative means never unload, and so does anything of ``KEEP_ALIVE_FOREVER_S`` (ten
    years) or more (returned as ``-1.0``); ``0`` unloads right after the request; ``None``
    (absent) means the manager's ``idle_timeout``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"keep_alive must be a duration such as '5m' or seconds, not {value!r}")
    if isinstance(value, int):
        seconds = float(min(max(value, -1), KEEP_ALIVE_FOREVER_S))  # a 5,000-digit int is no float
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        match = _KEEP_ALIVE.fullmatch(value.strip().lower())
        if match is None:
            raise InvalidRequestError(
                f"keep_alive {value[:40]!r} is not a duration: use seconds or forms like '30s', '10m', '1h30m', '-1'"
            )
        sign, body = match.groups()
        parts = _DURATION.findall(body)
        magnitude = sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else float(body)
        seconds = -magnitude if sign == "-" else magnitude
    else:
        raise InvalidRequestError(f"keep_alive must be a duration such as '5m' or seconds, not {type(value).__name__}")
    if math.isnan(seconds):
        raise InvalidRequestError(f"keep_alive {value!r} is not a duration")
    if seconds < 0 or seconds >= KEEP_ALIVE_FOREVER_S:
        return -1.0
    return seconds


@dataclass
class GenerationRequest:
    """A validated request. Args: model (None = default), prompt or messages, sampling
    parameters, stop strings and keep_alive in seconds (None = idle_timeout)."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    keep_alive: float | None = None

    def worker_message(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }


def _show(value: Any) -> str:
    """A short repr for an error message (a 5,000-digit integer has no repr at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidRequestError(f"{name} must be {'an integer' if integer else 'a number'}, not {_show(value)}")
    if not (lo <= value <= hi) or (not integer and not math.isfinite(value)):
        raise InvalidRequestError(f"{name} must be between {lo:g} and {hi:g}, not {_show(value)}")
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role {_show(m.get('role'))} is not supported: use one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    longest = max(len(s) for s in stop) if stop else 0
    if longest > MAX_STOP_CHARS:
        raise InvalidRequestError(f"a stop string is {longest} characters long; the limit is {MAX_STOP_CHARS}")
    return list(stop)


def validate_request(
    *,
    model: str | None = None,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    keep_alive: Any = None,
    max_tokens_limit: int = 1_000_000,
    max_prompt_chars: int = 1_000_000,
) -> GenerationRequest:
    """Check every parameter; raises InvalidRequestError naming the first bad one."""
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequestError(f"model must be a non-empty string, not {_show(model)}")
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give exactly one of prompt or messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise InvalidRequestError("prompt must be a non-empty string")
    msgs = _messages(messages) if messages is not None else None
    chars = len(prompt) if prompt is not None else sum(len(m["content"]) for m in msgs or ())
    if chars > max_prompt_chars:
        raise PromptTooLargeError(f"the prompt is {chars} characters; the limit is {max_prompt_chars}")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        messages=msgs,
        max_tokens=_number("max_tokens", max_tokens, 1, max_tokens_limit, integer=True),
        temperature=float(_number("temperature", temperature, 0.0, 100.0)),
        top_p=float(_number("top_p", top_p, 0.0, 1.0)),
        seed=None if seed is None else _number("seed", seed, 0, 2**63 - 1, integer=True),
        stop=_stops(stop),
        keep_alive=parse_keep_alive(keep_alive),
    )
