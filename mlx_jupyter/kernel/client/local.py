"""An engine hosted in the kernel: a WorkerManager (and so its idle reaper), for kernels with no server."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from mlx_jupyter.engine import EngineSettings, MLXError, WorkerManager
from mlx_jupyter.engine.generation import GenerationStream
from mlx_jupyter.kernel.client.base import MLXClient
from mlx_jupyter.kernel.client.errors import error_from_engine

# What an empty MLXMagics.default_model gives a kernel-hosted engine: the engine's own default.
ENGINE_DEFAULT_MODEL: str = EngineSettings.default_model.default_value


class LocalClient(MLXClient):
    """Hosts a WorkerManager (and so its idle reaper) in this kernel; it stops at kernel exit.

    The engine is created on first use, so loading the magics starts nothing; worker
    processes start only when a model is asked for. It reads ``settings`` at each decision,
    so a changed setting (the magics link theirs to it) reaches a running engine.
    """

    host = "this kernel (local engine)"

    def __init__(self, settings: EngineSettings | Mapping[str, Any] | None = None) -> None:
        self.settings = settings if isinstance(settings, EngineSettings) else EngineSettings(**(settings or {}))
        self._manager: WorkerManager | None = None
        self._lock = threading.Lock()  # guards the lazy start only; never held across engine calls
        atexit.register(self.close)
        # At interpreter exit the engine's spawner threads end before atexit handlers run, and a
        # worker dies with the thread that started it (PR_SET_PDEATHSIG): its death would be
        # reported as a crash. threading's own exit hooks run first, while those threads live.
        threading._register_atexit(self.close)  # type: ignore[attr-defined]

    @property
    def is_local(self) -> bool:
        return True

    @property
    def manager(self) -> WorkerManager:
        with self._lock:
            if self._manager is None:
                self._manager = WorkerManager(self.settings)
            return self._manager

    def health(self) -> dict[str, Any]:
        return self._engine(self.manager.health)

    def models(self) -> dict[str, Any]:
        statuses = self._engine(self.manager.status)
        return {"server_time": time.time(), "models": [s.to_dict() for s in statuses]}

    def available(self) -> list[dict[str, Any]]:
        specs = self._engine(self.manager.resolver.available)
        return [s.to_dict() for s in specs]

    def load(self, model: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        return self._engine(self.manager.load, model, keep_alive).to_dict()

    def unload(self, model: str) -> dict[str, Any]:
        return self._engine(self.manager.unload, model).to_dict()

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = {k: v for k, v in request.items() if k != "stream"}
        manager = self.manager
        chunks = self._engine(manager.stream_generate, **request)
        return _Events(chunks, request.get("model") or manager.default_model)

    def close(self) -> None:
        atexit.unregister(self.close)
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.shutdown()

    @staticmethod
    def _engine(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MLXError as exc:
            raise error_from_engine(exc) from None


class _Events(Iterator[dict[str, Any]]):
    """The local engine's stream as native events (as the REST API sends them); ``close()`` cancels it.

    No generator with a ``finally``: one dropped in a reference cycle would close the stream in
    whatever thread the garbage collector runs; the engine's stream hands that to its janitor.
    """

    def __init__(self, chunks: GenerationStream, model: str) -> None:
        self._chunks = chunks
        self._model = model

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._chunks).event(self._model)
        except MLXError as exc:
            raise error_from_engine(exc) from None

    def close(self) -> None:
        """Cancel the generation in the worker when the caller leaves early."""
        self._chunks.close()
