"""Shared fixtures: lock checker in validate mode, managers that clean up, orphan checks."""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from traitlets.config import Config

from mlx_jupyter.engine import locks, protocol
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.engine.models import builtin_model_path
from mlx_jupyter.engine.worker import WorkerProcess
from tests.helpers import child_pids, pid_alive, wait_for
from tests.live_server import LiveServer
from tests.models import BROKEN, TINY, TINY_A, TINY_B, TINY_CONTEXT

if TYPE_CHECKING:
    from mlx_jupyter.server.app import MLXExtension

# The whole suite, child processes included, runs the checker in validate mode, and
# builds the built-in model once per run in a private cache.
os.environ["MLX_JUPYTER_LOCKDEP"] = "validate"
locks.set_mode("validate")
_OWN_CACHE = None if "MLX_JUPYTER_CACHE" in os.environ else tempfile.mkdtemp(prefix="mlx-jupyter-test-cache-")
if _OWN_CACHE:
    os.environ["MLX_JUPYTER_CACHE"] = _OWN_CACHE

faulthandler.enable(file=sys.stderr, all_threads=True)


def _no_engine_lock_held_while_blocking() -> None:
    """Every blocking call in the suite, in any thread, first asserts that its thread holds no
    engine lock: nothing sleeps, waits or joins under the locks (a thread's first start waits too)."""

    def guarded(fn, what):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            locks.assert_no_locks_held(what)
            return fn(*args, **kwargs)

        return call

    threading.Condition.wait = guarded(threading.Condition.wait, "Condition.wait")
    threading.Event.wait = guarded(threading.Event.wait, "Event.wait")
    threading.Thread.join = guarded(threading.Thread.join, "Thread.join")
    subprocess.Popen.wait = guarded(subprocess.Popen.wait, "Popen.wait")
    time.sleep = guarded(time.sleep, "time.sleep")


_no_engine_lock_held_while_blocking()

pytest_plugins = ["pytest_jupyter.jupyter_server"]


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_lock_violations():
    """Any lock-order violation, in any thread, fails the test that caused it."""
    locks.clear_violations()
    yield
    found = locks.violations()
    locks.clear_violations()
    assert not found, "lock order violations:\n" + "\n".join(found)


@pytest.fixture
def make_manager():
    """Build WorkerManagers with short test deadlines; shut down and check for orphans after."""
    made: list[WorkerManager] = []

    def make(cls: type[WorkerManager] = WorkerManager, **kwargs) -> WorkerManager:
        # The built-in default is builtin:pydoc-chat; tests that need no real text use the faster tiny model.
        kwargs.setdefault("default_model", TINY)
        kwargs.setdefault("idle_timeout", 0)
        kwargs.setdefault("queue_timeout", 30)
        kwargs.setdefault("first_token_timeout", 30)
        kwargs.setdefault("token_timeout", 10)
        kwargs.setdefault("max_tokens_limit", TINY_CONTEXT)  # room for the answers tests hold open
        manager = cls(**kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown()
    assert wait_for(lambda: not child_pids(), timeout=10), f"worker processes left behind: {child_pids()}"


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes with the tiny model loaded (``batch_size`` rows, the worker's
    default when not given), to drive through the frame protocol; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def spawn(batch_size: int = protocol.BATCH_SIZE) -> WorkerProcess:
        process = WorkerProcess(TINY)
        started.append(process)
        process.spawn(60)
        process.load(str(builtin_model_path("tiny")), 120, batch_size=batch_size)
        return process

    yield spawn
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A model_dirs folder with two copies of the built-in model, ``tiny-a`` and ``tiny-b``."""
    root = tmp_path_factory.mktemp("models")
    for name in (TINY_A, TINY_B):
        shutil.copytree(builtin_model_path("tiny"), root / name)
    return root


@pytest.fixture
def live(tmp_path, model_dir) -> Iterator[LiveServer]:
    """A `jupyter server` process with our extension and ``model_dir``'s models (tests/live_server.py).

    After the test, the kernels it started are shut down, and its workers must exit with it.
    """
    server = LiveServer(tmp_path, model_dir)
    yield server
    running = server.proc.poll() is None
    workers = [m["pid"] for m in server.models()] if running else []
    for kernel in server.client.get("api/kernels").json() if running else []:
        server.client.delete(f"api/kernels/{kernel['id']}")
    server.stop()
    assert wait_for(lambda: not any(pid_alive(p) for p in workers if p), timeout=15), "workers outlived the server"


@pytest.fixture(scope="session")
def broken_model_dir(tmp_path_factory) -> Path:
    """A model_dirs folder holding ``tiny-broken``: the built-in model with garbage weights."""
    root = tmp_path_factory.mktemp("broken-models")
    shutil.copytree(builtin_model_path(), root / BROKEN)
    (root / BROKEN / "model.safetensors").write_bytes(b"\x07garbage, not a safetensors header" * 8)
    return root


@pytest.fixture
def mlx_config(model_dir, broken_model_dir, request) -> dict:
    """MLXExtension settings for the in-process Jupyter server, with both model folders; a module
    changes them by overriding this fixture, a test by indirect parametrize."""
    return {
        "default_model": TINY,
        "idle_timeout": 0,
        "queue_timeout": 10,
        "first_token_timeout": 30,
        "token_timeout": 10,
        "max_tokens_limit": 1000,
        "max_body_bytes": 512 * 1024,  # room for a prompt longer than tiny's 32768-token context
        "model_dirs": [str(model_dir), str(broken_model_dir)],
    } | getattr(request, "param", {})


@pytest.fixture
def jp_server_config(mlx_config):
    """pytest-jupyter's server: our extension on, no unauthenticated access at all."""
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"mlx_jupyter": True},
                "allow_unauthenticated_access": False,
            },
            "MLXExtension": mlx_config,
        }
    )


@pytest.fixture
def jp_asyncio_loop(jp_asyncio_loop, request):
    """pytest-jupyter's loop, wrapped. Its teardown runs after the in-process server's (the autouse
    ``jp_server_cleanup``, which stops the server and our extension, requests the loop): by then a
    test that started the server may have left no process behind (a model worker least of all)."""
    yield jp_asyncio_loop
    if "jp_serverapp" in request.fixturenames:
        assert not ServerApp.initialized(), "this check must run after the Jupyter server's teardown"
        assert wait_for(lambda: not child_pids(), timeout=10), f"processes outlived the server: {child_pids()}"


@pytest.fixture
def manager(jp_serverapp) -> WorkerManager:
    """The in-process Jupyter server's engine."""
    return jp_serverapp.web_app.settings["mlx_manager"]


@pytest.fixture
def extension(jp_serverapp) -> MLXExtension:
    """The in-process Jupyter server's MLXExtension."""
    (app,) = jp_serverapp.extension_manager.extension_apps["mlx_jupyter"]
    return app


@pytest.fixture
def jp_base_url() -> str:
    """A non-root base_url, so every route is proven to live under it."""
    return "/base/url/"


@pytest.fixture
def openai_call(http_server_client, jp_http_port, jp_base_url, jp_serverapp):
    """Call the real (blocking) ``openai`` client in a thread, so that the server's loop, which
    is the test's, keeps serving: ``await openai_call(lambda client: ..., api_key=...)``.
    (``http_server_client`` starts the HTTP server on ``jp_http_port``.)"""

    async def call(use: Callable[[openai.OpenAI], Any], api_key: str = jp_serverapp.identity_provider.token) -> Any:
        base_url = f"http://127.0.0.1:{jp_http_port}{url_path_join(jp_base_url, 'mlx/v1')}"
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
        try:
            return await asyncio.to_thread(use, client)
        finally:
            client.close()

    return call


@pytest.fixture
def shell():
    """A fresh IPython InteractiveShell with ``%load_ext mlx_jupyter`` and a kernel-hosted engine.

    The cached client is closed after the test, so no worker outlives it.
    """
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_jupyter.kernel import client as mlx_client

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "mlx_jupyter")
    sh.run_line_magic("config", "MLXMagics.server = 'local'")
    sh.run_line_magic("config", "MLXMagics.idle_timeout = 0")
    sh.run_line_magic("config", f"MLXMagics.max_tokens_limit = {TINY_CONTEXT}")  # room for LONG answers
    yield sh
    mlx_client.reset_client()
    InteractiveShell.clear_instance()
    assert wait_for(lambda: not child_pids(), timeout=10), f"worker processes left behind: {child_pids()}"
