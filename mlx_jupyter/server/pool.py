"""The request pool: threads for engine calls, admitted on the event loop with a bound on the wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from tornado import web

from mlx_jupyter.server.base import APIError


class ClientLeft(web.Finish):
    """The client closed its connection while its request waited: it ends unanswered, counted as 499."""


class RequestPool:
    """``threads`` threads for load, unload and generate calls (a stream holds one to its end).

    A request runs only once it is admitted to a free thread, so the executor's own queue,
    which has no bound and cannot forget a request, stays empty. Admission waits on the
    event loop, first come first served, for ``queue_timeout`` at most, and gives up as
    soon as the client leaves. Every field is touched on the event loop only: a thread
    that finishes hands its release to the loop.
    """

    def __init__(self, threads: int, queue_timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.threads = threads
        self.queue_timeout = queue_timeout
        self._loop = loop
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mlx-request")
        self._free = threads
        self._turns: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> int:
        """Threads running (or handed to) an admitted request."""
        return self.threads - self._free

    @property
    def waiting(self) -> int:
        """Requests waiting for a thread."""
        return len(self._turns)

    async def admit(self, client_left: asyncio.Event) -> Slot:
        """A thread for one call; 503 after ``queue_timeout``; ``ClientLeft`` once the client has gone."""
        if client_left.is_set():
            raise ClientLeft()
        if self._free and not self._turns:
            self._free -= 1
            return Slot(self)
        turn = self._loop.create_future()
        self._turns.append(turn)
        left = asyncio.ensure_future(client_left.wait())
        admitted = False
        try:
            await asyncio.wait((turn, left), timeout=self.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
            admitted = turn.done() and not client_left.is_set()
        finally:
            left.cancel()
            if turn.done() and not admitted:  # handed a thread it will not use
                self._release()
            elif not turn.done():
                self._turns.remove(turn)
                turn.cancel()
        if admitted:
            return Slot(self)
        if client_left.is_set():
            raise ClientLeft()
        raise APIError(
            503,
            f"all {self.threads} request threads stayed busy for {self.queue_timeout:g}s (queue_timeout); "
            "each running stream holds one: retry later, or raise request_threads",
            "server_busy",
        )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        """On the loop: hand the thread to the first request still waiting, else free it."""
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _released_from(self, _: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(self._release)


class Slot(Executor):
    """An admitted request's thread, as an executor for one call; the thread returns when it ends."""

    def __init__(self, pool: RequestPool) -> None:
        self._pool: RequestPool | None = pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        pool, self._pool = self._pool, None
        if pool is None:
            raise RuntimeError("a request slot runs one call")
        future = pool._executor.submit(fn, *args, **kwargs)
        future.add_done_callback(pool._released_from)
        return future
