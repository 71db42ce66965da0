"""Bad input and faults: each gets a precise error and the manager keeps serving."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mlx_jupyter.engine.errors import (
    InvalidModelError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from mlx_jupyter.engine.models import builtin_model_path
from tests.helpers import SpawnSpy, child_pids, pid_alive, wait_for
from tests.models import LONG, TINY, TINY_A, TINY_B


@pytest.fixture
def broken_models(tmp_path):
    """model_dirs with a folder lacking config.json and a model whose weights are garbage."""
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "model.safetensors").write_bytes(b"\0" * 16)
    shutil.copytree(builtin_model_path("tiny"), tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return tmp_path


def test_unknown_model_is_a_clear_error_that_names_the_model_for_the_front_ends_hints(make_manager):
    manager = make_manager()
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope': .*model_dirs") as info:
        manager.generate("x", model="nope")
    # How to list the models is each front end's to say (tests/test_errors.py): the REST API
    # names its route, the magics the ids.
    assert info.value.model == "nope" and info.value.loaded is None
    assert manager.status() == []


@pytest.mark.parametrize("ref", ["../etc", "/etc/passwd", "a/../../b"])
def test_path_like_model_ids_are_refused_before_touching_the_filesystem(make_manager, ref):
    manager = make_manager()
    with pytest.raises(InvalidModelError):
        manager.load(ref)


def test_folder_without_config_json_names_the_model_and_the_problem(make_manager, broken_models):
    manager = make_manager(model_dirs=[str(broken_models)])
    with pytest.raises(ModelLoadError, match=r"no-config.*config\.json"):
        manager.load("no-config")
    assert manager.status() == []


def test_corrupt_weights_fail_the_load_with_the_loaders_reason_and_leave_no_starting_state(make_manager, broken_models):
    # No warm spare, so that any child process left is the failed worker.
    manager = make_manager(model_dirs=[str(broken_models)], warm_spare=False)
    with pytest.raises(ModelLoadError) as info:
        manager.load("corrupt")
    assert "corrupt" in str(info.value) or "safetensors" in str(info.value).lower()
    assert manager.status() == []
    assert wait_for(lambda: not child_pids(), timeout=5), "the failed worker was left running"
    assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"
    assert manager.health()["status"] == "ok"


def test_waiters_on_a_failing_load_share_its_error_instead_of_loading_again(make_manager, broken_models):
    spawn, errors = SpawnSpy(), []
    manager = make_manager(model_dirs=[str(broken_models)], warm_spare=False, spawn=spawn)

    def load():
        try:
            manager.load("corrupt")
        except ModelLoadError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 3
    assert spawn.models == ["corrupt"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one of prompt or messages"),
    ],
)
def test_absurd_parameters_are_refused_before_any_work_starts(make_manager, kwargs, match):
    spawn = SpawnSpy()
    manager = make_manager(warm_spare=False, spawn=spawn)
    with pytest.raises(InvalidRequestError, match=match) as info:
        manager.stream_generate("a prompt", model=TINY, **kwargs)
    assert isinstance(info.value, ValueError)
    assert spawn.started == [] and manager.status() == []


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}], "hello"],
)
def test_bad_messages_are_refused(make_manager, messages):
    with pytest.raises(InvalidRequestError, match="messages"):
        make_manager().stream_generate(messages=messages, model=TINY)


def test_a_prompt_longer_than_the_context_is_a_value_error_and_the_worker_stays(make_manager):
    manager = make_manager()
    pid = manager.load(TINY).pid
    with pytest.raises(PromptTooLongError, match=r"context is 32768 tokens") as info:
        manager.generate("word " * 40_000, model=TINY, max_tokens=4)
    assert isinstance(info.value, ValueError)
    assert manager.generate("ok", model=TINY, max_tokens=2).finish_reason == "length"
    assert manager.status()[0].pid == pid


def test_sigkill_mid_stream_fails_every_in_flight_request_at_once(make_manager):
    manager = make_manager(idle_timeout=0)
    failures: list[tuple[Exception, float]] = []

    def drain():
        try:
            for _ in manager.stream_generate("x", model=TINY, max_tokens=LONG):
                pass
        except WorkerCrashedError as exc:
            failures.append((exc, time.monotonic()))

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for t in threads:
        t.start()
    # one request streams, the other is queued in the same worker behind it
    assert wait_for(lambda: manager.status() and manager.status()[0].active_requests == 2, timeout=30)
    pid = manager.status()[0].pid
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(10)
    assert len(failures) == 2
    assert all("SIGKILL" in str(exc) and "fresh worker" in str(exc) for exc, _ in failures)
    assert max(at for _, at in failures) - killed_at < 1.0
    assert wait_for(lambda: manager.status() == [], timeout=5)
    fresh = manager.load(TINY).pid
    assert fresh != pid
    assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"


def test_a_hung_worker_is_killed_by_the_token_deadline_and_other_models_keep_serving(make_manager, model_dir):
    manager = make_manager(model_dirs=[str(model_dir)], max_loaded_models=2, token_timeout=1.0)
    manager.load(TINY_B)
    stream = manager.stream_generate("x", model=TINY_A, max_tokens=LONG)
    next(stream)
    hung = next(s.pid for s in manager.status() if s.id == TINY_A)
    os.kill(hung, signal.SIGSTOP)
    with pytest.raises(WorkerTimeoutError, match=r"no next token within 1s and was killed"):
        for _ in stream:
            pass
    assert wait_for(lambda: not pid_alive(hung), timeout=5)
    assert wait_for(lambda: [s.id for s in manager.status()] == [TINY_B], timeout=5)
    assert manager.generate("x", model=TINY_B, max_tokens=2).finish_reason == "length"


def test_a_worker_hung_before_its_first_token_hits_the_first_token_deadline(make_manager):
    manager = make_manager(first_token_timeout=1.0)
    pid = manager.load(TINY).pid
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(WorkerTimeoutError, match="no first token"):
        manager.generate("x", model=TINY, max_tokens=4)
    assert wait_for(lambda: not pid_alive(pid), timeout=5)
    assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"


def test_closing_the_stream_early_cancels_the_generation_in_the_worker(make_manager):
    # If the cancel did not reach the worker it would go on for 100k tokens and the
    # next request on the same worker would miss its first-token deadline.
    manager = make_manager(first_token_timeout=5.0, idle_timeout=0)
    stream = manager.stream_generate("x", model=TINY, max_tokens=LONG)
    next(stream)
    stream.close()
    (status,) = manager.status()
    assert status.active_requests == 0
    result = manager.generate("x", model=TINY, max_tokens=2, keep_alive=0.5)
    assert result.finish_reason == "length" and manager.status()[0].pid == status.pid
    assert wait_for(lambda: manager.status() == [], timeout=5), "the reaper could not unload after the cancel"


@pytest.fixture
def run_script():
    """Start Python code in a child process; any child still running at teardown is killed."""
    started: list[subprocess.Popen] = []

    def run(code: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_shutdown_with_requests_in_flight_fails_them_clearly_and_leaves_no_process(run_script):
    proc = run_script(
        """
        import threading, time, warnings
        from mlx_jupyter.engine import WorkerManager
        from mlx_jupyter.engine.errors import ManagerClosedError
        from tests.helpers import child_pids

        warnings.simplefilter("always")
        manager = WorkerManager(idle_timeout=0, default_model="builtin:tiny", max_tokens_limit=30_000)
        outcome = []

        def ask():
            try:
                for _ in manager.stream_generate("x", max_tokens=30_000):
                    pass
                outcome.append("finished")
            except ManagerClosedError as exc:
                outcome.append(str(exc))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        while not manager.status() or manager.status()[0].active_requests < 2:
            time.sleep(0.05)
        manager.shutdown()
        for t in threads:
            t.join(10)
        print("OUTCOME", outcome)
        print("CHILDREN", child_pids())
        """
    )
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "OUTCOME ['the model server is shutting down', 'the model server is shutting down']" in out
    assert "CHILDREN []" in out
    assert "resource_tracker" not in err and "leaked" not in err


def test_workers_exit_within_two_seconds_when_the_parent_is_sigkilled(run_script):
    proc = run_script(
        """
        import sys, time
        from mlx_jupyter.engine import WorkerManager

        manager = WorkerManager(idle_timeout=0)
        print(manager.load("builtin:tiny").pid, flush=True)
        time.sleep(120)
        """
    )
    worker_pid = int(proc.stdout.readline())
    assert pid_alive(worker_pid)
    proc.kill()
    proc.wait(10)
    killed_at = time.monotonic()
    assert wait_for(lambda: not pid_alive(worker_pid), timeout=5)
    assert time.monotonic() - killed_at < 2.0


def test_a_worker_that_dies_right_after_loading_does_not_leave_a_broken_ready_model(make_manager, monkeypatch):
    from mlx_jupyter.engine.worker import WorkerProcess

    real_load = WorkerProcess.load

    def load_then_die(self, path, timeout, **options):
        frame = real_load(self, path, timeout, **options)
        self.proc.kill()  # e.g. the OOM killer, before the manager publishes the model
        assert self.exited.wait(10)
        monkeypatch.setattr(WorkerProcess, "load", real_load)  # only the first worker dies
        return frame

    manager = make_manager(max_loaded_models=1, queue_timeout=5)
    monkeypatch.setattr(WorkerProcess, "load", load_then_die)
    with pytest.raises(WorkerCrashedError, match="died right after loading"):
        manager.load(TINY)
    assert manager.status() == [], "a dead worker stayed listed, holding the only slot"
    assert manager.generate("x", model=TINY, max_tokens=2).finish_reason == "length"
    manager.unload(TINY, timeout=10)
