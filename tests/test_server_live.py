"""A real `jupyter server` subprocess with a non-root base_url: clients from outside."""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from mlx_jupyter import sse
from tests.helpers import child_pids, pid_alive, wait_for
from tests.models import TINY, TINY_A, TINY_B

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
    }
    STARTUP_S = 180  # a deadline, not a guess: a busy machine may take this long to import and bind
    PORT_ATTEMPTS = 5

    def __init__(
        self, tmp: Path, model_dir: Path, app: str = "jupyter_server", extra_args: tuple = (), **mlx_options: object
    ) -> None:
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


@pytest.fixture
def live(tmp_path, model_dir):
    server = LiveServer(tmp_path, model_dir)
    yield server
    workers = [m["pid"] for m in server.models()] if server.proc.poll() is None else []
    server.stop()
    assert wait_for(lambda: not any(pid_alive(p) for p in workers if p), timeout=5), "workers outlived the server"


def test_a_live_server_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path, model_dir, monkeypatch):
    """The race behind "connection refused" on a busy machine: the port ``free_port()`` found is taken
    before the server binds it; the server exits, and the fixture must not hand it out as ready."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        monkeypatch.setattr(sys.modules[__name__], "free_port", lambda real=free_port: ports.pop() if ports else real())
        server = LiveServer(tmp_path, model_dir)
        try:
            assert server.port != taken.getsockname()[1] and server.proc.poll() is None
            assert server.client.get("mlx/api/health").json()["status"] == "ok"
        finally:
            server.stop()


def test_the_openai_client_works_with_the_jupyter_token_as_api_key(live):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=live.url + "mlx/v1", api_key=live.token)
    assert TINY in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "hello"}],
            max_completion_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            seed=1,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = client.completions.create(model=TINY, prompt="Beautiful is", max_tokens=6, temperature=0)
    streamed = client.completions.create(model=TINY, prompt="Beautiful is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    with pytest.raises(NotFoundError, match="models/available"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_native_stream_sends_text_chunks_then_a_final_event(live):
    events = list(live.stream("mlx/api/generate", {"prompt": "Beautiful is", "max_tokens": 8, "stream": True}))
    *chunks, final = events
    assert chunks and all(set(c) == {"text"} for c in chunks)
    assert final["done"] and final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 8
    assert set(final["timings"]) >= {"load_s", "ttft_s", "generation_tps", "prompt_tps"}


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(live):
    # Never unloaded behind the test's back, however slow the machine: the last request's keep_alive 0 unloads it.
    body = {"model": TINY_A, "prompt": "x", "max_tokens": 8000, "stream": True, "keep_alive": -1}
    stream = live.stream("mlx/api/generate", body)
    for _ in range(3):
        next(stream)
    (model,) = live.models()
    assert model["active_requests"] == 1
    stream.close()  # drops the connection
    assert wait_for(lambda: live.models()[0]["active_requests"] == 0, timeout=30), "the lease was not released"
    # the worker stopped generating: another request on it is answered at once
    again = {"model": TINY_A, "prompt": "x", "max_tokens": 2, "keep_alive": -1}
    assert live.client.post("mlx/api/generate", json=again).json()["finish_reason"] == "length"
    assert live.models()[0]["pid"] == model["pid"]
    # keep_alive 0 unloads right after this request: the reaper does so only when no lease is left
    assert live.client.post("mlx/api/generate", json=again | {"keep_alive": 0}).status_code == 200
    assert wait_for(lambda: live.models() == [], timeout=30), "the reaper could not unload after the disconnect"


def test_events_report_load_ready_busy_idle_and_unload(live):
    seen: list[tuple[str, str]] = []
    subscribed, done = threading.Event(), threading.Event()

    def listen():
        with httpx.stream("GET", live.url + "mlx/api/events", headers=live.client.headers, timeout=60) as response:
            for event in sse.events(response):
                if event.event == "snapshot":
                    subscribed.set()  # the server subscribes this stream before it sends the snapshot
                else:
                    seen.append((event.event, event.json()["model"]["id"]))
                    if event.event == "unload":
                        done.set()
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(60), "the event stream sent no snapshot"
    live.client.post("mlx/api/models/load", json={"model": TINY_B, "keep_alive": -1})
    live.client.post("mlx/api/generate", json={"model": TINY_B, "prompt": "x", "max_tokens": 3})
    live.client.post("mlx/api/models/unload", json={"model": TINY_B})
    assert done.wait(60), f"no unload event; saw {seen}"
    kinds = [kind for kind, model in seen if model == TINY_B]
    for expected in ("load", "ready", "busy", "idle", "unload"):
        assert expected in kinds, kinds
    assert kinds.index("load") < kinds.index("ready") < kinds.index("busy") < kinds.index("unload")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "jupyter server stop"])
def test_stopping_the_server_mid_stream_leaves_no_worker_process(live, how):
    stream = live.stream("mlx/api/generate", {"prompt": "x", "max_tokens": 8000, "stream": True})
    next(stream)
    pid = live.models()[0]["pid"]
    assert pid_alive(pid)
    if how == "jupyter server stop":
        subprocess.run(
            [sys.executable, "-m", "jupyter_server", "stop", str(live.port)], env=live.env, check=True, timeout=60
        )
    else:
        live.proc.send_signal(getattr(signal, how))  # Ctrl-C without a terminal stops at once
    assert live.proc.wait(30) is not None
    live.stop()
    assert wait_for(lambda: not pid_alive(pid), timeout=5)
    assert not child_pids(live.proc.pid)


def test_a_storm_of_clients_and_a_killed_worker_leave_the_server_healthy(live):
    seconds = min(float(os.environ.get("MLX_JUPYTER_STRESS_SECONDS", "8")), 15)
    start = time.monotonic()
    # The storm lasts its time and until enough requests succeeded: a busy machine does less per second.
    # The hard limit only bounds a server that answers nothing.
    enough, hard_limit = 10, start + seconds + 180
    # Statuses a client may get by design under this load; anything else fails.
    documented = {200, 404, 502, 503}
    statuses: list[int] = []
    unexpected: list[str] = []

    def storming() -> bool:
        now = time.monotonic()
        return now < hard_limit and (now < start + seconds or statuses.count(200) <= enough)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        http = httpx.Client(base_url=live.url, headers=live.client.headers, timeout=60)
        while storming():
            model = rng.choice([TINY_A, TINY_B, TINY])
            action = rng.random()
            try:
                if action < 0.15:
                    r = http.post("mlx/api/models/unload", json={"model": model})
                elif action < 0.3:
                    r = http.post("mlx/api/models/load", json={"model": model, "keep_alive": "1s"})
                elif action < 0.6:
                    body = {"model": model, "prompt": "x", "max_tokens": 1000, "stream": True}
                    with http.stream("POST", "mlx/api/generate", json=body) as r:
                        for _ in zip(range(rng.randint(1, 5)), r.iter_lines(), strict=False):
                            pass  # then leave mid-stream
                else:
                    r = http.post("mlx/api/generate", json={"model": model, "prompt": "x", "max_tokens": 4})
                statuses.append(r.status_code)
                if r.status_code not in documented:
                    unexpected.append(f"{r.status_code} {r.read()[:200]!r}")
            except httpx.HTTPError as exc:
                unexpected.append(repr(exc))
        http.close()

    def killer() -> None:
        while time.monotonic() < start + seconds / 2:
            time.sleep(0.1)  # mid-storm on purpose, not a wait for something
        busy = [m["pid"] for m in live.models() if m["pid"]]
        if busy:
            os.kill(busy[0], signal.SIGKILL)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)] + [threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, hard_limit - time.monotonic()) + 120)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    assert not unexpected, unexpected[:5]
    assert statuses.count(200) > enough
    health = live.client.get("mlx/api/health").json()
    assert health["status"] == "ok"
    answer = live.client.post("mlx/api/generate", json={"prompt": "x", "max_tokens": 2})
    assert answer.status_code == 200
