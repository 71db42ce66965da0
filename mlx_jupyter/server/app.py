"""The Jupyter server extension: one WorkerManager behind the REST APIs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from jupyter_server.extension.application import ExtensionApp
from traitlets import Int

from mlx_jupyter import __version__
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.settings import EngineSettings
from mlx_jupyter.server import handlers, openai
from mlx_jupyter.server.base import NOT_FOUND_ROUTE
from mlx_jupyter.server.events import EventHub
from mlx_jupyter.server.kernel_env import KernelEnv
from mlx_jupyter.server.metrics import EngineCollector
from mlx_jupyter.server.openapi import openapi_document
from mlx_jupyter.server.pool import RequestPool


class MLXExtension(EngineSettings, ExtensionApp):
    """Serves local MLX models to notebooks: ``/mlx/api/...`` and ``/mlx/v1/...``.

    The engine's settings are ``EngineSettings``' traits (``c.MLXExtension.idle_timeout``);
    the server adds its own below.
    """

    name = "mlx_jupyter"
    description = "Run local MLX language models from Jupyter"
    version = __version__
    load_other_extensions = True

    max_body_bytes = Int(
        4 * 1024 * 1024,
        config=True,
        help="""The largest request body, in bytes; larger ones get 413.""",
    )
    request_threads = Int(
        64,
        config=True,
        help="""Threads that run engine calls off the event loop; each running stream
        holds one, so this bounds concurrent generations. A load, unload or generation
        that finds them all busy waits ``queue_timeout`` at most, then gets 503.""",
    )

    def initialize_settings(self) -> None:
        self.manager = WorkerManager(self)  # reads the engine settings this extension inherits
        loop = self.serverapp.io_loop.asyncio_loop
        self.pool = RequestPool(self.request_threads, self.queue_timeout, loop)
        # Status calls get threads of their own so that they never queue behind streams.
        self.status_executor = ThreadPoolExecutor(2, thread_name_prefix="mlx-status")
        self.events = EventHub(self.manager, loop, self.status_executor)
        self.collector = EngineCollector.register(self.manager, self.events.snapshot)
        self.settings.update(
            mlx_manager=self.manager,
            mlx_pool=self.pool,
            mlx_status_executor=self.status_executor,
            mlx_events=self.events,
            mlx_openapi=openapi_document(),
            mlx_limits={"max_body_bytes": self.max_body_bytes},
        )
        self.kernel_env = KernelEnv(self.serverapp)
        self.serverapp.io_loop.add_callback(self.kernel_env.export)
        self.log.info(
            "mlx_jupyter %s: idle_timeout=%ss, max_loaded_models=%s, default_model=%s",
            __version__,
            self.idle_timeout,
            self.max_loaded_models,
            self.default_model,
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend([*handlers.routes(), *openai.routes(), NOT_FOUND_ROUTE])

    def current_activity(self) -> bool:
        """A running generation keeps the server alive under ``shutdown_no_activity``.

        Jupyter asks on its event loop, so the answer comes from the event hub's last
        snapshot (refreshed on every lease change), not from the engine's locks.
        """
        return any(status.active_requests for status in self.events.snapshot())

    async def stop_extension(self) -> None:
        self.log.info("mlx_jupyter: stopping every model worker and the idle reaper")
        self.kernel_env.withdraw()
        self.events.close()
        self.collector.unregister()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_engine)

    def _stop_engine(self) -> None:
        self.manager.shutdown()
        self.pool.shutdown()
        self.status_executor.shutdown(wait=False, cancel_futures=True)
