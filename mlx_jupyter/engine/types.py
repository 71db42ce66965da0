"""Response types of the engine's public API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationChunk:
    """One piece of a streamed answer.

    Args:
        text: the next segment of text (may be empty on the final chunk).
        finish_reason: ``None`` until the final chunk, then ``"stop"``, ``"length"``
            or ``"cancelled"``.
        usage: on the final chunk, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``.
        timings: on the final chunk, ``load_s``, ``ttft_s``, ``prompt_tps``,
            ``generation_tps``, ``peak_memory_bytes``.
        logprobs: when the request asked for them, one entry per token this chunk covers:
            ``{token, bytes, logprob, top_logprobs: [{token, bytes, logprob}, ...]}``. Text may be
            held back (a stop string, part of a character), so a chunk's entries need not spell its
            text; over the whole stream they are the answer's tokens in order.
    """

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] | None = None

    def event(self, model: str) -> dict[str, Any]:
        """This chunk as an event of a native stream (``POST mlx/api/generate``), as the REST API and
        the kernel's local engine send it: ``{"text"}`` (and ``logprobs``), and a last one with the
        answer's details."""
        if self.finish_reason is None:
            return {"text": self.text, "logprobs": self.logprobs} if self.logprobs else {"text": self.text}
        return {
            "model": model,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "timings": self.timings,
            "done": True,
        }


@dataclass
class GenerationResult:
    """A whole answer. Args: model, text, finish_reason, usage, timings (as on the final chunk),
    logprobs (every token's entry, as on the chunks; ``None`` when the request asked for none)."""

    model: str
    text: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, model: str, chunks: list[GenerationChunk], logprobs: bool) -> GenerationResult:
        """The answer ``chunks`` make: their text, the last chunk's details, and (if asked) every entry."""
        last = chunks[-1] if chunks else GenerationChunk("")
        return cls(
            model=model,
            text="".join(c.text for c in chunks),
            finish_reason=last.finish_reason or "length",
            usage=last.usage or {},
            timings=last.timings or {},
            logprobs=[e for c in chunks for e in c.logprobs or ()] if logprobs else None,
        )


@dataclass
class ModelStatus:
    """A snapshot of one resident model, the shape of ``GET mlx/api/models`` entries.

    Args:
        id: the model id.
        state: ``starting``, ``ready``, ``draining`` or ``stopping``.
        pid: the worker's process id (``None`` before it is spawned).
        active_requests: leases held by requests now.
        memory_bytes: model memory reported by the worker (the estimate while starting).
        loaded_at, last_used_at: epoch seconds.
        keep_alive_s: seconds the model stays after its last request; negative = forever.
        expires_at: epoch seconds of the idle unload; ``None`` while busy or kept forever.
    """

    id: str
    state: str
    pid: int | None
    active_requests: int
    memory_bytes: int
    loaded_at: float | None
    last_used_at: float | None
    keep_alive_s: float
    expires_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
