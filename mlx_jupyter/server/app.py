"""The Jupyter server extension: one WorkerManager and its reaper behind the REST APIs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, List, Type, Unicode, default

from mlx_jupyter import __version__
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.models import DEFAULT_MODEL
from mlx_jupyter.engine.reaper import IdleReaper
from mlx_jupyter.server import handlers, openai
from mlx_jupyter.server.base import NOT_FOUND_ROUTE
from mlx_jupyter.server.events import EventHub
from mlx_jupyter.server.kernel_env import KernelEnv
from mlx_jupyter.server.metrics import EngineCollector
from mlx_jupyter.server.pool import RequestPool


class MLXExtension(ExtensionApp):
    """Serves local MLX models to notebooks: ``/mlx/api/...`` and ``/mlx/v1/...``."""

    name = "mlx_jupyter"
    description = "Run local MLX language models from Jupyter"
    version = __version__
    load_other_extensions = True

    idle_timeout = Float(
        300.0,
        config=True,
        help="""Seconds a model may stay idle (no request running) before it is unloaded
        and its worker process exits. 0 keeps models loaded until they are evicted or
        unloaded by hand. A request's ``keep_alive`` overrides it for that model.""",
    )
    max_loaded_models = Int(
        2,
        config=True,
        help="""Resident models at most. Loading one more evicts the least recently used
        idle model; a busy model is never evicted (the request waits ``queue_timeout``).""",
    )
    memory_limit = Int(
        0,
        config=True,
        help="""Bytes of model memory at most (0 = no limit), counted before a load starts
        from the size of the model's weights; a load in progress counts.""",
    )
    model_dirs = List(
        Unicode(),
        config=True,
        help="""Directories whose subfolders holding a ``config.json`` are loadable models;
        a model's id is its folder name.""",
    )
    default_model = Unicode(
        DEFAULT_MODEL,
        config=True,
        help="""Model used when a request names none.""",
    )
    allow_downloads = Bool(
        False,
        config=True,
        help="""May a Hugging Face repo id that is not in the local Hugging Face cache be
        downloaded when a request asks for it.""",
    )
    queue_timeout = Float(
        60.0,
        config=True,
        help="""Seconds a request waits for a model slot while every resident model is
        busy, or for a request thread while all ``request_threads`` are busy, before it
        fails with 503 and a Retry-After header.""",
    )
    first_token_timeout = Float(
        120.0,
        config=True,
        help="""Seconds a worker may take to produce the first token of a request (prompt
        processing included) before it is killed as hung.""",
    )
    token_timeout = Float(
        30.0,
        config=True,
        help="""Seconds a worker may take between two tokens before it is killed as hung.""",
    )
    load_timeout = Float(
        300.0,
        config=True,
        help="""Seconds a worker may take to load a model (weights read, model built)
        before it is killed and the load fails.""",
    )
    unload_timeout = Float(
        60.0,
        config=True,
        help="""Seconds an unload waits for the model's running requests to end; then it
        answers 409 ``unload_pending`` and the model unloads when they end.""",
    )
    watchdog_threshold = Float(
        10.0,
        config=True,
        help="""Seconds an engine lock may be waited on or held before every thread's stack
        is logged and ``mlx/api/health`` turns ``degraded`` (until the stall ends).""",
    )
    warm_spare = Bool(
        True,
        config=True,
        help="""Keep one spare worker process started (Python up, mlx and mlx_lm imported) so
        that loading a model skips process start-up; it is replaced in the background after a
        load takes it. Costs one idle process (about 80 MB resident on Linux); turn off to save it.""",
    )
    batch_size = Int(
        32,
        min=1,
        config=True,
        help="""Sequences one worker decodes together. More concurrent requests to the model
        wait in arrival order, queued, until a sequence ends; the first-token deadline starts
        only when a request gets its place in the batch.""",
    )
    max_tokens_limit = Int(
        8192,
        config=True,
        help="""The largest ``max_tokens`` a request may ask for.""",
    )
    max_prompt_chars = Int(
        1_000_000,
        config=True,
        help="""The longest prompt (all messages together), in characters, a request may send.""",
    )
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
    manager_class = Type(
        WorkerManager,
        klass=WorkerManager,
        config=True,
        help="""The WorkerManager class to use (a subclass can add hooks in tests).""",
    )

    @default("model_dirs")
    def _default_model_dirs(self) -> list[str]:
        return []

    def initialize_settings(self) -> None:
        self.manager = self.manager_class(
            idle_timeout=self.idle_timeout,
            max_loaded_models=self.max_loaded_models,
            memory_limit=self.memory_limit,
            model_dirs=self.model_dirs,
            default_model=self.default_model,
            allow_downloads=self.allow_downloads,
            queue_timeout=self.queue_timeout,
            first_token_timeout=self.first_token_timeout,
            token_timeout=self.token_timeout,
            load_timeout=self.load_timeout,
            unload_timeout=self.unload_timeout,
            watchdog_threshold=self.watchdog_threshold,
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_chars=self.max_prompt_chars,
            warm_spare=self.warm_spare,
            batch_size=self.batch_size,
        )
        self.reaper = IdleReaper(self.manager)
        self.reaper.start()
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
            mlx_openapi=handlers.openapi_document(),
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
        self.log.info("mlx_jupyter: stopping the idle reaper and every model worker")
        self.kernel_env.withdraw()
        self.events.close()
        self.collector.unregister()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_engine)

    def _stop_engine(self) -> None:
        self.reaper.stop()
        self.manager.shutdown()
        self.pool.shutdown()
        self.status_executor.shutdown(wait=False, cancel_futures=True)
