"""Parent-side handle of one worker process: spawn, frame demultiplexing, stop and kill."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
    WorkerCrashedError,
    WorkerTimeoutError,
    error_from_frame,
)
from mlx_jupyter.engine.locks import RankedLock, assert_no_locks_held

log = logging.getLogger(__name__)

Frame = dict[str, Any]

# Seconds a worker whose event pipe closed may take to exit before it is killed.
REAP_GRACE_S = 5.0
# Seconds a process may take to go after SIGKILL (freeing a large model takes a while); one
# still there then (stuck in the kernel) is given up.
KILL_WAIT_S = 10.0
# The server's credentials: a worker runs model code and needs none of them.
SECRET_ENV = ("MLX_JUPYTER_TOKEN", "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")
# How a worker's last words say it ran out of memory (C++, Python, glibc).
_OUT_OF_MEMORY = re.compile(r"bad_alloc|MemoryError|[Cc]annot allocate memory")


class WorkerProcess:
    """One worker process and the threads that talk to it.

    Thread-safety: ``_routes`` (request id -> frame queue) and ``_dead`` are guarded
    by ``routes_lock``, held only for dictionary operations. Only the writer thread
    writes the command pipe (callers encode their message, so one over the frame limit
    fails in the caller, and hand the bytes over through a SimpleQueue), and only the
    reader thread reads the event pipe, so no lock is ever held across IPC. When the
    process exits, or breaks the protocol and is killed, every open route fails at once
    and ``on_exit`` runs, once. Every wait for the process is bounded: one that SIGKILL
    cannot end within ``KILL_WAIT_S`` is given up (logged with its pid) as if it had exited.
    """

    _seq = itertools.count(1)
    # The module a worker process runs; tests name a stand-in that misbehaves on purpose.
    module = "mlx_jupyter.engine.worker_main"

    def __init__(self, model_id: str, on_exit: Callable[[WorkerProcess], None] | None = None) -> None:
        self.model_id = model_id
        self.proc: subprocess.Popen[bytes] | None = None
        self._on_exit = on_exit
        self._routes_lock = RankedLock("routes_lock")
        self._routes: dict[str, queue.SimpleQueue[Frame]] = {}
        self._dead: Frame | None = None
        self._exit_frame: Frame | None = None
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.exited = threading.Event()
        self.last_frame_at = time.monotonic()  # any frame proves the worker is making progress

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.model_id} pid={self.pid}>"

    # -- life cycle -------------------------------------------------------------

    def spawn(self, timeout: float) -> None:
        """Start the process and wait for its hello (mlx imported).

        The manager calls this on its one long-lived spawner thread: Linux's
        PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
        """
        assert_no_locks_held("worker spawn")
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    self.module,
                    f"--cmd-fd={cmd_r}",
                    f"--evt-fd={evt_w}",
                    f"--parent-pid={os.getpid()}",
                ],
                pass_fds=(cmd_r, evt_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C is for the server, not its workers
                env=env,
            )
        except BaseException:
            for fd in (cmd_r, cmd_w, evt_r, evt_w):
                os.close(fd)
            raise
        finally:
            if self.proc is not None:
                os.close(cmd_r)
                os.close(evt_w)
        hello = self.open("")
        for target, name, args in (
            (self._read_events, "reader", (evt_r,)),
            (self._write_commands, "writer", (cmd_w,)),
            (self._drain_stderr, "stderr", ()),
        ):
            thread = threading.Thread(target=target, args=args, name=f"mlx-{name}-{self.proc.pid}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self.expect(hello, timeout, "start")
        finally:
            self.close("")

    def adopt(self, model_id: str, on_exit: Callable[[WorkerProcess], None]) -> None:
        """Give a warm spare (spawned under a placeholder name) the model it is about to load."""
        self.model_id = model_id
        self._on_exit = on_exit

    def load(self, path: str, timeout: float, *, batch_size: int = p.BATCH_SIZE, memory_limit: int = 0) -> Frame:
        """Load the model; returns the ``loaded`` frame or raises with the loader's reason.

        ``batch_size`` rows decode together (more requests wait queued); a ``memory_limit``
        (bytes, 0 = none) bounds what the load may allocate.
        """
        rid = f"load-{next(self._seq)}"
        frames = self.open(rid)
        try:
            self.send(
                {
                    "op": p.OP_LOAD,
                    "request_id": rid,
                    "path": path,
                    "model": self.model_id,
                    "batch_size": batch_size,
                    "memory_limit": memory_limit,
                }
            )
            return self.expect(frames, timeout, "load")
        except WorkerCrashedError:
            # mlx may abort on an allocation that fails at the bound instead of raising MemoryError.
            if memory_limit and _OUT_OF_MEMORY.search(tail := self._last_words()):
                raise ModelLoadError(
                    f"model {self.model_id!r} ran out of memory while loading: memory_limit is {memory_limit} bytes, "
                    f"and its worker died at the bound that sets (last output: {tail}). Check the model's "
                    "config.json (a size such as num_hidden_layers may be far too large), or raise memory_limit "
                    "(0 = no limit)"
                ) from None
            raise
        finally:
            self.close(rid)

    def ping(self, timeout: float) -> float | None:
        """Round-trip seconds of a ping, or None without an answer in ``timeout``.

        The worker's reader thread answers, so a ping works while a stream runs, and
        the pong is routed by its own request id: it can never take a stream's frames.
        """
        rid, seq = f"ping-{next(self._seq)}", next(self._seq)
        frames = self.open(rid)
        start = time.monotonic()
        try:
            self.send({"op": p.OP_PING, "request_id": rid, "seq": seq})
            try:
                frame = frames.get(timeout=timeout)
            except queue.Empty:
                return None
            return time.monotonic() - start if frame["type"] == p.T_PONG and frame["seq"] == seq else None
        finally:
            self.close(rid)

    def expect(self, frames: queue.SimpleQueue[Frame], timeout: float, what: str) -> Frame:
        assert_no_locks_held(f"waiting for {what}")
        try:
            frame = frames.get(timeout=timeout)
        except queue.Empty:
            self.kill(
                f"worker for model {self.model_id!r} did not finish {what} within {timeout:g}s", WorkerTimeoutError.code
            )
            raise WorkerTimeoutError(
                f"worker for model {self.model_id!r} did not finish {what} within {timeout:g}s"
            ) from None
        if frame["type"] == p.T_ERROR:
            raise error_from_frame(frame)
        return frame

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, kill it if it does not, and wait for the reader to finish.

        Returns within about ``2 * timeout + KILL_WAIT_S``, whatever the process does.
        """
        assert_no_locks_held("worker stop")
        if self.proc is None:
            return
        self._exit_frame = self._exit_frame or {
            "code": ModelUnloadedError.code,
            "message": f"model {self.model_id!r} was unloaded while the request was running",
        }
        self._outbox.put(p.encode({"op": p.OP_SHUTDOWN}))
        self._outbox.put(None)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker for %s (pid %s) ignored shutdown for %gs; killing it", self.model_id, self.pid, timeout)
            self._sigkill()
            self._await_exit()
        self.join(timeout)

    def kill(self, message: str, code: str = WorkerCrashedError.code) -> None:
        """Kill the process; every open request fails with ``message``. Returns within ``KILL_WAIT_S``."""
        assert_no_locks_held("worker kill")
        if self.proc is None:
            return
        self._exit_frame = self._exit_frame or {"code": code, "message": message}
        self._outbox.put(None)
        if self.proc.poll() is None:
            self._sigkill()
            self._await_exit()

    def join(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` in all for the threads (the reader reports the exit)."""
        assert_no_locks_held("worker join")
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- requests ---------------------------------------------------------------

    def open(self, rid: str) -> queue.SimpleQueue[Frame]:
        """Register a route for ``rid``; a dead worker's route holds its exit error at once."""
        frames: queue.SimpleQueue[Frame] = queue.SimpleQueue()
        with self._routes_lock:
            if self._dead is not None:
                frames.put(self._dead)
            else:
                self._routes[rid] = frames
        return frames

    def close(self, rid: str) -> None:
        with self._routes_lock:
            self._routes.pop(rid, None)

    def send(self, message: Frame) -> None:
        """Hand ``message`` to the writer thread; one over the frame limit is refused here, unsent."""
        assert_no_locks_held("worker send")
        try:
            data = p.encode(message)
        except p.FrameTooLarge as exc:
            raise InvalidRequestError(
                f"the request is {exc.size} bytes once encoded, over the {p.MAX_FRAME} byte limit of a "
                "message to a worker; send a shorter prompt or fewer messages"
            ) from None
        self._outbox.put(data)

    def cancel(self, rid: str) -> None:
        self.send({"op": p.OP_CANCEL, "request_id": rid})

    # -- threads ----------------------------------------------------------------

    def _write_commands(self, fd: int) -> None:
        try:
            while (data := self._outbox.get()) is not None:
                p.write_all(fd, data)
        except OSError:
            pass  # the worker is gone; the reader reports it
        finally:
            os.close(fd)  # EOF on the command pipe makes the worker exit

    def _read_events(self, fd: int) -> None:
        try:
            while True:
                frame = p.read_frame(fd)
                self.last_frame_at = time.monotonic()
                rid = frame.get("request_id", "")
                if not isinstance(frame.get("type"), str) or not isinstance(rid, str):
                    raise p.BadFrame(f"the frame's type or request_id is not a string: {frame!r:.200}", b"")
                with self._routes_lock:
                    frames = self._routes.get(rid)
                if frames is not None:
                    frames.put(frame)
        except (p.ChannelClosed, OSError):
            pass
        except Exception as exc:  # a worker that breaks the protocol can be trusted with no request
            self._protocol_error(exc)
        finally:
            os.close(fd)
        self._reap()

    def _protocol_error(self, exc: Exception) -> None:
        message = (
            f"protocol error from the worker for model {self.model_id!r} (pid {self.pid}): {exc}; "
            "it was killed and the next request starts a fresh worker"
        )
        log.error("%s", message)
        self._exit_frame = self._exit_frame or {"code": WorkerCrashedError.code, "message": message}
        self._sigkill()

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(REAP_GRACE_S)
        except subprocess.TimeoutExpired:  # closed its pipe but lives on: make sure it dies
            self._sigkill()
            if not self._await_exit():
                return
            rc = self.proc.returncode
        self._finish({"type": p.T_ERROR, **(self._exit_frame or self._crash_report(rc))})

    def _sigkill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def _await_exit(self) -> bool:
        """Wait ``KILL_WAIT_S`` for the process after SIGKILL; if it is still there, give it up."""
        assert self.proc is not None
        try:
            self.proc.wait(KILL_WAIT_S)
            return True
        except subprocess.TimeoutExpired:
            pass
        log.error(
            "worker for model %s (pid %s) is still there %gs after SIGKILL (stuck in the kernel?); giving it up",
            self.model_id,
            self.pid,
            KILL_WAIT_S,
        )
        gone = {
            "code": WorkerCrashedError.code,
            "message": f"the worker for model {self.model_id!r} (pid {self.pid}) could not be stopped; "
            "the next request starts a fresh worker",
        }
        self._finish({"type": p.T_ERROR, **(self._exit_frame or gone)})
        return False

    def _finish(self, frame: Frame) -> None:
        """Fail every open route with ``frame``, then run ``on_exit``; only the first call acts."""
        with self._routes_lock:
            if self._dead is not None:
                return
            self._dead = frame
            routes, self._routes = list(self._routes.values()), {}
        for frames in routes:
            frames.put(frame)
        self._outbox.put(None)
        self.exited.set()
        if self._on_exit is not None:
            try:
                self._on_exit(self)
            except Exception:
                log.exception("handling the exit of the worker for %s (pid %s) failed", self.model_id, self.pid)

    def _last_words(self) -> str:
        """The worker's last lines on stderr, once it closed it (or a second passed)."""
        self._stderr_closed.wait(1.0)
        return " | ".join("".join(self._stderr_tail).strip().splitlines()[-3:])

    def _crash_report(self, rc: int) -> Frame:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        detail = f" (last output: {tail})" if (tail := self._last_words()) else ""
        message = (
            f"worker for model {self.model_id!r} (pid {self.pid}) died with {how}{detail}; "
            "the next request starts a fresh worker"
        )
        log.error("%s", message)
        return {"code": WorkerCrashedError.code, "message": message}

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self._stderr_tail.append(line)
                log.info("[worker %s pid %s] %s", self.model_id, self.pid, line.rstrip())
            self.proc.stderr.close()
        finally:
            self._stderr_closed.set()
