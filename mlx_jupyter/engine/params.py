"""Validation of generation requests and keep-alive durations, done before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlx_jupyter.engine.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from Ollama's keep_alive: ``"10m"``, ``"1h30m"``, ``"30s"`` or a number.

    Negative means never unload, ``0`` unload right after the request, ``None`` (absent)
    means the manager's ``idle_timeout``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"keep_alive must be a duration such as '5m' or seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise InvalidRequestError(
                    f"keep_alive {value!r} is not a duration: use seconds or forms like '30s', '10m', '1h30m', '-1'"
                ) from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise InvalidRequestError(f"keep_alive must be a duration such as '5m' or seconds, not {type(value).__name__}")
    if not math.isfinite(seconds):
        raise InvalidRequestError(f"keep_alive {value!r} is not a finite duration")
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


def _number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidRequestError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not (lo <= value <= hi) or (not integer and not math.isfinite(value)):
        raise InvalidRequestError(f"{name} must be between {lo:g} and {hi:g}, not {value!r}")
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
                f"messages[{i}].role {m.get('role')!r} is not supported: use one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


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
) -> GenerationRequest:
    """Check every parameter; raises InvalidRequestError naming the first bad one."""
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequestError(f"model must be a non-empty string, not {model!r}")
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give exactly one of prompt or messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise InvalidRequestError("prompt must be a non-empty string")
    msgs = _messages(messages) if messages is not None else None
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequestError("stop must be a non-empty string or a list of them")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        messages=msgs,
        max_tokens=_number("max_tokens", max_tokens, 1, max_tokens_limit, integer=True),
        temperature=float(_number("temperature", temperature, 0.0, 100.0)),
        top_p=float(_number("top_p", top_p, 0.0, 1.0)),
        seed=None if seed is None else _number("seed", seed, 0, 2**63 - 1, integer=True),
        stop=list(stop or []),
        keep_alive=parse_keep_alive(keep_alive),
    )
