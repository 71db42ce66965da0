"""WorkerManager: the registry of model workers, their leases, and load/unload/generate."""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlx_jupyter import __version__
from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.errors import (
    AllModelsBusyError,
    ManagerClosedError,
    MemoryLimitError,
    MLXError,
    ModelLoadError,
    ModelNotFoundError,
    WorkerCrashedError,
    WorkerTimeoutError,
    error_from_frame,
)
from mlx_jupyter.engine.locks import LockWatchdog, RankedLock, assert_no_locks_held
from mlx_jupyter.engine.models import DEFAULT_MODEL, ModelResolver, ModelSpec
from mlx_jupyter.engine.params import GenerationRequest, parse_keep_alive, validate_request
from mlx_jupyter.engine.types import GenerationChunk, GenerationResult, ModelStatus
from mlx_jupyter.engine.worker import WorkerProcess

log = logging.getLogger(__name__)

Hook = Callable[..., None]

REAP_RETRY_S = 1.0


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass(eq=False)
class ModelRecord:
    """One worker's life, ``starting -> ready -> draining -> stopping -> dead``.

    Activity fields (leases, last_used_at, keep_alive_s, expires_at) are guarded by
    ``activity_lock``; state, epoch, worker and claims by ``state_lock``. A record is
    never revived: once it leaves ``ready`` a request for its model loads a new one.
    """

    spec: ModelSpec
    epoch: int
    keep_alive_s: float
    state: State = State.STARTING
    worker: WorkerProcess | None = None
    leases: int = 0
    memory_bytes: int = 0
    load_s: float | None = None
    loaded_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None
    error: MLXError | None = None
    claimed_by: _Ticket | None = None
    dead: threading.Event = field(default_factory=threading.Event)

    def status(self) -> ModelStatus:
        return ModelStatus(
            id=self.spec.id,
            state=self.state.value,
            pid=self.worker.pid if self.worker else None,
            active_requests=self.leases,
            memory_bytes=self.memory_bytes or self.spec.size_bytes,
            loaded_at=self.loaded_at,
            last_used_at=self.last_used_at,
            keep_alive_s=self.keep_alive_s,
            expires_at=self.expires_at,
        )


@dataclass(eq=False)
class _Ticket:
    """A request waiting for a model; tickets are served in arrival order (``seq``)."""

    model: str
    seq: int
    wakeup: threading.Event = field(default_factory=threading.Event)
    waiting_on: ModelRecord | None = None


@dataclass
class Lease:
    """A request's hold on a ready worker; released in a ``finally:`` after the last IPC."""

    record: ModelRecord
    worker: WorkerProcess
    load_s: float | None = None


class WorkerManager:
    """Loads models into worker processes and serves generations from them.

    Lock order: ``activity_lock`` (rank 1) then ``state_lock`` (rank 2), always both, in
    that order, and never across IPC, spawn, join, sleep, a wait or a ``yield``. Slow work
    (spawn, load, stop) happens outside the locks behind a record's state; waiters sleep on
    their ticket's Event with no lock held. ``_models`` holds starting and ready records
    by id, ``_retiring`` the draining and stopping ones until their process is gone; both
    count against ``max_loaded_models`` and ``memory_limit``.
    """

    def __init__(
        self,
        *,
        idle_timeout: float = 300.0,
        max_loaded_models: int = 2,
        memory_limit: int = 0,
        model_dirs: Sequence[str] = (),
        default_model: str = DEFAULT_MODEL,
        allow_downloads: bool = False,
        queue_timeout: float = 60.0,
        spawn_timeout: float = 60.0,
        load_timeout: float = 300.0,
        first_token_timeout: float = 120.0,
        token_timeout: float = 30.0,
        watchdog_threshold: float = 10.0,
        max_tokens_limit: int = 1_000_000,
        warm_spare: bool = True,
        batch_size: int = 32,
        resolver: ModelResolver | None = None,
    ) -> None:
        if max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be at least 1, not {max_loaded_models}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if idle_timeout < 0 or memory_limit < 0:
            raise ValueError("idle_timeout and memory_limit must not be negative")
        self.idle_timeout = idle_timeout
        self.max_loaded_models = max_loaded_models
        self.memory_limit = memory_limit
        self.default_model = default_model
        self.queue_timeout = queue_timeout
        self.spawn_timeout = spawn_timeout
        self.load_timeout = load_timeout
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.max_tokens_limit = max_tokens_limit
        self.warm_spare = warm_spare
        self.batch_size = batch_size
        self.resolver = resolver or ModelResolver(model_dirs, allow_downloads=allow_downloads)
        self.hooks: dict[str, Hook] = {}
        self.degraded: str | None = None
        # Life-cycle counts for metrics (loads, load_failures, evictions, idle_unloads,
        # unloads, crashes, hung_kills); written under state_lock.
        self.counters: Counter[str] = Counter()

        self._activity_lock = RankedLock("activity_lock")
        self._state_lock = RankedLock("state_lock")
        self._models: dict[str, ModelRecord] = {}
        self._retiring: set[ModelRecord] = set()
        self._waiters: list[_Ticket] = []
        self._epochs = itertools.count(1)
        self._seq = itertools.count(1)
        self._closed = False
        self._listeners: list[Callable[[], None]] = []
        # Spawning from one long-lived thread keeps PR_SET_PDEATHSIG tied to the
        # server's life, not to the request thread that happened to start a load.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-spawner")
        # A started worker with no model yet (state_lock): a load adopts it instead of
        # waiting for a process to start. It is no model: not in status, not counted.
        self._spare: WorkerProcess | None = None
        self._spare_spawning: Future | None = None
        self._watchdog = LockWatchdog(watchdog_threshold, self._mark_degraded)
        self._watchdog.start()
        if warm_spare:
            self._refill_spare()

    # -- public API ------------------------------------------------------------

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (with no lock held) after every change of the deadlines."""
        self._listeners.append(callback)

    def load(self, model: str | None = None, keep_alive: Any = None) -> ModelStatus:
        """Load ``model`` (or find it loaded) and start its idle clock; returns its status."""
        lease = self._lease(model or self.default_model, parse_keep_alive(keep_alive))
        self._release(lease)
        with self._activity_lock, self._state_lock:
            return lease.record.status()

    def unload(self, model: str, timeout: float | None = None) -> ModelStatus:
        """Stop new requests to ``model``, wait for in-flight ones to drain, stop the worker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            to_stop = None
            with self._activity_lock, self._state_lock:
                self._check_open()
                record = self._models.get(model)
                if record is None:  # already on its way out: wait with the first unloader
                    record = next((r for r in self._retiring if r.spec.id == model), None)
                if record is None:
                    raise ModelNotFoundError(f"model {model!r} is not loaded: see GET mlx/api/models")
                if record.state is State.READY:
                    self._detach(record)
                    if record.leases == 0:
                        record.state = State.STOPPING
                        to_stop = record
                    else:
                        record.state = State.DRAINING
                status = record.status()
            if record.state is State.STARTING:
                self._wait_until_loaded(record, deadline)
                continue
            break
        log.info("unloading model %s (%s)", model, "now" if to_stop else f"after {status.active_requests} requests")
        self._changed()
        if to_stop is not None:
            self._stop(to_stop)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        assert_no_locks_held("waiting for drain")
        if not record.dead.wait(remaining):
            raise WorkerTimeoutError(
                f"model {model!r} still has requests running after {timeout:g}s; it unloads when they end"
            )
        return status

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Generate a whole answer (blocking); see ``stream_generate`` for the arguments."""
        chunks = []
        last = GenerationChunk("")
        # closing(): an interrupt here must still cancel the stream and release its lease.
        with contextlib.closing(self.stream_generate(prompt, **kwargs)) as stream:
            for last in stream:
                chunks.append(last.text)
        return GenerationResult(
            model=kwargs.get("model") or self.default_model,
            text="".join(chunks),
            finish_reason=last.finish_reason or "length",
            usage=last.usage or {},
            timings=last.timings or {},
        )

    def stream_generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        """Stream an answer: text chunks, then a final chunk with finish_reason, usage, timings.

        Arguments (keywords): ``model``, ``messages`` (instead of ``prompt``), ``max_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``, ``keep_alive``. They are checked
        here, before any work starts; closing the iterator early cancels the generation.
        """
        request = validate_request(prompt=prompt, max_tokens_limit=self.max_tokens_limit, **kwargs)
        return self._stream(request)

    def ping(self, model: str, timeout: float = 2.0) -> float | None:
        """Round-trip seconds to ``model``'s worker, None if it did not answer in time."""
        with self._activity_lock, self._state_lock:
            record = self._models.get(model)
            worker = record.worker if record is not None and record.state is State.READY else None
        if worker is None:
            raise ModelNotFoundError(f"model {model!r} is not loaded: see GET mlx/api/models")
        return worker.ping(timeout)

    def status(self) -> list[ModelStatus]:
        """A snapshot of resident models; never waits for a generation or a load."""
        with self._activity_lock, self._state_lock:
            records = [*self._models.values(), *self._retiring]
            return [r.status() for r in sorted(records, key=lambda r: r.epoch)]

    @property
    def spare_pid(self) -> int | None:
        """The pid of the warm spare worker, None while there is none."""
        with self._activity_lock, self._state_lock:
            return self._spare.pid if self._spare is not None else None

    def health(self) -> dict[str, Any]:
        with self._activity_lock, self._state_lock:
            loaded = sum(r.state is State.READY for r in self._models.values())
            busy = sum(r.leases for r in self._models.values()) + sum(r.leases for r in self._retiring)
        return {
            "status": "degraded" if self.degraded else "ok",
            "version": __version__,
            "models_loaded": loaded,
            "active_requests": busy,
            "degraded_reason": self.degraded,
            "default_model": self.default_model,
        }

    def next_expiry(self) -> float | None:
        """The earliest idle deadline (epoch seconds) among ready models, if any."""
        with self._activity_lock, self._state_lock:
            deadlines = [r.expires_at for r in self._models.values() if r.expires_at is not None and r.leases == 0]
        return min(deadlines, default=None)

    def reap_expired(self) -> list[str]:
        """Unload every idle model whose deadline has passed; returns their ids.

        Candidates come from a snapshot; each is re-checked idle *and* expired at the
        moment of commit, detached under the locks and stopped after releasing them.
        """
        now = time.time()
        with self._activity_lock, self._state_lock:
            due = [r for r in self._models.values() if self._expired(r, now)]
        reaped = []
        for record in due:
            try:
                self._hook("reaper.before_commit", model=record.spec.id)
                with self._activity_lock, self._state_lock:
                    commit = self._models.get(record.spec.id) is record and self._expired(record, time.time())
                    if commit:
                        self._detach(record)
                        record.state = State.STOPPING
                        self.counters["idle_unloads"] += 1
                if commit:
                    log.info(
                        "unloading model %s: idle for %.0fs", record.spec.id, time.time() - (record.last_used_at or now)
                    )
                    self._changed()
                    self._stop(record)
                    reaped.append(record.spec.id)
            except Exception:
                log.exception("idle unload of %s failed; retrying in %gs", record.spec.id, REAP_RETRY_S)
                with self._activity_lock, self._state_lock:
                    if record.expires_at is not None:  # not a hot loop on a persistent failure
                        record.expires_at = time.time() + REAP_RETRY_S
        return reaped

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail in-flight requests with a clear error and stop every worker."""
        with self._activity_lock, self._state_lock:
            if self._closed:
                return
            self._closed = True
            records = [*self._models.values(), *self._retiring]
            for record in records:
                record.state = State.STOPPING
            self._models.clear()
            spare, self._spare = self._spare, None
            self._notify()
        log.info("shutting down %d model workers", len(records))
        if spare is not None:
            spare.stop()
        for record in records:
            if record.worker is not None:
                record.worker.kill("the model server is shutting down", ManagerClosedError.code)
        for record in records:
            if record.worker is not None:
                record.worker.join(timeout)
        self._spawner.shutdown(wait=True, cancel_futures=True)
        self._watchdog.stop()
        self._changed()

    def __enter__(self) -> WorkerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- leases ----------------------------------------------------------------

    def _lease(self, model: str, keep_alive: float | None) -> Lease:
        """Take a lease on a ready worker of ``model``, loading it (once) if need be."""
        spec = self.resolver.resolve(model)
        keep = self._keep_alive(keep_alive)
        ticket = _Ticket(spec.id, next(self._seq))
        deadline = time.monotonic() + self.queue_timeout
        with self._activity_lock, self._state_lock:
            self._check_open()
            self._waiters.append(ticket)
        try:
            while True:
                self._hook("lease.lookup", model=spec.id)
                to_stop, to_load = None, None
                with self._activity_lock, self._state_lock:
                    self._check_open()
                    ticket.wakeup.clear()
                    record = self._models.get(spec.id)
                    if record is not None and record.state is State.READY and self._may_lease(ticket, record):
                        return self._grant(ticket, record, keep)
                    if record is None:
                        self._raise_if_failed(ticket)
                        if self._first_needing_slot() is ticket:
                            to_stop, to_load = self._make_room(ticket, spec, keep)
                    ticket.waiting_on = record or to_load
                if to_stop is not None:
                    log.info("evicting idle model %s to make room for %s", to_stop.spec.id, spec.id)
                    self._changed()
                    self._stop(to_stop)
                elif to_load is not None:
                    self._changed()  # a model is starting
                    self._load(to_load)
                else:
                    waiting_for_load = ticket.waiting_on is not None and ticket.waiting_on.state is State.STARTING
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and not waiting_for_load:
                        raise AllModelsBusyError(
                            f"model {spec.id!r} could not be loaded within {self.queue_timeout:g}s: all "
                            f"{self.max_loaded_models} model slots stayed busy; retry later or raise max_loaded_models"
                        )
                    assert_no_locks_held("waiting for a model")
                    ticket.wakeup.wait(max(0.01, min(remaining, 1.0)) if not waiting_for_load else 1.0)
        finally:
            with self._activity_lock, self._state_lock:
                self._waiters.remove(ticket)
                self._drop_claims(ticket)
                self._notify()
            self._changed()  # busy: a lease was granted (or a waiter left)

    def _may_lease(self, ticket: _Ticket, record: ModelRecord) -> bool:
        # A model claimed for eviction by an earlier request takes no new leases, so a
        # stream of requests for it cannot starve the request waiting for its slot.
        return record.claimed_by is None or record.claimed_by.seq > ticket.seq

    def _grant(self, ticket: _Ticket, record: ModelRecord, keep: float) -> Lease:
        record.leases += 1
        record.keep_alive_s = keep
        record.last_used_at = time.time()
        record.expires_at = None
        assert record.worker is not None
        loaded_now = ticket.waiting_on is record
        return Lease(record, record.worker, record.load_s if loaded_now else None)

    def _raise_if_failed(self, ticket: _Ticket) -> None:
        # Requests that waited on a load share its failure instead of retrying it.
        failed = ticket.waiting_on
        if failed is not None and failed.state is State.DEAD and failed.error is not None:
            raise type(failed.error)(str(failed.error))

    def _first_needing_slot(self) -> _Ticket | None:
        return next((t for t in self._waiters if t.model not in self._models), None)

    def _make_room(
        self, ticket: _Ticket, spec: ModelSpec, keep: float
    ) -> tuple[ModelRecord | None, ModelRecord | None]:
        """Under both locks: a new starting record if the model fits, else a victim to stop."""
        if self.memory_limit and spec.size_bytes > self.memory_limit:
            raise MemoryLimitError(
                f"model {spec.id!r} needs {spec.size_bytes} bytes but memory_limit is {self.memory_limit} bytes"
            )
        resident = [*self._models.values(), *self._retiring]
        used = sum(r.memory_bytes or r.spec.size_bytes for r in resident)
        fits = len(resident) < self.max_loaded_models and (
            not self.memory_limit or used + spec.size_bytes <= self.memory_limit
        )
        if fits:
            self._drop_claims(ticket)
            record = ModelRecord(spec=spec, epoch=next(self._epochs), keep_alive_s=keep)
            self._models[spec.id] = record
            return None, record
        wanted_earlier = {t.model for t in self._waiters if t.seq < ticket.seq}
        ready = sorted(
            (r for r in self._models.values() if r.state is State.READY and r.spec.id not in wanted_earlier),
            key=lambda r: r.last_used_at or 0.0,
        )
        for record in ready:
            if record.leases == 0 and record.claimed_by in (None, ticket):
                # A claim only holds while its ticket still needs that room.
                self._drop_claims(ticket)
                self._detach(record)
                record.state = State.STOPPING
                self.counters["evictions"] += 1
                return record, None
        if ready and not any(r.claimed_by is ticket for r in ready):
            victim = next((r for r in ready if r.claimed_by is None), None)
            if victim is not None:
                victim.claimed_by = ticket
        return None, None

    def _drop_claims(self, ticket: _Ticket) -> None:
        for record in self._models.values():
            if record.claimed_by is ticket:
                record.claimed_by = None

    def _release(self, lease: Lease) -> None:
        record, to_stop = lease.record, None
        with self._activity_lock, self._state_lock:
            record.leases -= 1
            record.last_used_at = time.time()
            if record.leases == 0:
                if record.state is State.DRAINING:
                    record.state = State.STOPPING
                    to_stop = record
                elif record.state is State.READY:
                    record.expires_at = self._expiry(record)
            self._notify()
        self._changed()
        if to_stop is not None:
            self._stop(to_stop)

    def _keep_alive(self, keep_alive: float | None) -> float:
        if keep_alive is not None:
            return keep_alive
        return self.idle_timeout if self.idle_timeout > 0 else -1.0

    def _expiry(self, record: ModelRecord) -> float | None:
        if record.keep_alive_s < 0:
            return None
        return (record.last_used_at or time.time()) + record.keep_alive_s

    @staticmethod
    def _expired(record: ModelRecord, now: float) -> bool:
        return (
            record.state is State.READY
            and record.leases == 0
            and record.expires_at is not None
            and record.expires_at <= now
        )

    # -- worker life -----------------------------------------------------------

    def _load(self, record: ModelRecord) -> None:
        """Spawn and load ``record``'s worker outside the locks, then publish it as ready.

        Any exception, KeyboardInterrupt included, takes the failure path: the record
        goes dead with an error its waiters share, and the worker is killed.
        """
        spec = record.spec

        def on_exit(w: WorkerProcess) -> None:
            self._on_worker_exit(record, w)

        worker = WorkerProcess(spec.id, on_exit=on_exit)
        spawned = None
        try:
            self._hook("load.before_spawn", model=spec.id)
            spare = self._take_spare()
            if spare is not None:
                spare.adopt(spec.id, on_exit)
                worker = spare
            else:
                assert_no_locks_held("spawn")
                spawned = self._spawner.submit(worker.spawn, self.spawn_timeout)
                spawned.result()
            with self._activity_lock, self._state_lock:
                record.worker = worker
                closed = self._closed or record.state is not State.STARTING
            if closed:
                raise ManagerClosedError("the model server is shutting down")
            self._hook("load.after_spawn", model=spec.id)
            loaded = worker.load(
                str(spec.path), self.load_timeout, batch_size=self.batch_size, memory_limit=self.memory_limit
            )
            with self._activity_lock, self._state_lock:
                record.memory_bytes = int(loaded.get("memory_bytes") or 0)
                record.load_s = loaded.get("load_s")
                record.loaded_at = record.last_used_at = time.time()
                if record.state is State.STARTING:
                    record.state = State.READY
                    # Expires like an idle model unless the loading request leases it.
                    record.expires_at = self._expiry(record)
                    self.counters["loads"] += 1
                self._notify()
        except BaseException as exc:
            self._load_failed(record, worker, spawned, exc)
            raise
        if worker.exited.is_set():  # it died while we published: the reader skipped a starting record
            self._on_worker_exit(record, worker)
            raise WorkerCrashedError(
                f"the worker for model {spec.id!r} died right after loading it; the next request starts a fresh one"
            )
        log.info("model %s ready in worker pid %s (%.2fs)", spec.id, worker.pid, record.load_s or 0.0)
        self._changed()

    def _load_failed(
        self, record: ModelRecord, worker: WorkerProcess, spawned: Future | None, exc: BaseException
    ) -> None:
        if isinstance(exc, MLXError):
            error = exc
        elif self._closed:
            error = ManagerClosedError("the model server is shutting down")
        elif isinstance(exc, Exception):
            error = ModelLoadError(f"starting a worker for {record.spec.id!r} failed: {exc!r}")
        else:
            error = ModelLoadError(f"loading {record.spec.id!r} was interrupted ({type(exc).__name__})")
        log.warning("loading model %s failed: %s", record.spec.id, error)
        with self._activity_lock, self._state_lock:
            if self._models.get(record.spec.id) is record:
                del self._models[record.spec.id]
            record.state = State.DEAD
            record.error = error
            self.counters["load_failures"] += 1
            self._notify()
        message, code = str(error), getattr(error, "code", MLXError.code)
        if worker.proc is not None:
            worker.kill(message, code)
            worker.join()
        elif spawned is not None:  # interrupted while the spawner runs Popen: kill what it starts
            spawned.add_done_callback(lambda _: worker.kill(message, code))
        record.dead.set()
        self._changed()
        if error is not exc and isinstance(exc, Exception):
            raise error from exc

    def _take_spare(self) -> WorkerProcess | None:
        """The warm spare (waiting for one being started), or None; a replacement starts behind it."""
        if not self.warm_spare:
            return None
        with self._activity_lock, self._state_lock:
            spare, self._spare, spawning = self._spare, None, self._spare_spawning
        if spare is None and spawning is not None:
            assert_no_locks_held("waiting for the spare")
            with contextlib.suppress(Exception):  # a failed spare only means a cold start
                spawning.result(self.spawn_timeout)
            with self._activity_lock, self._state_lock:
                spare, self._spare = self._spare, None
        self._refill_spare()
        if spare is not None and spare.exited.is_set():
            return None
        return spare

    def _refill_spare(self) -> None:
        """Start a new spare on the spawner thread unless one exists or is on its way."""
        with self._activity_lock, self._state_lock:
            if self._closed or self._spare is not None or self._spare_spawning is not None:
                return
            with contextlib.suppress(RuntimeError):  # the spawner was shut down meanwhile
                self._spare_spawning = self._spawner.submit(self._spawn_spare)

    def _spawn_spare(self) -> None:
        """Runs on the spawner thread: start a worker and publish it as the spare."""
        spare = WorkerProcess("(spare)", on_exit=self._spare_exited)
        try:
            spare.spawn(self.spawn_timeout)
        except Exception:
            log.warning("starting a warm spare worker failed; loads start their own", exc_info=True)
            spare.kill("the warm spare failed to start")
            spare = None
        with self._activity_lock, self._state_lock:
            self._spare_spawning = None
            keep = spare is not None and not self._closed and self._spare is None
            if keep:
                self._spare = spare
        if spare is not None and not keep:
            spare.stop()

    def _spare_exited(self, worker: WorkerProcess) -> None:
        """A spare that dies is dropped; the next load starts a replacement."""
        with self._activity_lock, self._state_lock:
            if self._spare is worker:
                self._spare = None

    def _wait_until_loaded(self, record: ModelRecord, deadline: float | None) -> None:
        assert_no_locks_held("waiting for a load")
        while record.state is State.STARTING:
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerTimeoutError(f"model {record.spec.id!r} is still loading")
            record.dead.wait(0.05)

    def _detach(self, record: ModelRecord) -> None:
        """Under both locks: take ``record`` out of service; it stays counted until dead."""
        del self._models[record.spec.id]
        self._retiring.add(record)
        record.expires_at = None
        record.claimed_by = None

    def _stop(self, record: ModelRecord) -> None:
        assert_no_locks_held("stopping a worker")
        if record.worker is not None:
            record.worker.stop()
        else:
            self._on_worker_exit(record, None)

    def _on_worker_exit(self, record: ModelRecord, worker: WorkerProcess | None) -> None:
        """Called by the worker's reader thread (no lock held) once its process is gone."""
        with self._activity_lock, self._state_lock:
            if record.state is State.STARTING:
                return  # the loading thread sees the failure and cleans up itself
            crashed = self._models.get(record.spec.id) is record
            if crashed:
                del self._models[record.spec.id]
                self.counters["crashes"] += 1
            self._retiring.discard(record)
            if record.state is not State.DEAD and record.loaded_at is not None:
                self.counters["unloads"] += 1
            record.state = State.DEAD
            self._notify()
        if crashed:
            log.warning("model %s lost its worker (pid %s)", record.spec.id, worker.pid if worker else None)
        record.dead.set()
        self._changed()

    def _kill(self, lease: Lease, message: str, code: str) -> None:
        with self._activity_lock, self._state_lock:
            if self._models.get(lease.record.spec.id) is lease.record:
                self._detach(lease.record)
                lease.record.state = State.STOPPING
            self.counters["hung_kills"] += 1
        log.error("%s", message)
        lease.worker.kill(message, code)

    # -- generation ------------------------------------------------------------

    def _stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        start = time.perf_counter()
        lease = self._lease(request.model or self.default_model, request.keep_alive)
        rid = uuid.uuid4().hex
        frames = lease.worker.open(rid)
        ended = False  # the worker is done with rid: a done or error frame arrived
        try:
            lease.worker.send({"op": p.OP_GENERATE, "request_id": rid, **request.worker_message()})
            # Queued behind other requests, silence is judged per worker: any frame it
            # sends proves progress. Once started, the first-token and then the
            # between-token deadlines apply to this request alone.
            started, ttft = False, None
            while True:
                timeout = self.token_timeout if ttft is not None else self.first_token_timeout
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
                    self._kill(lease, message, WorkerTimeoutError.code)
                    raise WorkerTimeoutError(message) from None
                if frame["type"] == p.T_STARTED:
                    started = True
                    continue
                if frame["type"] != p.T_TOKEN:
                    ended = True
                    break
                if ttft is None:
                    ttft = time.perf_counter() - start
                if frame["text"]:
                    assert_no_locks_held("yield")
                    yield GenerationChunk(frame["text"])
        finally:
            if not ended:
                lease.worker.cancel(rid)  # the consumer left early, or the worker hung
            lease.worker.close(rid)
            self._release(lease)
        if frame["type"] == p.T_ERROR:
            raise error_from_frame(frame)
        timings = dict(frame["timings"], load_s=lease.load_s, ttft_s=ttft)
        assert_no_locks_held("yield")
        yield GenerationChunk("", frame["finish_reason"], frame["usage"], timings)

    # -- helpers ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("the model server is shutting down")

    def _notify(self) -> None:
        """Under the state lock: wake every waiting ticket to look again."""
        for ticket in self._waiters:
            ticket.wakeup.set()

    def _changed(self) -> None:
        assert_no_locks_held("listeners")
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("model listener failed")

    def _hook(self, name: str, **context: Any) -> None:
        """Named interleaving points for tests; always called with no lock held."""
        assert_no_locks_held(f"hook {name}")
        hook = self.hooks.get(name)
        if hook is not None:
            hook(**context)

    def _mark_degraded(self, reason: str) -> None:
        self.degraded = reason
