"""Wire formats: how each API writes an answer — its chunks, its end, a whole answer, an error."""

from __future__ import annotations

import codecs
import time
import uuid
from typing import Any

from mlx_jupyter import sse
from mlx_jupyter.engine.types import GenerationChunk, GenerationResult
from mlx_jupyter.server.base import APIError, error_body


class Wire:
    """One API's shape of an answer, for ``GenerationHandler.answer``.

    ``chunk`` gives the event data of a chunk (None: nothing to send), ``final`` the
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

    def whole(self, answer: GenerationResult) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, error: APIError) -> tuple[Any, str | None]:
        return error_body(error), None


class NativeWire(Wire):
    """``POST mlx/api/generate``: ``{"text"}`` events, then the engine's final event; errors as ``event: error``."""

    def chunk(self, chunk: GenerationChunk, first: bool) -> Any | None:
        return chunk.event(self.model)

    def final(self, chunk: GenerationChunk, first: bool) -> list[Any]:
        return [chunk.event(self.model)]

    def whole(self, answer: GenerationResult) -> dict[str, Any]:
        whole = {"model": self.model, "text": answer.text, "finish_reason": answer.finish_reason}
        whole |= {"usage": answer.usage, "timings": answer.timings}
        return whole if answer.logprobs is None else whole | {"logprobs": answer.logprobs}

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

    def logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """A choice's ``logprobs`` in this API's shape; ``None`` when the request asked for none."""
        raise NotImplementedError

    def chunk(self, chunk: GenerationChunk, first: bool) -> Any | None:
        if not (chunk.text or chunk.logprobs or first):
            return None
        choice = self.choice(chunk.text, None, first) | {"logprobs": self.logprobs(chunk.logprobs)}
        return self.head | {"choices": [choice]}

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

    def logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        # The engine's entries are OpenAI's chat entries: token, logprob, bytes, top_logprobs.
        return None if entries is None else {"content": entries, "refusal": None}

    def whole(self, answer: GenerationResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "logprobs": self.logprobs(answer.logprobs)}
        choice["finish_reason"] = answer.finish_reason
        return self.head | {"choices": [choice], "usage": answer.usage}


class CompletionWire(OpenAIWire):
    """``POST mlx/v1/completions``."""

    prefix = "cmpl"
    kind = "text_completion"

    def __init__(self, model: str, stream: bool, include_usage: bool = False) -> None:
        super().__init__(model, stream, include_usage)
        # text_offset counts characters of the answer; a token may end inside one.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def choice(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """The legacy shape: parallel lists of tokens, their log probabilities, alternatives and offsets."""
        if entries is None:
            return None
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(bytes(e["bytes"])))
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def whole(self, answer: GenerationResult) -> dict[str, Any]:
        choice = self.choice(answer.text, answer.finish_reason, True) | {"logprobs": self.logprobs(answer.logprobs)}
        return self.head | {"choices": [choice], "usage": answer.usage}
