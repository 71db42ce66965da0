"""A real `jupyter server` process on a loopback port, for tests and benchmarks that talk to it from outside."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx

from mlx_jupyter import sse
from tests.helpers import wait_for
from tests.models import LONG, TINY

BASE = "/live/"


def free_port() -> int:
    """A port that was free a moment ago: another process may take it before the server binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A `jupyter server` process on a loopback port; talks to it with httpx.

    Ready means this process answers an authenticated request: not a fixed wait, and not
    merely "something listens on the port" (another process may have taken it between
    ``free_port()`` and the server's bind; the server then exits, and it starts again on
    a new port).
    """

    OPTIONS: ClassVar[dict[str, object]] = {
        "default_model": TINY,
        "idle_timeout": 1,
        "max_loaded_models": 2,
        "queue_timeout": 20,
        "max_tokens_limit": LONG,  # room for the answers tests hold open
    }
    STARTUP_S = 180  # a deadline, not a guess: a busy machine may take this long to import and bind
    PORT_ATTEMPTS = 5

    def __init__(
        self, tmp: Path, model_dir: Path, app: str = "jupyter_server", extra_args: tuple = (), **mlx_options: object
    ) -> None:
        self.tmp = tmp  # its config, runtime and data folders, and root_dir
        self.token = secrets.token_hex(16)
        self.env = dict(
            os.environ,
            JUPYTER_CONFIG_DIR=str(tmp / "config"),
            JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
            JUPYTER_DATA_DIR=str(tmp / "data"),
        )
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.args = [
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={BASE}",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.allow_unauthenticated_access=False",
            f"--ServerApp.root_dir={tmp}",
            # Each option once: traitlets does not let a repeated one override the first.
            *(f"--MLXExtension.{name}={value}" for name, value in (self.OPTIONS | mlx_options).items()),
            f"--MLXExtension.model_dirs={model_dir}",
            *extra_args,
        ]
        deadline = time.monotonic() + self.STARTUP_S
        for _ in range(self.PORT_ATTEMPTS):
            self._start(app)
            if self._wait_ready(deadline):
                return
            if self.proc.poll() is None or not self._lost_the_port():
                break
        self.stop()
        raise RuntimeError(f"jupyter server did not start:\n{self.log_path.read_text()}")

    def _start(self, app: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{BASE}"
        self.log.write(f"--- starting on port {self.port}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", app, f"--ServerApp.port={self.port}", *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"token {self.token}"}, timeout=60)

    def _wait_ready(self, deadline: float) -> bool:
        """True once this server answers our token; False if it exited or the deadline passed."""
        settled = wait_for(lambda: self.proc.poll() is not None or self._answers(), deadline - time.monotonic(), 0.2)
        if settled and self.proc.poll() is None:
            return True
        self.client.close()
        return False

    def _answers(self) -> bool:
        try:
            # Authenticated: a 200 proves it is this server (the token is ours), not one that took the port.
            return self.client.get("mlx/api/health", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def _lost_the_port(self) -> bool:
        """Did the last start exit because its port was taken (the race ``free_port`` leaves open)?"""
        self.log.flush()
        last_start = self.log_path.read_text(errors="replace").rsplit("--- starting on port", 1)[-1]
        return "is already in use" in last_start or "is not available" in last_start

    def models(self) -> list[dict]:
        return self.client.get("mlx/api/models").json()["models"]

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The ``data:`` objects of an SSE response, as they arrive."""
        with self.client.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()
            for event in sse.events(response):
                if event.data != sse.DONE:
                    yield event.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self.log.close()
        return self.proc.returncode
