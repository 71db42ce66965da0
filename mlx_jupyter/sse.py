"""Server-Sent Events: one event written for the wire, and the events of a response read back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

# The last event of an OpenAI stream: sent as written, not as JSON.
DONE = "[DONE]"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the spec's line ends; a data line cannot hold one

__all__ = ["DONE", "ServerSentEvent", "comment", "encode", "events", "parse"]


def encode(data: Any, event: str | None = None) -> str:
    """One event: ``data`` as JSON (a string as written, such as ``DONE``), named ``event`` if given."""
    text = data if isinstance(data, str) else json.dumps(data)
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in _LINE_BREAK.split(text)]
    return "\n".join(lines) + "\n\n"


def comment(text: str) -> str:
    """A line every client ignores: keeps a quiet stream's connection known to be alive."""
    return f": {text}\n\n"


def events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    """The events of a ``text/event-stream`` response as they arrive (httpx-sse's decoder).

    An event without data is skipped, as the spec says; an unnamed one is a ``message``.
    Raises ``httpx_sse.SSEError`` when the response is not an event stream.
    """
    return (event for event in EventSource(response).iter_sse() if event.data)


def parse(body: bytes | str) -> list[ServerSentEvent]:
    """The events of a whole ``text/event-stream`` body."""
    content = body.encode() if isinstance(body, str) else body
    return list(events(httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=content)))
