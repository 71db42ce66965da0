"""WorkerManager: the registry of model workers, their leases, and load/unload/generate."""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlx_jupyter import __version__
from mlx_jupyter.engine.errors import (
    AllModelsBusyError,
    InvalidRequestError,
    ManagerClosedError,
    MemoryLimitError,
    MLXError,
    ModelLoadError,
    ModelNotFoundError,
    RequestCancelledError,
    UnloadPendingError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from mlx_jupyter.engine.generation import GenerationStream
from mlx_jupyter.engine.janitor import Janitor
from mlx_jupyter.engine.locks import LockWatchdog, RankedLock, assert_no_locks_held
from mlx_jupyter.engine.models import DEFAULT_MODEL, ModelResolver, ModelSpec
from mlx_jupyter.engine.params import GenerationRequest, parse_keep_alive, validate_request
from mlx_jupyter.engine.types import GenerationResult, ModelStatus
from mlx_jupyter.engine.worker import WorkerProcess

log = logging.getLogger(__name__)

Hook = Callable[..., None]
OnExit = Callable[[WorkerProcess], None]
# Starts a worker process for a model id and returns it once it said hello.
Spawn = Callable[[str, OnExit, float], WorkerProcess]

REAP_RETRY_S = 1.0
# A warm spare must answer a ping this fast to be adopted; one that does not (stopped,
# hung) is killed and the load starts a fresh worker instead.
SPARE_PING_TIMEOUT_S = 5.0
# Threads that start workers for loads; a load never queues behind the spare's refill,
# which has a thread of its own.
SPAWN_THREADS = 4


def spawn_worker(model_id: str, on_exit: OnExit, timeout: float) -> WorkerProcess:
    """The real ``Spawn``: a new worker process, up and with mlx imported."""
    worker = WorkerProcess(model_id, on_exit=on_exit)
    try:
        worker.spawn(timeout)
    except BaseException:
        worker.kill(f"starting a worker for {model_id!r} failed")
        raise
    return worker


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass(eq=False)
class ModelRecord:
    """One worker's life, ``starting -> ready -> draining -> stopping -> dead``.

    Activity fields (leases, last use, keep_alive_s, the idle deadline) are guarded by
    ``activity_lock``; state, epoch, worker and claims by ``state_lock``. A record is
    never revived: once it leaves ``ready`` a request for its model loads a new one.
    The idle deadline is kept twice: ``expires_mono`` (monotonic, what the reaper
    decides by, immune to wall-clock jumps) and ``expires_at`` (epoch, what clients see).
    """

    spec: ModelSpec
    epoch: int
    keep_alive_s: float | None  # None: the manager's idle_timeout, whatever it is then
    state: State = State.STARTING
    worker: WorkerProcess | None = None
    leases: int = 0
    memory_bytes: int = 0
    context_length: int | None = None
    load_s: float | None = None
    loaded_at: float | None = None
    last_used_at: float | None = None
    last_used_mono: float = 0.0
    expires_at: float | None = None
    expires_mono: float | None = None
    error: MLXError | None = None
    claimed_by: _Ticket | None = None
    dead: threading.Event = field(default_factory=threading.Event)

    def status(self, keep_alive_s: float) -> ModelStatus:
        return ModelStatus(
            id=self.spec.id,
            state=self.state.value,
            pid=self.worker.pid if self.worker else None,
            active_requests=self.leases,
            memory_bytes=self.memory_bytes or self.spec.size_bytes,
            loaded_at=self.loaded_at,
            last_used_at=self.last_used_at,
            keep_alive_s=keep_alive_s,
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
    """A request's hold on a ready worker; released after the last IPC."""

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
    count against ``max_loaded_models`` and ``memory_limit``. Deadlines are monotonic.
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
        unload_timeout: float = 60.0,
        watchdog_threshold: float = 10.0,
        max_tokens_limit: int = 1_000_000,
        max_prompt_chars: int = 1_000_000,
        warm_spare: bool = True,
        batch_size: int = 32,
        resolver: ModelResolver | None = None,
        spawn: Spawn = spawn_worker,
    ) -> None:
        if max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be at least 1, not {max_loaded_models}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if idle_timeout < 0 or memory_limit < 0:
            raise ValueError("idle_timeout and memory_limit must not be negative")
        self._idle_timeout = idle_timeout
        self.max_loaded_models = max_loaded_models
        self.memory_limit = memory_limit
        self.default_model = default_model
        self.queue_timeout = queue_timeout
        self.spawn_timeout = spawn_timeout
        self.load_timeout = load_timeout
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.unload_timeout = unload_timeout
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_chars = max_prompt_chars
        self.warm_spare = warm_spare
        self.batch_size = batch_size
        self.resolver = resolver or ModelResolver(model_dirs, allow_downloads=allow_downloads)
        self.hooks: dict[str, Hook] = {}
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
        self._health_checks: list[Callable[[], str | None]] = []
        self._spawn = spawn
        # Spawning from long-lived threads keeps PR_SET_PDEATHSIG tied to the server's
        # life, not to the request thread that happened to start a load.
        self._spawner = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="mlx-spawner")
        self._spare_spawner = ThreadPoolExecutor(1, thread_name_prefix="mlx-spare-spawner")
        # A started worker with no model yet (state_lock): a load adopts it instead of
        # waiting for a process to start. It is no model: not in status, not counted.
        self._spare: WorkerProcess | None = None
        self._spare_spawning = False
        self._janitor = Janitor()
        self._watchdog = LockWatchdog(watchdog_threshold)
        self._watchdog.start()
        if warm_spare:
            self._refill_spare()

    # -- public API ------------------------------------------------------------

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, value: float) -> None:
        """A new idle timeout applies at once to models already idle under the old one."""
        if value < 0:
            raise ValueError(f"idle_timeout must not be negative, not {value}")
        with self._activity_lock, self._state_lock:
            self._idle_timeout = value
            for record in self._models.values():
                if record.state is State.READY and record.leases == 0 and record.keep_alive_s is None:
                    self._set_expiry(record)
        self._changed()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (with no lock held) after every change of the deadlines."""
        self._listeners.append(callback)

    def add_health_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns why the engine is degraded, or None; ``health()`` asks it each time."""
        self._health_checks.append(check)

    def load(self, model: str | None = None, keep_alive: Any = None) -> ModelStatus:
        """Load ``model`` (or find it loaded) and start its idle clock; returns its status."""
        lease = self._lease(model or self.default_model, parse_keep_alive(keep_alive))
        self._release(lease)
        with self._activity_lock, self._state_lock:
            return self._status(lease.record)

    def unload(self, model: str, timeout: float | None = None) -> ModelStatus:
        """Stop new requests to ``model``, wait for in-flight ones to drain, stop the worker.

        Waits ``timeout`` seconds at most (default ``unload_timeout``), then raises
        UnloadPendingError: the model stays draining and unloads when its requests end.
        """
        timeout = self.unload_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
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
                status = self._status(record)
            if record.state is State.STARTING:
                self._wait_until_loaded(record, deadline)
                continue
            break
        log.info("unloading model %s (%s)", model, "now" if to_stop else f"after {status.active_requests} requests")
        self._changed()
        if to_stop is not None:
            self._stop(to_stop)
        assert_no_locks_held("waiting for drain")
        if not record.dead.wait(max(0.0, deadline - time.monotonic())):
            raise UnloadPendingError(
                f"model {model!r} still has {record.leases} requests running after {timeout:g}s; "
                "it unloads when they end"
            )
        return status

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Generate a whole answer (blocking); see ``stream_generate`` for the arguments."""
        # closing(): an interrupt here must still cancel the stream and release its lease.
        with contextlib.closing(self.stream_generate(prompt, **kwargs)) as stream:
            return stream.collect()

    def stream_generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationStream:
        """Stream an answer: text chunks, then a final chunk with finish_reason, usage, timings.

        Arguments (keywords): ``model``, ``messages`` (instead of ``prompt``), ``max_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``, ``keep_alive``. They are checked
        here, before any work starts; closing the stream early, or ``cancel()`` from any
        thread, cancels the generation.
        """
        request = validate_request(
            prompt=prompt, max_tokens_limit=self.max_tokens_limit, max_prompt_chars=self.max_prompt_chars, **kwargs
        )
        return GenerationStream(self, request)

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
            return [self._status(r) for r in sorted(records, key=lambda r: r.epoch)]

    @property
    def spare_pid(self) -> int | None:
        """The pid of the warm spare worker, None while there is none."""
        with self._activity_lock, self._state_lock:
            return self._spare.pid if self._spare is not None else None

    @property
    def degraded(self) -> str | None:
        """Why the engine is not healthy (a stalled lock, a dead reaper), or None; clears with its cause."""
        reasons = [f"lock watchdog: {self._watchdog.stall}"] if self._watchdog.stall else []
        for check in list(self._health_checks):
            try:
                reason = check()
            except Exception as exc:
                reason = f"health check {check!r} failed: {exc!r}"
            if reason:
                reasons.append(reason)
        return "; ".join(reasons) or None

    def health(self) -> dict[str, Any]:
        with self._activity_lock, self._state_lock:
            loaded = sum(r.state is State.READY for r in self._models.values())
            busy = sum(r.leases for r in self._models.values()) + sum(r.leases for r in self._retiring)
        degraded = self.degraded
        return {
            "status": "degraded" if degraded else "ok",
            "version": __version__,
            "models_loaded": loaded,
            "active_requests": busy,
            "degraded_reason": degraded,
            "default_model": self.default_model,
        }

    def next_expiry(self) -> float | None:
        """The earliest idle deadline among ready models, on the ``time.monotonic()`` clock."""
        with self._activity_lock, self._state_lock:
            deadlines = [
                r.expires_mono for r in self._models.values() if r.expires_mono is not None and r.leases == 0
            ]
        return min(deadlines, default=None)

    def reap_expired(self) -> list[str]:
        """Unload every idle model whose deadline has passed; returns their ids.

        Candidates come from a snapshot; each is re-checked idle *and* expired at the
        moment of commit, detached under the locks and stopped after releasing them.
        """
        now = time.monotonic()
        with self._activity_lock, self._state_lock:
            due = [r for r in self._models.values() if self._expired(r, now)]
        reaped = []
        for record in due:
            try:
                self._hook("reaper.before_commit", model=record.spec.id)
                with self._activity_lock, self._state_lock:
                    commit = self._models.get(record.spec.id) is record and self._expired(record, time.monotonic())
                    if commit:
                        self._detach(record)
                        record.state = State.STOPPING
                        self.counters["idle_unloads"] += 1
                if commit:
                    idle_s = time.monotonic() - record.last_used_mono
                    log.info("unloading model %s: idle for %.0fs", record.spec.id, idle_s)
                    self._changed()
                    self._stop(record)
                    reaped.append(record.spec.id)
            except Exception:
                log.exception("idle unload of %s failed; retrying in %gs", record.spec.id, REAP_RETRY_S)
                with self._activity_lock, self._state_lock:
                    if record.expires_mono is not None:  # not a hot loop on a persistent failure
                        record.expires_mono = time.monotonic() + REAP_RETRY_S
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
        self._spare_spawner.shutdown(wait=True, cancel_futures=True)
        self._janitor.stop()
        self._watchdog.stop()
        self._changed()

    def __enter__(self) -> WorkerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- leases ----------------------------------------------------------------

    def _lease(
        self,
        model: str,
        keep_alive: float | None,
        wakeup: threading.Event | None = None,
        cancelled: threading.Event | None = None,
    ) -> Lease:
        """Take a lease on a ready worker of ``model``, loading it (once) if need be.

        ``wakeup`` is the ticket's event (its owner sets it to make the wait look again);
        once ``cancelled`` is set the ticket is withdrawn with RequestCancelledError, and no
        model is evicted or loaded on its behalf any more.
        """
        spec = self.resolver.resolve(model)
        ticket = _Ticket(spec.id, next(self._seq), wakeup or threading.Event())
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
                    if cancelled is not None and cancelled.is_set():
                        raise RequestCancelledError(f"the request for model {spec.id!r} was cancelled while it waited")
                    record = self._models.get(spec.id)
                    if record is not None and record.state is State.READY and self._may_lease(ticket, record):
                        return self._grant(ticket, record, keep_alive)
                    if record is None:
                        self._raise_if_failed(ticket)
                        if self._first_needing_slot() is ticket:
                            to_stop, to_load = self._make_room(ticket, spec, keep_alive)
                    ticket.waiting_on = record or to_load
                if to_stop is not None:
                    log.info("evicting idle model %s to make room for %s", to_stop.spec.id, spec.id)
                    self._changed()
                    self._stop(to_stop)
                elif to_load is not None:
                    self._changed()  # a model is starting
                    return self._load(to_load, ticket, keep_alive)
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

    def _grant(self, ticket: _Ticket, record: ModelRecord, keep_alive: float | None) -> Lease:
        """Under both locks: one more lease on a ready ``record``; its idle clock stops."""
        record.leases += 1
        record.keep_alive_s = keep_alive
        record.last_used_at, record.last_used_mono = time.time(), time.monotonic()
        record.expires_at = record.expires_mono = None
        assert record.worker is not None
        loaded_now = ticket.waiting_on is record
        return Lease(record, record.worker, record.load_s if loaded_now else None)

    def _check_fits(self, lease: Lease, request: GenerationRequest) -> None:
        """Refuse a request its model cannot serve, once the model (and its context) is known."""
        context = lease.record.context_length
        if context and request.max_tokens > context:
            raise InvalidRequestError(
                f"max_tokens is {request.max_tokens} but model {lease.record.spec.id!r} has a context of "
                f"{context} tokens; ask for at most {context}"
            )

    def _raise_if_failed(self, ticket: _Ticket) -> None:
        # Requests that waited on a load share its failure instead of retrying it.
        failed = ticket.waiting_on
        if failed is not None and failed.state is State.DEAD and failed.error is not None:
            raise type(failed.error)(str(failed.error))

    def _first_needing_slot(self) -> _Ticket | None:
        return next((t for t in self._waiters if t.model not in self._models), None)

    def _make_room(
        self, ticket: _Ticket, spec: ModelSpec, keep_alive: float | None
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
            record = ModelRecord(spec=spec, epoch=next(self._epochs), keep_alive_s=keep_alive)
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
            record.last_used_at, record.last_used_mono = time.time(), time.monotonic()
            if record.leases == 0:
                if record.state is State.DRAINING:
                    record.state = State.STOPPING
                    to_stop = record
                elif record.state is State.READY:
                    self._set_expiry(record)
            self._notify()
        self._changed()
        if to_stop is not None:
            self._stop(to_stop)

    def _keep_alive(self, record: ModelRecord) -> float:
        """Seconds ``record`` stays after its last request; negative = forever."""
        if record.keep_alive_s is not None:
            return record.keep_alive_s
        return self._idle_timeout if self._idle_timeout > 0 else -1.0

    def _set_expiry(self, record: ModelRecord) -> None:
        """Under both locks: the idle deadline of an idle ``record``, from its last use."""
        keep = self._keep_alive(record)
        if keep < 0:
            record.expires_at = record.expires_mono = None
        else:
            record.expires_mono = record.last_used_mono + keep
            record.expires_at = (record.last_used_at or time.time()) + keep

    def _status(self, record: ModelRecord) -> ModelStatus:
        return record.status(self._keep_alive(record))

    @staticmethod
    def _expired(record: ModelRecord, now: float) -> bool:
        return (
            record.state is State.READY
            and record.leases == 0
            and record.expires_mono is not None
            and record.expires_mono <= now
        )

    # -- worker life -----------------------------------------------------------

    def _load(self, record: ModelRecord, ticket: _Ticket, keep_alive: float | None) -> Lease:
        """Spawn and load ``record``'s worker outside the locks, then publish it as ready.

        The loading request's lease is granted in the same critical section that publishes
        ``ready``, so no reaper can unload the model in between (with ``keep_alive=0`` it
        would expire at once). Any exception, KeyboardInterrupt included, takes the failure
        path: the record goes dead with an error its waiters share, and the worker is killed.
        """
        spec = record.spec

        def on_exit(w: WorkerProcess) -> None:
            self._on_worker_exit(record, w)

        worker: WorkerProcess | None = None
        spawned: Future[WorkerProcess] | None = None
        try:
            self._hook("load.before_spawn", model=spec.id)
            worker = self._take_spare(spec.id, on_exit)
            if worker is None:
                assert_no_locks_held("spawn")
                spawned = self._spawner.submit(self._spawn, spec.id, on_exit, self.spawn_timeout)
                worker = spawned.result()
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
                record.context_length = loaded.get("context_length")
                record.load_s = loaded.get("load_s")
                record.loaded_at = time.time()
                lease = None
                if record.state is State.STARTING:
                    record.state = State.READY
                    self.counters["loads"] += 1
                    lease = self._grant(ticket, record, keep_alive)
                self._notify()
            if lease is None:
                raise ManagerClosedError("the model server is shutting down")
        except BaseException as exc:
            self._load_failed(record, worker, spawned, exc)
            raise
        if worker.exited.is_set():  # it died while we published: the reader skipped a starting record
            self._on_worker_exit(record, worker)
            self._release(lease)
            raise WorkerCrashedError(
                f"the worker for model {spec.id!r} died right after loading it; the next request starts a fresh one"
            )
        log.info("model %s ready in worker pid %s (%.2fs)", spec.id, worker.pid, record.load_s or 0.0)
        return lease

    def _load_failed(
        self,
        record: ModelRecord,
        worker: WorkerProcess | None,
        spawned: Future[WorkerProcess] | None,
        exc: BaseException,
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
        if worker is not None:
            worker.kill(message, code)
            worker.join()
        elif spawned is not None:  # interrupted while a spawner starts the process: kill what it starts

            def kill_started(done: Future[WorkerProcess]) -> None:
                if not done.cancelled() and done.exception() is None:
                    done.result().kill(message, code)

            spawned.add_done_callback(kill_started)
        record.dead.set()
        self._changed()
        if error is not exc and isinstance(exc, Exception):
            raise error from exc

    def _take_spare(self, model_id: str, on_exit: OnExit) -> WorkerProcess | None:
        """The warm spare, adopted for ``model_id``, if one is ready and answers; else None.

        A spare still starting is not waited for (a cold start is as quick), and a spare
        that does not answer a ping (stopped, hung) is killed rather than loaded into.
        """
        if not self.warm_spare:
            return None
        with self._activity_lock, self._state_lock:
            spare, self._spare = self._spare, None
        self._refill_spare()
        if spare is None or spare.exited.is_set():
            return None
        if spare.ping(SPARE_PING_TIMEOUT_S) is None:
            log.warning("the warm spare worker (pid %s) did not answer a ping; killing it", spare.pid)
            spare.kill("the warm spare worker did not answer")
            return None
        spare.adopt(model_id, on_exit)
        return spare

    def _refill_spare(self) -> None:
        """Start a new spare on its own thread unless one exists or is on its way."""
        with self._activity_lock, self._state_lock:
            if self._closed or self._spare is not None or self._spare_spawning:
                return
            self._spare_spawning = True
        try:  # outside the locks: the first submit starts a thread and waits for it
            self._spare_spawner.submit(self._spawn_spare)
        except RuntimeError:  # the spawner was shut down meanwhile
            with self._activity_lock, self._state_lock:
                self._spare_spawning = False

    def _spawn_spare(self) -> None:
        """Runs on the spare's spawner thread: start a worker and publish it as the spare."""
        spare: WorkerProcess | None = None
        try:
            spare = self._spawn("(spare)", self._spare_exited, self.spawn_timeout)
        except Exception:
            log.warning("starting a warm spare worker failed; loads start their own", exc_info=True)
        with self._activity_lock, self._state_lock:
            self._spare_spawning = False
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
        record.expires_at = record.expires_mono = None
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
        """Kill a hung worker; counted once per worker, however many of its requests saw it hang."""
        with self._activity_lock, self._state_lock:
            first = self._models.get(lease.record.spec.id) is lease.record
            if first:
                self._detach(lease.record)
                lease.record.state = State.STOPPING
                self.counters["hung_kills"] += 1
        if first:
            log.error("%s", message)
        lease.worker.kill(message, code)

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
