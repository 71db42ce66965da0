"""WorkerManager: the engine's facade — load, unload, generate, status — over the registry and the workers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from mlx_jupyter import __version__
from mlx_jupyter.engine.errors import (
    ModelNotFoundError,
    UnloadPendingError,
    WorkerTimeoutError,
)
from mlx_jupyter.engine.generation import GenerationStream
from mlx_jupyter.engine.janitor import Janitor
from mlx_jupyter.engine.keep_alive import parse_keep_alive
from mlx_jupyter.engine.leases import Leases
from mlx_jupyter.engine.lifecycle import Lifecycle, spawn_worker
from mlx_jupyter.engine.locks import LockWatchdog, assert_no_locks_held
from mlx_jupyter.engine.models import ModelResolver, ModelSpec
from mlx_jupyter.engine.reaper import IdleReaper
from mlx_jupyter.engine.registry import ModelRecord, Registry, State
from mlx_jupyter.engine.request import GenerationRequest
from mlx_jupyter.engine.settings import EngineSettings, setting_names
from mlx_jupyter.engine.spare import Spawn
from mlx_jupyter.engine.types import GenerationResult, ModelStatus

log = logging.getLogger(__name__)

REAP_RETRY_S = 1.0


class WorkerManager:
    """Loads models into worker processes and serves generations from them.

    A thin facade over its parts: ``Registry`` (records, states, the two locks and the
    fields each guards), ``admission.decide`` (who gets a slot, which idle model makes
    room), ``Lifecycle`` (worker processes and the warm spare), ``GenerationStream`` (one
    answer, its deadlines and its cancel) and an ``IdleReaper``, which starts and stops
    with the manager. No lock is held across IPC, spawn, join, sleep, a wait or a
    ``yield``; waiters sleep on their ticket's Event.

    Settings are read from ``settings`` at each decision, so a host that changes one (a
    kernel's ``%config``) reaches a running engine; without one, keyword arguments name
    them (``WorkerManager(idle_timeout=60)``). The seams for tests are injected: ``spawn``
    starts a worker process, ``clock`` is the monotonic clock of idle deadlines (always
    read with no lock held, so a test's clock may act at that moment).
    """

    def __init__(
        self,
        settings: EngineSettings | None = None,
        *,
        resolver: ModelResolver | None = None,
        spawn: Spawn = spawn_worker,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> None:
        unknown = sorted(set(overrides) - set(setting_names()))
        if unknown:
            raise TypeError(f"unknown engine settings {unknown}: see EngineSettings")
        if settings is not None and overrides:
            raise TypeError("give either settings or keyword settings, not both")
        self.settings = settings if settings is not None else EngineSettings(**overrides)
        self.resolver = resolver or self._new_resolver()
        self._own_resolver = resolver is None
        self.clock = clock
        self._registry = Registry()
        self._life = Lifecycle(self._registry, self.settings, spawn, clock)
        self.leases = Leases(
            self._registry, self.settings, self._life, lambda model: self.resolver.resolve(model), clock
        )
        self._janitor = Janitor()
        self._health_checks: list[Callable[[], str | None]] = []
        self._watchdog = LockWatchdog(self.settings.watchdog_threshold)
        self._watchdog.start()
        self.settings.observe(self._idle_timeout_changed, "idle_timeout")
        self.settings.observe(self._model_sources_changed, ["model_dirs", "allow_downloads"])
        self._reaper = IdleReaper(self)
        self._reaper.start()
        if self.settings.warm_spare:
            self._life.spare.refill()

    # -- public API ------------------------------------------------------------------

    @property
    def default_model(self) -> str:
        return self.settings.default_model

    @property
    def counters(self) -> Counter[str]:
        """Life-cycle counts for metrics (loads, load_failures, evictions, idle_unloads, unloads, crashes, ...)."""
        return self._registry.counters

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (with no lock held) after every change of the models or their deadlines."""
        self._registry.add_listener(callback)

    def add_health_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns why the engine is degraded, or None; ``health()`` asks it each time."""
        self._health_checks.append(check)

    def load(self, model: str | None = None, keep_alive: Any = None) -> ModelStatus:
        """Load ``model`` (or find it loaded) and start its idle clock; returns its status."""
        lease = self.leases.take(model or self.default_model, parse_keep_alive(keep_alive))
        self.leases.release(lease)
        with self._registry.locked():
            return self._status(lease.record)

    def unload(self, model: str, timeout: float | None = None) -> ModelStatus:
        """Stop new requests to ``model``, wait for in-flight ones to drain, stop the worker.

        Waits ``timeout`` seconds at most (default ``unload_timeout``), then raises
        UnloadPendingError: the model stays draining and unloads when its requests end.
        """
        registry = self._registry
        timeout = self.settings.unload_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            to_stop = None
            with registry.change() as change:
                registry.check_open()
                record = registry.find(model)
                if record is None:
                    loaded = sorted(registry.models)
                    raise ModelNotFoundError(f"model {model!r} is not loaded", model=model, loaded=loaded)
                if record.state is State.READY:
                    registry.detach(record, State.DRAINING if record.leases else State.STOPPING)
                    to_stop = record if record.state is State.STOPPING else None
                else:
                    change.none()
                status = self._status(record)
            if record.state is not State.STARTING:
                break
            self._wait_until_loaded(record, deadline)
        log.info("unloading model %s (%s)", model, "now" if to_stop else f"after {status.active_requests} requests")
        if to_stop is not None:
            self._life.stop(to_stop)
        assert_no_locks_held("waiting for drain")
        if not record.dead.wait(max(0.0, deadline - time.monotonic())):
            raise UnloadPendingError(
                f"model {model!r} still has {record.leases} requests running after {timeout:g}s; "
                "it unloads when they end"
            )
        return status

    def generate(self, prompt: str | None = None, **fields: Any) -> GenerationResult:
        """Generate a whole answer (blocking); see ``stream_generate`` for the arguments."""
        # closing(): an interrupt here must still cancel the stream and release its lease.
        with contextlib.closing(self.stream_generate(prompt, **fields)) as stream:
            return stream.collect()

    def stream_generate(self, prompt: str | None = None, **fields: Any) -> GenerationStream:
        """Stream an answer: text chunks, then a final chunk with finish_reason, usage, timings.

        The keywords are ``GenerationRequest``'s fields (``model``, ``messages`` instead of
        ``prompt``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
        ``keep_alive``; ``None`` = absent). They are checked here, before any work starts;
        closing the stream early, or ``cancel()`` from any thread, cancels the generation.
        """
        request = GenerationRequest.parse({"prompt": prompt, **fields}, self.settings.request_limits())
        return GenerationStream(self, request)

    def ping(self, model: str, timeout: float = 2.0) -> float | None:
        """Round-trip seconds to ``model``'s worker, None if it did not answer in time."""
        with self._registry.locked(activity=False):
            record = self._registry.models.get(model)
            worker = record.worker if record is not None and record.state is State.READY else None
        if worker is None:
            raise ModelNotFoundError(f"model {model!r} is not loaded", model=model)
        return worker.ping(timeout)

    def status(self) -> list[ModelStatus]:
        """A snapshot of resident models; never waits for a generation or a load."""
        with self._registry.locked():
            return [self._status(r) for r in self._registry.resident()]

    @property
    def spare_pid(self) -> int | None:
        """The pid of the warm spare worker, None while there is none."""
        return self._life.spare.pid

    @property
    def degraded(self) -> str | None:
        """Why the engine is not healthy (a stalled lock, a dead reaper), or None; clears with its cause."""
        reasons = [f"lock watchdog: {self._watchdog.stall}"] if self._watchdog.stall else []
        for check in [self._reaper.health, *self._health_checks]:
            try:
                reason = check()
            except Exception as exc:
                reason = f"health check {check!r} failed: {exc!r}"
            if reason:
                reasons.append(reason)
        return "; ".join(reasons) or None

    def health(self) -> dict[str, Any]:
        with self._registry.locked():
            loaded = sum(r.state is State.READY for r in self._registry.models.values())
            busy = sum(r.leases for r in self._registry.resident())
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
        """The earliest idle deadline, on the manager's ``clock``; None when no model will expire."""
        with self._registry.locked(state=False):
            return min(self._registry.idle.values(), default=None)

    def reap_expired(self) -> list[str]:
        """Unload every idle model whose deadline has passed; returns their ids.

        Candidates come from a snapshot of the idle deadlines; each is then re-checked idle
        *and* expired at the moment of its commit (``_reap``).
        """
        now = self.clock()
        with self._registry.locked(state=False):
            due = [record for record, deadline in self._registry.idle.items() if deadline <= now]
        return [record.spec.id for record in due if self._reap(record)]

    def _reap(self, record: ModelRecord) -> bool:
        """Unload ``record`` if it is still idle and expired; a failure is logged and retried a little later."""
        now = self.clock()  # the moment of commit, read with no lock held
        try:
            return self._commit_reap(record, now)
        except Exception:
            log.exception("idle unload of %s failed; retrying in %gs", record.spec.id, REAP_RETRY_S)
            with self._registry.locked(state=False):
                if record in self._registry.idle:  # not a hot loop on a persistent failure
                    self._registry.idle[record] = record.expires_mono = now + REAP_RETRY_S
            return False

    def _commit_reap(self, record: ModelRecord, now: float) -> bool:
        """Re-check under the locks that ``record`` is current, idle and expired, detach it, then stop it."""
        with self._registry.change() as change:
            commit = self._registry.is_current(record) and self._expired(record, now)
            if commit:
                self._registry.detach(record, State.STOPPING)
                self._registry.counters["idle_unloads"] += 1
            else:
                change.none()
        if commit:
            log.info("unloading model %s: idle for %.0fs", record.spec.id, now - record.last_used_mono)
            self._life.stop(record)
        return commit

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail in-flight requests with a clear error and stop every worker, the spare and the reaper."""
        registry = self._registry
        with registry.change():
            if registry.closed:
                return
            registry.closed = True
            records = registry.resident()
            for record in records:
                record.state = State.STOPPING
                registry.clear_expiry(record)
            registry.models.clear()
        log.info("shutting down %d model workers", len(records))
        self.settings.unobserve(self._idle_timeout_changed, "idle_timeout")
        self.settings.unobserve(self._model_sources_changed, ["model_dirs", "allow_downloads"])
        self._reaper.stop()
        self._life.shutdown(records, timeout)
        self._janitor.stop()
        self._watchdog.stop()

    def __enter__(self) -> WorkerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- helpers -----------------------------------------------------------------------

    def _status(self, record: ModelRecord) -> ModelStatus:
        return record.status(self.settings.idle_timeout)

    @staticmethod
    def _expired(record: ModelRecord, now: float) -> bool:
        return (
            record.state is State.READY
            and record.leases == 0
            and record.expires_mono is not None
            and record.expires_mono <= now
        )

    def _wait_until_loaded(self, record: ModelRecord, deadline: float) -> None:
        assert_no_locks_held("waiting for a load")
        while record.state is State.STARTING:
            if time.monotonic() > deadline:
                raise WorkerTimeoutError(f"model {record.spec.id!r} is still loading")
            record.dead.wait(0.05)

    def _resolve(self, model: str) -> ModelSpec:
        return self.resolver.resolve(model)  # the resolver of the moment: model_dirs may change

    def _new_resolver(self) -> ModelResolver:
        return ModelResolver(self.settings.model_dirs, allow_downloads=self.settings.allow_downloads)

    def _idle_timeout_changed(self, change: dict[str, Any]) -> None:
        """A new idle timeout applies at once to models already idle under the old one."""
        with self._registry.change():
            for record in self._registry.models.values():
                if record.state is State.READY and record.leases == 0 and record.keep_alive_s is None:
                    self._registry.set_expiry(record, record.keep_alive(self.settings.idle_timeout))

    def _model_sources_changed(self, change: dict[str, Any]) -> None:
        if self._own_resolver:
            self.resolver = self._new_resolver()
