"""The registry: model records and their states, the two engine locks, and the one way to change them."""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mlx_jupyter.engine.errors import ManagerClosedError, MLXError
from mlx_jupyter.engine.locks import RankedLock, assert_no_locks_held
from mlx_jupyter.engine.models import ModelSpec
from mlx_jupyter.engine.types import ModelStatus
from mlx_jupyter.engine.worker import WorkerProcess

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass(eq=False)
class ModelRecord:
    """One worker's life, ``starting -> ready -> draining -> stopping -> dead``.

    A record is never revived: once it leaves ``ready`` a request for its model loads a
    new one. Which lock guards which field is written on ``Registry``. The idle deadline
    is kept twice: ``expires_mono`` (the engine's clock, what the reaper decides by) and
    ``expires_at`` (epoch seconds, what clients see).
    """

    spec: ModelSpec
    epoch: int
    keep_alive_s: float | None  # None: the host's idle_timeout, whatever it is then
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
    claimed_by: Ticket | None = None
    dead: threading.Event = field(default_factory=threading.Event)

    def keep_alive(self, idle_timeout: float) -> float:
        """Seconds this model stays after its last request (negative = forever), under ``idle_timeout``."""
        if self.keep_alive_s is not None:
            return self.keep_alive_s
        return idle_timeout if idle_timeout > 0 else -1.0

    def status(self, idle_timeout: float) -> ModelStatus:
        keep_alive_s = self.keep_alive(idle_timeout)
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
class Ticket:
    """A request waiting for a model; tickets are served in arrival order (``seq``)."""

    model: str
    seq: int
    wakeup: threading.Event = field(default_factory=threading.Event)
    waiting_on: ModelRecord | None = None


@dataclass
class Lease:
    """A request's hold on a ready worker; released after its last IPC."""

    record: ModelRecord
    worker: WorkerProcess
    load_s: float | None = None


class Change:
    """What ``Registry.change()`` yields: a path that looked and changed nothing says so."""

    __slots__ = ("quiet",)

    def __init__(self) -> None:
        self.quiet = False

    def none(self) -> None:
        """Nothing changed after all: no waiter is woken, no listener called."""
        self.quiet = True


class Registry:
    """Model records by id, the requests waiting for one, and the two locks that guard them.

    ``activity_lock`` (rank 1) guards each record's activity — ``leases``,
    ``last_used_at``/``last_used_mono``, ``keep_alive_s``, ``expires_at``/``expires_mono`` —
    and ``idle``, the ready records with no lease and a deadline. ``state_lock`` (rank 2)
    guards the rest: ``models`` (starting and ready records by id), ``retiring`` (draining
    and stopping records, counted until their process is gone), ``waiters``, ``closed``,
    ``counters`` and each record's ``state``, ``worker``, ``claimed_by``, ``error``, load
    results. A path takes only the locks of the fields it touches, activity before state.

    Every change goes through ``change()``: on exit it wakes the waiting tickets (they look
    again) and, once the locks are released, calls the listeners (the reaper, the server's
    event hub), so no path places those calls by hand.
    """

    def __init__(self) -> None:
        self.activity_lock = RankedLock("activity_lock")
        self.state_lock = RankedLock("state_lock")
        self.models: dict[str, ModelRecord] = {}
        self.retiring: set[ModelRecord] = set()
        self.idle: dict[ModelRecord, float] = {}
        self.waiters: list[Ticket] = []
        self.closed = False
        # Life-cycle counts for metrics: loads, load_failures, evictions, idle_unloads,
        # unloads, crashes, hung_kills.
        self.counters: Counter[str] = Counter()
        self._listeners: list[Callable[[], None]] = []
        self._epochs = itertools.count(1)
        self._seq = itertools.count(1)

    @contextlib.contextmanager
    def locked(self, *, activity: bool = True, state: bool = True) -> Iterator[None]:
        """Hold the named locks, in rank order, to read or change what they guard."""
        with contextlib.ExitStack() as held:
            if activity:
                held.enter_context(self.activity_lock)
            if state:
                held.enter_context(self.state_lock)
            yield

    @contextlib.contextmanager
    def change(self, *, activity: bool = True, state: bool = True) -> Iterator[Change]:
        """``locked()`` for a change: waiters look again, then listeners hear of it with no lock held."""
        change = Change()
        with self.locked(activity=activity, state=state):
            yield change
            if state and not change.quiet:
                for ticket in self.waiters:
                    ticket.wakeup.set()
        if not change.quiet:
            self.notify()

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def notify(self) -> None:
        """Tell every listener that something changed; never under a lock."""
        assert_no_locks_held("listeners")
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("model listener failed")

    # -- under state_lock --------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise ManagerClosedError("the model server is shutting down")

    def new_ticket(self, model: str, wakeup: threading.Event | None) -> Ticket:
        ticket = Ticket(model, next(self._seq), wakeup or threading.Event())
        self.waiters.append(ticket)
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        self.waiters.remove(ticket)
        self.drop_claims(ticket)

    def drop_claims(self, ticket: Ticket) -> None:
        for record in self.models.values():
            if record.claimed_by is ticket:
                record.claimed_by = None

    def add(self, spec: ModelSpec, keep_alive_s: float | None) -> ModelRecord:
        record = ModelRecord(spec=spec, epoch=next(self._epochs), keep_alive_s=keep_alive_s)
        self.models[spec.id] = record
        return record

    def resident(self) -> list[ModelRecord]:
        """Every record that holds (or is about to hold) a process, oldest first."""
        return sorted([*self.models.values(), *self.retiring], key=lambda r: r.epoch)

    def find(self, model: str) -> ModelRecord | None:
        """The starting or ready record of ``model``, else one on its way out."""
        return self.models.get(model) or next((r for r in self.retiring if r.spec.id == model), None)

    def is_current(self, record: ModelRecord) -> bool:
        return self.models.get(record.spec.id) is record

    # -- under activity_lock --------------------------------------------------------------

    def clear_expiry(self, record: ModelRecord) -> None:
        record.expires_at = record.expires_mono = None
        self.idle.pop(record, None)

    def set_expiry(self, record: ModelRecord, keep_alive_s: float) -> None:
        """The idle deadline of a ready record with no lease, ``keep_alive_s`` after its last use."""
        if keep_alive_s < 0:
            self.clear_expiry(record)
            return
        record.expires_mono = self.idle[record] = record.last_used_mono + keep_alive_s
        record.expires_at = (record.last_used_at or 0.0) + keep_alive_s

    # -- under both locks ------------------------------------------------------------

    def detach(self, record: ModelRecord, state: State) -> None:
        """Take ``record`` out of service (draining or stopping); it stays counted until dead."""
        del self.models[record.spec.id]
        self.retiring.add(record)
        record.state = state
        record.claimed_by = None
        self.clear_expiry(record)
