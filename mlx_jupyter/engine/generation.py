"""GenerationStream: one answer being generated, with its token deadlines and its cancellation."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.errors import RequestCancelledError, WorkerTimeoutError, error_from_frame
from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.request import GenerationRequest
from mlx_jupyter.engine.types import GenerationChunk, GenerationResult

if TYPE_CHECKING:
    from mlx_jupyter.engine.manager import Lease, WorkerManager

# Put in a stream's frame queue by cancel(): wakes a consumer waiting for the next token.
_CANCEL: dict[str, Any] = {"type": "cancel"}


class _Holdings:
    """What a stream holds in the engine: a lease and a route for its request id.

    Released once, by the thread that ends the stream, or by the manager's janitor when
    the stream is dropped without being closed.
    """

    def __init__(self, manager: WorkerManager) -> None:
        self.manager = manager
        self.lease: Lease | None = None
        self.rid = ""
        self.ended = False  # the worker is done with rid: a done or error frame arrived
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        lease = self.lease
        if lease is None:
            return
        if self.rid:
            if not self.ended:
                lease.worker.cancel(self.rid)  # the consumer left early, or the worker hung
            lease.worker.close(self.rid)
        self.manager.leases.release(lease)


class GenerationStream(Iterator[GenerationChunk]):
    """An answer being generated: iterate it for text chunks, then a final chunk with
    ``finish_reason``, ``usage`` and ``timings``.

    Thread-safety: one thread iterates and closes the stream. ``cancel()`` may be called
    from any thread (a server's event loop when its client leaves) and takes no lock: it
    sets a flag and wakes the consumer wherever it waits — for a model slot (its ticket is
    withdrawn, nothing is evicted for it), for a load (the load may finish, no generation
    starts), or for the next token, whether or not the worker emits text (the cancel goes
    to the worker, whose last frame ends the stream with ``finish_reason="cancelled"``).
    ``close()`` cancels what is running and releases the lease at once. A stream dropped
    without ``close()`` hands that release to the manager's janitor thread: a finalizer
    may run in any thread, even one holding the engine's locks.
    """

    def __init__(self, manager: WorkerManager, request: GenerationRequest) -> None:
        self.request = request
        self.model = request.model or manager.default_model
        self._manager = manager
        self._cancelled = threading.Event()
        self._wakeup = threading.Event()  # the ticket's wakeup while it waits for a model
        self._frames: queue.SimpleQueue[dict[str, Any]] | None = None
        self._held = _Holdings(manager)
        self._chunks = self._run()

    def __next__(self) -> GenerationChunk:
        try:
            return next(self._chunks)
        except BaseException:
            self._held.release()
            raise

    def close(self) -> None:
        """End the stream now: cancel the generation in the worker and release the model."""
        self._chunks.close()
        self._held.release()

    def cancel(self) -> None:
        """Ask the stream to end as soon as it can, from any thread; it ends with ``cancelled``."""
        self._cancelled.set()
        self._wakeup.set()
        frames = self._frames
        if frames is not None:
            frames.put(_CANCEL)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def collect(self) -> GenerationResult:
        """The whole answer: every chunk's text and the final chunk's details."""
        return GenerationResult.of(self.model, list(self), self.request.logprobs)

    def __del__(self) -> None:
        held = self._held
        if held.lease is not None and not held.released:
            self._manager._janitor.put(held.release)

    def _run(self) -> Iterator[GenerationChunk]:
        # No `finally` and no lock here: the garbage collector may close this generator in
        # any thread. What the stream holds is released by __next__, close() or the janitor.
        manager, request, held = self._manager, self.request, self._held
        start = time.perf_counter()
        try:
            held.lease = lease = manager.leases.take(self.model, request.keep_alive, self._wakeup, self._cancelled)
        except RequestCancelledError:
            yield _cancelled(None)
            return
        manager.leases.check_fits(lease, request)
        held.rid = rid = uuid.uuid4().hex
        self._frames = frames = lease.worker.open(rid)
        if self._cancelled.is_set():  # left while its model loaded: no generation starts
            held.release()
            yield _cancelled(lease.load_s)
            return
        lease.worker.send({"op": p.OP_GENERATE, "request_id": rid, **request.worker_message()})
        # Queued behind other requests, silence is judged per worker: any frame it sends
        # proves progress. Once started, the first-token and then the between-token
        # deadlines apply to this request alone.
        started, cancel_sent, ttft = False, False, None
        while True:
            settings = manager.settings
            timeout = settings.token_timeout if ttft is not None else settings.first_token_timeout
            assert_no_locks_held("waiting for a token")
            try:
                frame = frames.get(timeout=timeout)
            except queue.Empty:
                if not started and time.monotonic() - lease.worker.last_frame_at < timeout:
                    continue
                what = "first token" if ttft is None else "next token"
                message = (
                    f"worker for model {lease.record.spec.id!r} (pid {lease.worker.pid}) sent no {what} "
                    f"within {timeout:g}s and was killed; the next request starts a fresh worker"
                )
                manager.leases.kill(lease, message, WorkerTimeoutError.code)
                raise WorkerTimeoutError(message) from None
            kind = frame["type"]
            if kind in (p.T_DONE, p.T_ERROR):
                break
            started = started or kind in (p.T_STARTED, p.T_TOKEN)
            if self._cancelled.is_set():
                if not started:  # still queued in the worker: nothing to wait for
                    held.release()
                    yield _cancelled(lease.load_s)
                    return
                if not cancel_sent:
                    lease.worker.cancel(rid)  # the worker's last frame for rid ends the stream
                    cancel_sent = True
            elif kind == p.T_TOKEN:
                if ttft is None:
                    ttft = time.perf_counter() - start
                if frame["text"] or frame.get("logprobs"):
                    assert_no_locks_held("yield")
                    yield GenerationChunk(frame["text"], logprobs=frame.get("logprobs"))
        held.ended = True
        held.release()
        if kind == p.T_ERROR:
            if frame.get("code") == RequestCancelledError.code:
                yield _cancelled(lease.load_s)
                return
            raise error_from_frame(frame)
        timings = dict(frame["timings"], load_s=lease.load_s, ttft_s=ttft)
        assert_no_locks_held("yield")
        yield GenerationChunk("", frame["finish_reason"], frame["usage"], timings)


def _cancelled(load_s: float | None) -> GenerationChunk:
    """The final chunk of a stream cancelled before its worker started it."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return GenerationChunk("", "cancelled", usage, {"load_s": load_s, "ttft_s": None})
