"""A real `jupyter server` subprocess with a non-root base_url: clients from outside."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mlx_jupyter import sse
from tests import live_server
from tests.helpers import child_pids, pid_alive, wait_for
from tests.live_server import LiveServer
from tests.models import LONG, TINY, TINY_A, TINY_B


def test_a_live_server_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path, model_dir, monkeypatch):
    """The race behind "connection refused" on a busy machine: the port ``free_port()`` found is taken
    before the server binds it; the server exits, and the fixture must not hand it out as ready."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        monkeypatch.setattr(
            live_server, "free_port", lambda real=live_server.free_port: ports.pop() if ports else real()
        )
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
    body = {"model": TINY_A, "prompt": "x", "max_tokens": LONG, "stream": True, "keep_alive": -1}
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
    stream = live.stream("mlx/api/generate", {"prompt": "x", "max_tokens": LONG, "stream": True})
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
