"""Parent-side handle of one worker process: spawn, frame demultiplexing, stop and kill."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.errors import ModelUnloadedError, WorkerCrashedError, WorkerTimeoutError, error_from_frame
from mlx_jupyter.engine.locks import RankedLock, assert_no_locks_held

log = logging.getLogger(__name__)

Frame = dict[str, Any]

# Seconds a worker whose event pipe closed may take to exit before it is killed.
REAP_GRACE_S = 5.0


class WorkerProcess:
    """One worker process and the threads that talk to it.

    Thread-safety: ``_routes`` (request id -> frame queue) and ``_dead`` are guarded
    by ``routes_lock``, held only for dictionary operations. Only the writer thread
    writes the command pipe (callers hand it messages through a SimpleQueue), and only
    the reader thread reads the event pipe, so no lock is ever held across IPC. When the
    process exits, the reader fails every open route at once and calls ``on_exit``.
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
        self._outbox: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()
        self._stderr_tail: deque[str] = deque(maxlen=20)
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
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
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

    def load(self, path: str, timeout: float) -> Frame:
        """Load the model; returns the ``loaded`` frame or raises with the loader's reason."""
        rid = f"load-{next(self._seq)}"
        frames = self.open(rid)
        try:
            self.send({"op": p.OP_LOAD, "request_id": rid, "path": path})
            return self.expect(frames, timeout, "load")
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
        """Ask the worker to exit, kill it if it does not, and wait for the reader to finish."""
        assert_no_locks_held("worker stop")
        if self.proc is None:
            return
        self._exit_frame = self._exit_frame or {
            "code": ModelUnloadedError.code,
            "message": f"model {self.model_id!r} was unloaded while the request was running",
        }
        self._outbox.put({"op": p.OP_SHUTDOWN})
        self._outbox.put(None)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker for %s (pid %s) ignored shutdown for %gs; killing it", self.model_id, self.pid, timeout)
            self.proc.kill()
        self.join(timeout)

    def kill(self, message: str, code: str = WorkerCrashedError.code) -> None:
        """Kill the process at once; every open request fails with ``message``."""
        assert_no_locks_held("worker kill")
        if self.proc is None:
            return
        self._exit_frame = self._exit_frame or {"code": code, "message": message}
        self._outbox.put(None)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def join(self, timeout: float = 5.0) -> None:
        assert_no_locks_held("worker join")
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

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
        assert_no_locks_held("worker send")
        self._outbox.put(message)

    def cancel(self, rid: str) -> None:
        self.send({"op": p.OP_CANCEL, "request_id": rid})

    # -- threads ----------------------------------------------------------------

    def _write_commands(self, fd: int) -> None:
        try:
            while (message := self._outbox.get()) is not None:
                p.write_frame(fd, message)
        except OSError:
            pass  # the worker is gone; the reader reports it
        finally:
            os.close(fd)  # EOF on the command pipe makes the worker exit

    def _read_events(self, fd: int) -> None:
        try:
            while True:
                frame = p.read_frame(fd)
                self.last_frame_at = time.monotonic()
                with self._routes_lock:
                    frames = self._routes.get(frame.get("request_id", ""))
                if frames is not None:
                    frames.put(frame)
        except (p.ChannelClosed, OSError, ValueError):
            pass
        finally:
            os.close(fd)
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(REAP_GRACE_S)
        except subprocess.TimeoutExpired:  # closed its pipe but lives on: make sure it dies
            self.proc.kill()
            rc = self.proc.wait()
        frame = {"type": p.T_ERROR, **(self._exit_frame or self._crash_report(rc))}
        with self._routes_lock:
            self._dead = frame
            routes, self._routes = list(self._routes.values()), {}
        for frames in routes:
            frames.put(frame)
        self._outbox.put(None)
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit(self)

    def _crash_report(self, rc: int) -> Frame:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        tail = "".join(self._stderr_tail).strip().splitlines()[-3:]
        detail = f" (last output: {' | '.join(tail)})" if tail else ""
        message = (
            f"worker for model {self.model_id!r} (pid {self.pid}) died with {how}{detail}; "
            "the next request starts a fresh worker"
        )
        log.error("%s", message)
        return {"code": WorkerCrashedError.code, "message": message}

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self._stderr_tail.append(line)
            log.info("[worker %s pid %s] %s", self.model_id, self.pid, line.rstrip())
        self.proc.stderr.close()
