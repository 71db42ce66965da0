"""Leases: a request's hold on a ready worker, taken in arrival order (loading or evicting as need be)."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable

from mlx_jupyter.engine import admission
from mlx_jupyter.engine.errors import AllModelsBusyError, InvalidRequestError, RequestCancelledError
from mlx_jupyter.engine.lifecycle import Lifecycle
from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.models import ModelSpec
from mlx_jupyter.engine.registry import Lease, ModelRecord, Registry, State, Ticket
from mlx_jupyter.engine.request import GenerationRequest
from mlx_jupyter.engine.settings import EngineSettings

log = logging.getLogger(__name__)


class Leases:
    """Grants and releases leases on the registry's workers.

    A request takes a ticket and waits on its Event, with no lock held, until
    ``admission.decide`` lets it lease a ready worker, load its model, or make room by
    evicting an idle one; each decision and its effect happen in one ``registry.change()``.
    A lease keeps its worker alive and its model busy (no idle deadline) until released.
    """

    def __init__(
        self,
        registry: Registry,
        settings: EngineSettings,
        life: Lifecycle,
        resolve: Callable[[str], ModelSpec],
        clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._life = life
        self._resolve = resolve
        self._clock = clock

    def take(
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
        registry, settings = self._registry, self._settings
        spec = self._resolve(model)
        deadline = time.monotonic() + settings.queue_timeout
        with registry.locked(activity=False):
            registry.check_open()
            ticket = registry.new_ticket(spec.id, wakeup)
        try:
            while True:
                now = self._clock()
                to_load = victim = None
                with registry.change() as change:
                    registry.check_open()
                    ticket.wakeup.clear()
                    if cancelled is not None and cancelled.is_set():
                        raise RequestCancelledError(f"the request for model {spec.id!r} was cancelled while it waited")
                    record = registry.models.get(spec.id)
                    if record is None:
                        self._raise_if_failed(ticket)
                    decision = admission.decide(
                        ticket.seq,
                        spec.id,
                        spec.size_bytes,
                        [self._resident(r) for r in registry.resident()],
                        [(t.seq, t.model) for t in registry.waiters],
                        settings.max_loaded_models,
                        settings.memory_limit,
                    )
                    if decision.action == "grant":
                        assert record is not None
                        return self._grant(ticket, record, keep_alive, now)
                    if decision.action == "load":
                        registry.drop_claims(ticket)
                        to_load = registry.add(spec, keep_alive)
                    elif decision.action == "evict":
                        registry.drop_claims(ticket)
                        victim = registry.models[decision.victim]
                        registry.detach(victim, State.STOPPING)
                        registry.counters["evictions"] += 1
                    elif decision.action == "claim":
                        registry.models[decision.victim].claimed_by = ticket
                    else:
                        change.none()
                    ticket.waiting_on = record or to_load
                if victim is not None:
                    log.info("evicting idle model %s to make room for %s", victim.spec.id, spec.id)
                    self._life.stop(victim)
                elif to_load is not None:
                    return self._life.start(to_load, lambda r, now: self._grant(ticket, r, keep_alive, now))
                elif decision.action == "wait":
                    waiting_for_load = ticket.waiting_on is not None and ticket.waiting_on.state is State.STARTING
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and not waiting_for_load:
                        raise AllModelsBusyError(
                            f"model {spec.id!r} could not be loaded within {settings.queue_timeout:g}s: all "
                            f"{settings.max_loaded_models} model slots stayed busy; retry later or raise "
                            "max_loaded_models"
                        )
                    assert_no_locks_held("waiting for a model")
                    ticket.wakeup.wait(1.0 if waiting_for_load else max(0.01, min(remaining, 1.0)))
        finally:
            with registry.change(activity=False):
                registry.withdraw(ticket)

    def _grant(self, ticket: Ticket, record: ModelRecord, keep_alive: float | None, now: float) -> Lease:
        """Under both locks: one more lease on a ready ``record``; its idle clock stops."""
        record.leases += 1
        record.keep_alive_s = keep_alive
        record.last_used_at, record.last_used_mono = time.time(), now
        self._registry.clear_expiry(record)
        assert record.worker is not None
        loaded_now = ticket.waiting_on is record
        return Lease(record, record.worker, record.load_s if loaded_now else None)

    def release(self, lease: Lease) -> None:
        record, to_stop = lease.record, None
        now = self._clock()
        with self._registry.change():
            record.leases -= 1
            record.last_used_at, record.last_used_mono = time.time(), now
            if record.leases == 0:
                if record.state is State.DRAINING:
                    record.state = State.STOPPING
                    to_stop = record
                elif record.state is State.READY:
                    self._registry.set_expiry(record, record.keep_alive(self._settings.idle_timeout))
        if to_stop is not None:
            self._life.stop(to_stop)

    def kill(self, lease: Lease, message: str, code: str) -> None:
        """Kill the hung worker behind ``lease``; every request on it fails at once."""
        self._life.kill_hung(lease, message, code)

    def check_fits(self, lease: Lease, request: GenerationRequest) -> None:
        """Refuse a request its model cannot serve, once the model (and its context) is known."""
        context = lease.record.context_length
        if context and request.max_tokens > context:
            raise InvalidRequestError(
                f"max_tokens is {request.max_tokens} but model {lease.record.spec.id!r} has a context of "
                f"{context} tokens; ask for at most {context}"
            )

    def _raise_if_failed(self, ticket: Ticket) -> None:
        # Requests that waited on a load share its failure instead of retrying it.
        failed = ticket.waiting_on
        if failed is not None and failed.state is State.DEAD and failed.error is not None:
            raise copy.copy(failed.error)

    @staticmethod
    def _resident(record: ModelRecord) -> admission.Resident:
        return admission.Resident(
            model=record.spec.id,
            state=record.state.value,
            leases=record.leases,
            last_used=record.last_used_mono,
            claimed_by=record.claimed_by.seq if record.claimed_by is not None else None,
            memory_bytes=record.memory_bytes or record.spec.size_bytes,
        )
