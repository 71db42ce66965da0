"""Worker life: start a model's worker (adopt the spare or spawn, then load), stop it, kill it when hung."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from mlx_jupyter.engine.errors import ManagerClosedError, MLXError, ModelLoadError, WorkerCrashedError
from mlx_jupyter.engine.locks import assert_no_locks_held
from mlx_jupyter.engine.registry import Lease, ModelRecord, Registry, State
from mlx_jupyter.engine.settings import EngineSettings
from mlx_jupyter.engine.spare import OnExit, Spawn, WarmSpare
from mlx_jupyter.engine.worker import WorkerProcess

log = logging.getLogger(__name__)

# Threads that start workers for loads (a load never queues behind the spare's refill,
# which has a thread of its own).
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


class Lifecycle:
    """Starts and stops the worker processes behind the registry's records.

    Slow work (spawn, load, stop, kill, join) happens with no lock held, behind a record's
    state; each result is published through ``registry.change()``. Workers are spawned
    from long-lived threads: Linux's PR_SET_PDEATHSIG fires when the *thread* that started
    the process exits, so it must not be a request's.
    """

    def __init__(self, registry: Registry, settings: EngineSettings, spawn: Spawn, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._settings = settings
        self._spawn = spawn
        self._clock = clock
        self._spawner = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="mlx-spawner")
        self.spare = WarmSpare(spawn, lambda: settings.spawn_timeout)

    def start(self, record: ModelRecord, grant: Callable[[ModelRecord, float], Lease]) -> Lease:
        """Give ``record`` a worker with its model loaded and publish it ready, with the loader's lease.

        ``grant(record, now)`` runs in the critical section that publishes ``ready``, so no
        reaper can unload the model before its request holds it (with ``keep_alive=0`` it
        would expire at once). Any exception, KeyboardInterrupt included, takes the failure
        path: the record goes dead with an error its waiters share, and the worker is killed.
        """
        registry, settings, spec = self._registry, self._settings, record.spec
        # The load time is what the request waited: starting the process (importing mlx) included.
        started = time.perf_counter()

        def on_exit(w: WorkerProcess) -> None:
            self._exited(record, w)

        worker: WorkerProcess | None = None
        spawned: Future[WorkerProcess] | None = None
        try:
            if settings.warm_spare:
                worker = self.spare.take(spec.id, on_exit)
            if worker is None:
                assert_no_locks_held("spawn")
                spawned = self._spawner.submit(self._spawn, spec.id, on_exit, settings.spawn_timeout)
                worker = spawned.result()
            with registry.change(activity=False):
                record.worker = worker
                closed = registry.closed or record.state is not State.STARTING
            if closed:
                raise ManagerClosedError("the model server is shutting down")
            loaded = worker.load(
                str(spec.path),
                settings.load_timeout,
                batch_size=settings.batch_size,
                memory_limit=settings.memory_limit,
            )
            now = self._clock()
            with registry.change():
                record.memory_bytes = int(loaded.get("memory_bytes") or 0)
                record.context_length = loaded.get("context_length")
                record.load_s = time.perf_counter() - started
                record.loaded_at = time.time()
                lease = None
                if record.state is State.STARTING:
                    record.state = State.READY
                    registry.counters["loads"] += 1
                    lease = grant(record, now)
            if lease is None:
                raise ManagerClosedError("the model server is shutting down")
        except BaseException as exc:
            self._failed(record, worker, spawned, exc)
            raise
        if worker.exited.is_set():  # it died while we published: the reader skipped a starting record
            self._exited(record, worker)
            raise WorkerCrashedError(
                f"the worker for model {spec.id!r} died right after loading it; the next request starts a fresh one"
            )
        log.info("model %s ready in worker pid %s (%.2fs)", spec.id, worker.pid, record.load_s or 0.0)
        return lease

    def stop(self, record: ModelRecord) -> None:
        """Stop a detached record's worker; its exit marks the record dead."""
        assert_no_locks_held("stopping a worker")
        if record.worker is not None:
            record.worker.stop()
        else:
            self._exited(record, None)

    def kill_hung(self, lease: Lease, message: str, code: str) -> None:
        """Kill a hung worker; counted once per worker, however many of its requests saw it hang."""
        with self._registry.change():
            first = self._registry.is_current(lease.record)
            if first:
                self._registry.detach(lease.record, State.STOPPING)
                self._registry.counters["hung_kills"] += 1
        if first:
            log.error("%s", message)
        lease.worker.kill(message, code)

    def shutdown(self, records: list[ModelRecord], timeout: float) -> None:
        """Kill every worker of ``records`` (already out of service), the spare and the spawners."""
        self.spare.shutdown()
        for record in records:
            if record.worker is not None:
                record.worker.kill("the model server is shutting down", ManagerClosedError.code)
        for record in records:
            if record.worker is not None:
                record.worker.join(timeout)
        self._spawner.shutdown(wait=True, cancel_futures=True)

    def _failed(
        self,
        record: ModelRecord,
        worker: WorkerProcess | None,
        spawned: Future[WorkerProcess] | None,
        exc: BaseException,
    ) -> None:
        registry = self._registry
        if isinstance(exc, MLXError):
            error = exc
        elif registry.closed:
            error = ManagerClosedError("the model server is shutting down")
        elif isinstance(exc, Exception):
            error = ModelLoadError(f"starting a worker for {record.spec.id!r} failed: {exc!r}")
        else:
            error = ModelLoadError(f"loading {record.spec.id!r} was interrupted ({type(exc).__name__})")
        log.warning("loading model %s failed: %s", record.spec.id, error)
        with registry.change(activity=False):
            if registry.is_current(record):
                del registry.models[record.spec.id]
            record.state = State.DEAD
            record.error = error
            registry.counters["load_failures"] += 1
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
        if error is not exc and isinstance(exc, Exception):
            raise error from exc

    def _exited(self, record: ModelRecord, worker: WorkerProcess | None) -> None:
        """Called (with no lock held) once a record's process is gone."""
        registry = self._registry
        with registry.change():
            if record.state is State.STARTING:
                return  # the loading thread sees the failure and cleans up itself
            crashed = registry.is_current(record)
            if crashed:
                del registry.models[record.spec.id]
                registry.clear_expiry(record)
                registry.counters["crashes"] += 1
            registry.retiring.discard(record)
            if record.state is not State.DEAD and record.loaded_at is not None:
                registry.counters["unloads"] += 1
            record.state = State.DEAD
        if crashed:
            log.warning("model %s lost its worker (pid %s)", record.spec.id, worker.pid if worker else None)
        record.dead.set()
