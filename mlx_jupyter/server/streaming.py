"""Answers streamed from the engine: the bridge from its blocking stream to the event loop, and the handler base."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from tornado.iostream import StreamClosedError

from mlx_jupyter import sse
from mlx_jupyter.engine.errors import MLXError
from mlx_jupyter.engine.generation import GenerationStream
from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.types import GenerationChunk, GenerationResult
from mlx_jupyter.server.base import APIError, MLXHandler
from mlx_jupyter.server.metrics import TOKENS, TTFT
from mlx_jupyter.server.wire import Wire


class ChunkBridge:
    """Iterates an engine stream on a pool thread and hands chunks to the event loop.

    The pool thread owns the stream: it alone advances and closes it, so closing it
    (which sends ``cancel`` to the worker and releases the lease) happens off the loop.
    ``cancel()`` reaches the stream at once, wherever it waits (for a model slot, a load,
    or a token that may carry no text); nothing here takes a lock.
    """

    def __init__(self, chunks: GenerationStream, executor: Executor) -> None:
        self._chunks = chunks
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = self._loop.run_in_executor(executor, self._pump)

    def cancel(self) -> None:
        self._cancelled.set()
        self._chunks.cancel()

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        try:
            while True:
                kind, item = await self._queue.get()
                if kind == "chunk":
                    yield item  # type: ignore[misc]
                elif kind == "error":
                    raise item  # type: ignore[misc]
                else:
                    return
        finally:
            self.cancel()

    async def wait_closed(self) -> None:
        """Until the pool thread has closed the engine stream (lease released)."""
        await asyncio.shield(self._done)

    def _put(self, kind: str, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop is closed: the server is gone
            self._cancelled.set()

    def _pump(self) -> None:
        try:
            for chunk in self._chunks:
                if self._cancelled.is_set():
                    break
                self._put("chunk", chunk)
        except BaseException as exc:
            self._put("error", exc)
        else:
            self._put("end", None)
        finally:
            assert_no_locks_held("closing a stream")
            self._chunks.close()


class GenerationHandler(MLXHandler):
    """The handler of an endpoint that generates: one answer, whole or as Server-Sent Events.

    Subclasses turn their body into an engine request and pick their API's ``Wire``; this
    runs the engine stream on a request thread and writes what the wire says. A client that
    leaves cancels the generation at once, wherever it is.
    """

    bridge: ChunkBridge | None = None
    wants_logprobs = False

    async def answer(self, request: dict[str, Any], stream: bool, wire: Wire) -> None:
        """Generate ``request`` (``GenerationRequest``'s fields) and write it in ``wire``'s shape."""
        first, rest = await self._start(request)
        if not stream:
            answer = await self._collect(first, rest)
            self._record_usage(answer)
            self.write_json(wire.whole(answer))
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        chunk, first_event = first, True
        try:
            while chunk.finish_reason is None:
                data = wire.chunk(chunk, first_event)
                if data is not None:
                    await self.send_event(data)
                    first_event = False
                chunk = await anext(rest)
            self._record_usage(chunk)
            for data in wire.final(chunk, first_event):
                await self.send_event(data)
        except StreamClosedError:
            self.bridge.cancel()
            return
        except MLXError as exc:
            await self.send_event(*wire.error(APIError.from_engine(exc)))
        if wire.terminator is not None:
            await self.send_event(wire.terminator)
        self.finish()

    async def send_event(self, data: Any, event: str | None = None) -> None:
        self.write(sse.encode(data, event))
        await self.flush()

    def on_connection_close(self) -> None:
        if self.bridge is not None:
            self.bridge.cancel()
        super().on_connection_close()

    async def _start(self, request: dict[str, Any]) -> tuple[GenerationChunk, AsyncIterator[GenerationChunk]]:
        """The first chunk (an engine error before it is still a plain HTTP error), and the rest."""
        try:  # the engine checks every field, the prompt's size included, before any work
            chunks = self.manager.stream_generate(**request)
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc
        self.model = chunks.model
        self.wants_logprobs = chunks.request.logprobs
        try:
            thread = await self.admit()
        except BaseException:
            chunks.close()
            raise
        self.bridge = ChunkBridge(chunks, thread)
        rest = aiter(self.bridge)
        try:
            return await anext(rest), rest
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc

    async def _collect(self, first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> GenerationResult:
        """The whole answer; an engine error mid-answer keeps its status."""
        try:
            chunks = [first, *[chunk async for chunk in rest]]
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc
        if chunks[-1].finish_reason is None:  # cancelled: the client left, and nothing is answered
            raise RuntimeError("the answer ended without its final chunk")
        return GenerationResult.of(self.model, chunks, self.wants_logprobs)

    def _record_usage(self, final: GenerationChunk | GenerationResult) -> None:
        model = self.model or self.manager.default_model
        if final.usage:
            TOKENS.labels(model).inc(final.usage.get("completion_tokens", 0))
        if final.timings and final.timings.get("ttft_s") is not None:
            TTFT.labels(model).observe(final.timings["ttft_s"])
