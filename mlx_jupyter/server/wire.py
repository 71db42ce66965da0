"""Wire formats: how each API writes an answer — its chunks, its end, a whole answer, an error."""

from __future__ import annotations

import time
import uuid
from typing import Any

from mlx_jupyter import sse
from mlx_jupyter.engine.types import GenerationChunk
from mlx_jupyter.server.base import APIError, error_body


class Wire:
    """One API's shape of an answer, for ``GenerationHandler.answer``.

    ``chunk`` gives the event data of a text chunk (None: nothing to send), ``final`` the
    events that end a stream, ``whole`` the JSON of an answer not streamed, ``error`` the
    event of an error mid-stream (data and event name), and ``terminator`` the stream's
    last event, if the API has one.
    """

    terminator: str | None = None

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, chunk: GenerationChunk, first: bool) -> Any | None:
        raise NotImplementedError

    def final(self, chunk: GenerationChunk, first: bool) -> list[Any]:
        raise NotImplementedError

    def whole(self, text: str, final: GenerationChunk) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, error: APIError) -> tuple[Any, str | None]:
        return error_body(error), None


class NativeWire(Wire):
    """``POST mlx/api/generate``: ``{"text"}`` events, then the engine's final event; errors as ``event: error``."""

    def chunk(self, chunk: GenerationChunk, first: bool) -> Any | None:
        return chunk.event(self.model)

    def final(self, chunk: GenerationChunk, first: bool) -> list[Any]:
        return [chunk.event(self.model)]

    def whole(self, text: str, final: GenerationChunk) -> dict[str, Any]:
        event = final.event(self.model)
        return {key: event[key] for key in ("model", "finish_reason", "usage", "timings")} | {"text": text}

    def error(self, error: APIError) -> tuple[Any, str | None]:
        return error_body(error), "error"


class OpenAIWire(Wire):
    """OpenAI's completion shapes: a head (id, object, model, created) on every chunk, ``[DONE]`` last."""

    terminator = sse.DONE
    prefix = ""  # of the id
    kind = ""  # the object type of a whole answer

    def __init__(self, model: str, stream: bool, include_usage: bool = False) -> None:
        super().__init__(model)
        self.include_usage = include_usage
        self.head = {
            "id": f"{self.prefix}-{uuid.uuid4().hex}",
            "object": self.kind + (".chunk" if stream and self.prefix == "chatcmpl" else ""),
            "model": model,
            "created": int(time.time()),
        }

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, chunk: GenerationChunk, first: bool) -> Any | None:
        if not (chunk.text or first):
            return None
        return self.head | {"choices": [self.choice(chunk.text, None, first)]}

    def final(self, chunk: GenerationChunk, first: bool) -> list[Any]:
        events = [self.head | {"choices": [self.choice(chunk.text, chunk.finish_reason, first)]}]
        if self.include_usage:
            events.append(self.head | {"choices": [], "usage": chunk.usage})
        return events


class ChatWire(OpenAIWire):
    """``POST mlx/v1/chat/completions``."""

    prefix = "chatcmpl"
    kind = "chat.completion"

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, final: GenerationChunk) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
        return self.head | {"choices": [choice], "usage": final.usage}


class CompletionWire(OpenAIWire):
    """``POST mlx/v1/completions``."""

    prefix = "cmpl"
    kind = "text_completion"

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, final: GenerationChunk) -> dict[str, Any]:
        return self.head | {"choices": [self.choice(text, final.finish_reason, True)], "usage": final.usage}
