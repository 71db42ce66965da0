"""Bridge an engine stream, which blocks, to the server's event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from mlx_jupyter.engine.generation import GenerationStream
from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.types import GenerationChunk


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
