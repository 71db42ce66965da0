"""The worker and its parent-side handle at their edges: a full batch, bad frames, stuck processes, bounds."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from traitlets import TraitError

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine import worker as worker_module
from mlx_jupyter.engine.errors import InvalidRequestError, WorkerCrashedError
from mlx_jupyter.engine.models import builtin_model_path
from mlx_jupyter.engine.worker import WorkerProcess
from mlx_jupyter.engine.worker_channel import Commands
from mlx_jupyter.kernel import client as mlx_client
from tests.helpers import run_concurrently, wait_for
from tests.models import LONG, PYDOC, TINY
from tests.worker_frames import drain, submit

REPO = Path(__file__).resolve().parent.parent
SECRETS = ("MLX_JUPYTER_TOKEN", "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")


def _next(frames: queue.SimpleQueue, kind: str) -> dict[str, Any]:
    frame = frames.get(timeout=30)
    assert frame["type"] == kind, frame
    return frame


def _settle(worker: WorkerProcess, running: queue.SimpleQueue) -> None:
    """Return once the worker's main loop has taken in every message sent before this call.

    The pong proves its reader thread queued them; a token sent after the pong comes from
    a decoding step that may have begun before, so the second one proves a whole loop turn.
    """
    assert worker.ping(30) is not None
    while True:
        try:
            running.get_nowait()
        except queue.Empty:
            break
    _next(running, p.T_TOKEN)
    _next(running, p.T_TOKEN)


def _send_raw(worker: WorkerProcess, data: bytes) -> None:
    worker._outbox.put(data)  # bytes the parent would never send: the writer passes them through


# -- a full batch ----------------------------------------------------------------


def test_requests_beyond_the_batch_wait_without_started_and_take_free_rows_in_arrival_order(spawn_worker):
    worker = spawn_worker(batch_size=2)
    a = submit(worker, "a", prompt="x", max_tokens=LONG)
    b = submit(worker, "b", prompt="y", max_tokens=LONG)
    for frames in (a, b):
        _next(frames, p.T_STARTED)
        _next(frames, p.T_TOKEN)
    c = submit(worker, "c", prompt="Hello", max_tokens=LONG)
    d = submit(worker, "d", prompt="abc", max_tokens=LONG)
    _settle(worker, a)
    assert c.empty() and d.empty(), "a request was started while both rows were decoding"
    worker.cancel("a")
    assert drain(a)[1]["finish_reason"] == "cancelled"
    _next(c, p.T_STARTED)
    _next(c, p.T_TOKEN)
    _settle(worker, b)
    assert d.empty(), "the later request took the free row"
    worker.cancel("d")  # a queued request's cancel ends it at once, without a row
    assert _next(d, p.T_ERROR)["code"] == "cancelled"
    for rid, frames in (("b", b), ("c", c)):
        worker.cancel(rid)
        assert drain(frames)[1]["finish_reason"] == "cancelled"


@pytest.mark.parametrize("batch_size", [1, 2])
def test_more_concurrent_streams_than_the_batch_holds_all_finish_with_their_own_answers(
    make_manager, monkeypatch, batch_size
):
    manager = make_manager(batch_size=batch_size)
    prompts = ["The for statement", "A list is", "Hello"][: batch_size + 1]
    alone = [manager.generate(prompt, model=PYDOC, max_tokens=40) for prompt in prompts]
    assert len({a.text for a in alone}) == len(prompts), "the prompts must have different answers"
    (status,) = manager.status()

    # Hold the generate frames back until all of them are sent, then write them at once:
    # every request reaches the worker while the first ones are still decoding.
    real_write, held, lock = p.write_all, [], threading.Lock()

    def write_together(fd: int, data: bytes) -> None:
        if b'"op":"generate"' not in data[:64]:
            return real_write(fd, data)
        with lock:
            held.append(data)
            batch = b"".join(held) if len(held) == len(prompts) else b""
        if batch:
            real_write(fd, batch)

    monkeypatch.setattr(p, "write_all", write_together)
    results = run_concurrently(manager, [{"prompt": prompt, "max_tokens": 40} for prompt in prompts], model=PYDOC)
    assert len(held) == len(prompts)
    assert [(r.text, r.finish_reason) for r in results] == [(a.text, a.finish_reason) for a in alone], results
    assert [s.pid for s in manager.status()] == [status.pid]
    assert manager.counters["hung_kills"] == 0 and manager.counters["crashes"] == 0


@pytest.fixture
def mlx_config(mlx_config) -> dict:
    return mlx_config | {"batch_size": 3}


def test_the_server_gives_its_batch_size_to_the_manager(jp_serverapp):
    assert jp_serverapp.web_app.settings["mlx_manager"].settings.batch_size == 3


def test_the_kernels_batch_size_reaches_its_local_engine_and_zero_is_refused(shell):
    shell.run_line_magic("config", "MLXMagics.batch_size = 3")
    assert mlx_client.get_client().manager.settings.batch_size == 3
    with pytest.raises(TraitError, match="less than"):
        shell.magics_manager.registry["MLXMagics"].batch_size = 0


# -- frames over the limit, frames that are not requests -------------------------------


def test_a_message_over_the_frame_limit_is_refused_before_sending_with_the_size_and_the_limit(spawn_worker):
    worker = spawn_worker()
    message = {"op": p.OP_GENERATE, "request_id": "big", "prompt": "x" * p.MAX_FRAME, "max_tokens": 4}
    size = len(json.dumps(message, separators=(",", ":")))
    with pytest.raises(InvalidRequestError, match=rf"{size} bytes.* over the {p.MAX_FRAME} byte limit"):
        worker.send(message)
    assert drain(submit(worker, "after", prompt="Hello", max_tokens=5))[1]["finish_reason"] == "length"


def test_the_engine_refuses_a_prompt_over_the_frame_limit_and_keeps_the_worker(make_manager, monkeypatch):
    manager = make_manager()
    pid = manager.load(TINY).pid
    monkeypatch.setattr(p, "MAX_FRAME", 64 * 1024)
    with pytest.raises(InvalidRequestError, match=r"over the 65536 byte limit"):
        manager.generate("x" * 100_000, model=TINY, max_tokens=4)
    (status,) = manager.status()
    assert status.active_requests == 0 and status.pid == pid
    assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"


def _oversized(rid: str) -> bytes:
    head = json.dumps({"op": p.OP_GENERATE, "request_id": rid, "prompt": ""}).encode()[:-2]
    body = head + b"x" * (p.MAX_FRAME + 1 - len(head)) + b'"}'
    return len(body).to_bytes(4, "big") + body


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


BAD_FRAMES = {
    "over the limit": (_oversized("bad"), "over the 67108864 byte limit"),
    "not JSON": (_framed(b'{"op": "generate", "request_id": "bad", "prompt": "x'), "not JSON"),
    "unknown op": (_framed(b'{"op": "fly", "request_id": "bad"}'), "unknown operation 'fly'"),
    "not an object": (_framed(b"[1, 2]"), None),
    "cancel without an id": (_framed(b'{"op": "cancel"}'), None),
    "request id not a string": (_framed(b'{"op": "generate", "request_id": [1], "prompt": "x"}'), None),
}


@pytest.mark.parametrize("bad", BAD_FRAMES, ids=list(BAD_FRAMES))
def test_the_worker_answers_a_bad_frame_for_its_request_id_and_keeps_serving_the_others(spawn_worker, bad):
    worker = spawn_worker()
    running = submit(worker, "running", prompt="x", max_tokens=LONG)
    _next(running, p.T_STARTED)
    data, reason = BAD_FRAMES[bad]
    answer = worker.open("bad")
    _send_raw(worker, data)
    if reason is not None:
        error = _next(answer, p.T_ERROR)
        assert error["code"] == "invalid_request" and reason in error["message"], error
    _settle(worker, running)
    text, done, _ = drain(submit(worker, "after", prompt="Hello", max_tokens=5))
    assert done["finish_reason"] == "length" and text
    worker.cancel("running")
    assert drain(running)[1]["finish_reason"] == "cancelled"
    assert answer.empty()


@pytest.fixture
def fake_worker(monkeypatch):
    """Run ``tests/fake_worker.py`` in place of the real worker, with the behaviour given."""

    def use(behaviour: str) -> None:
        monkeypatch.setattr(WorkerProcess, "module", "tests.fake_worker")
        monkeypatch.setenv("MLX_TEST_FAKE_WORKER", behaviour)
        monkeypatch.setenv("PYTHONPATH", str(REPO))

    return use


def test_a_worker_frame_that_is_not_a_json_object_fails_every_request_at_once_as_a_protocol_error(
    make_manager, fake_worker
):
    fake_worker("not-an-object")
    manager = make_manager(warm_spare=False)
    manager.load(TINY)
    errors: list[Exception] = []

    def ask() -> None:
        try:
            manager.generate("x", model=TINY, max_tokens=5)
        except Exception as exc:  # checked below
            errors.append(exc)

    first = threading.Thread(target=ask)
    first.start()
    assert wait_for(lambda: manager.status()[0].active_requests == 1, timeout=10)
    second = threading.Thread(target=ask)
    second.start()
    # Well within the 30 s first-token deadline: the protocol error itself ends both.
    first.join(20)
    second.join(20)
    assert len(errors) == 2, errors
    for exc in errors:
        assert isinstance(exc, WorkerCrashedError) and "protocol error" in str(exc), exc
    assert wait_for(lambda: manager.status() == [], timeout=10), "the broken worker stayed listed"


# -- processes that will not exit ----------------------------------------------------


@pytest.fixture
def immortal(fake_worker, monkeypatch):
    """A worker that ignores shutdown and that SIGKILL cannot end (as in uninterruptible sleep)."""
    fake_worker("immortal")
    monkeypatch.setattr(worker_module, "REAP_GRACE_S", 0.2)
    monkeypatch.setattr(worker_module, "KILL_WAIT_S", 1.0)
    exits: list[WorkerProcess] = []
    process = WorkerProcess("stuck", on_exit=exits.append)
    process.spawn(60)
    pid = process.pid
    monkeypatch.setattr(process.proc, "kill", lambda: None)
    yield process, exits
    os.kill(pid, signal.SIGKILL)
    process.proc.wait(10)


def test_stopping_a_worker_that_never_exits_ends_within_a_bound_and_fails_its_requests(immortal, caplog):
    process, exits = immortal
    frames = process.open("r1")
    stopper = threading.Thread(target=process.stop, kwargs={"timeout": 0.5})
    with caplog.at_level(logging.WARNING, logger="mlx_jupyter.engine.worker"):
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "stop() did not return"
        assert frames.get(timeout=30)["type"] == p.T_ERROR
        assert wait_for(lambda: exits == [process], timeout=30), "on_exit did not run"
    assert any(str(process.pid) in r.getMessage() and "SIGKILL" in r.getMessage() for r in caplog.records)


def test_a_worker_that_closes_its_pipe_but_never_exits_is_given_up_within_a_bound(immortal, caplog):
    process, exits = immortal
    with caplog.at_level(logging.WARNING, logger="mlx_jupyter.engine.worker"):
        frames = submit(process, "r1", prompt="x", max_tokens=5)
        _next(frames, p.T_STARTED)
        assert frames.get(timeout=30)["type"] == p.T_ERROR
        assert wait_for(lambda: exits == [process], timeout=30), "on_exit did not run"
    assert any(str(process.pid) in r.getMessage() and "SIGKILL" in r.getMessage() for r in caplog.records)


# -- cancels ---------------------------------------------------------------------------


class _Collect:
    """Stands in for the worker's outbox: keeps what the worker sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def test_cancels_for_requests_the_worker_does_not_have_are_not_kept():
    commands = Commands(-1, _Collect())  # the reader's side only: no pipe, no model
    for i in range(10_000):
        commands.command({"op": p.OP_CANCEL, "request_id": f"gone-{i}"})
    assert len(commands.cancelled) == 0
    commands.command({"op": p.OP_GENERATE, "request_id": "queued", "prompt": "x", "max_tokens": 5})
    commands.command({"op": p.OP_CANCEL, "request_id": "queued"})
    assert commands.cancelled == {"queued"}


def test_a_cancel_right_behind_its_generate_still_cancels_it(spawn_worker):
    worker = spawn_worker()
    # A seeded sampled request runs alone: the main loop reads no message until it ends.
    solo = submit(worker, "solo", prompt="x", max_tokens=LONG, temperature=0.9, seed=1)
    _next(solo, p.T_STARTED)
    _next(solo, p.T_TOKEN)
    late = submit(worker, "late", prompt="y", max_tokens=LONG)
    worker.cancel("late")
    for i in range(1000):
        worker.cancel(f"unknown-{i}")
    assert worker.ping(30) is not None  # every cancel is recorded while "late" waits in the inbox
    worker.cancel("solo")
    assert drain(solo)[1]["finish_reason"] == "cancelled"
    assert _next(late, p.T_ERROR)["code"] == "cancelled"
    assert drain(submit(worker, "after", prompt="Hello", max_tokens=5))[1]["finish_reason"] == "length"


# -- the worker's environment and memory ---------------------------------------------


def test_a_worker_does_not_inherit_the_servers_tokens(monkeypatch):
    for name in SECRETS:
        monkeypatch.setenv(name, f"secret-{name}")
    process = WorkerProcess(TINY)
    process.spawn(60)
    try:
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
    finally:
        process.stop()
    names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0")}
    assert "HF_HUB_OFFLINE" in names
    assert not names & set(SECRETS)


def test_a_model_whose_config_needs_unbounded_memory_fails_clearly_under_memory_limit(tmp_path):
    shutil.copytree(builtin_model_path("tiny"), tmp_path / "huge")
    config = json.loads((tmp_path / "huge" / "config.json").read_text())
    (tmp_path / "huge" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1_000_000}))
    code = f"""
        import resource
        # If the bound under test fails, the worker (which inherits this) stops at 3 GiB, not at the machine's memory.
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from mlx_jupyter.engine import WorkerManager

        manager = WorkerManager(
            model_dirs=[{str(tmp_path)!r}], memory_limit=64 << 20, warm_spare=False, idle_timeout=0,
            default_model="builtin:tiny",
        )
        try:
            manager.load("huge")
            print("LOADED")
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc)
        print("TINY", manager.generate("x", max_tokens=3).finish_reason)
        manager.shutdown()
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (error,) = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert error.startswith("ERROR ModelLoadError"), error
    for part in ("'huge'", "memory_limit", str(64 << 20), "config.json"):
        assert part in error, error
    assert "TINY length" in proc.stdout
