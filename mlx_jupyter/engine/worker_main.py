"""Worker process entry point: the only module that imports mlx and mlx_lm."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from mlx_jupyter.engine import protocol as p

log = logging.getLogger("mlx_jupyter.worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the parent dies; the command pipe's EOF covers the rest."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(0)


class Outbox:
    """Frames to the parent, written by one thread so token frames and pongs never interleave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                p.write_frame(self._fd, message)
            except OSError:
                os._exit(0)  # the parent is gone


class StopMatcher:
    """Cuts the output at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class Worker:
    """Serves one model. MLX runs on the main thread only; the reader thread only queues."""

    def __init__(self, cmd_fd: int, outbox: Outbox) -> None:
        self.cmd_fd = cmd_fd
        self.out = outbox
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.cancelled: set[str] = set()
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None

    def read_commands(self) -> None:
        """Reader thread: cancels and pings act at once, everything else goes to the main thread."""
        while True:
            try:
                msg = p.read_frame(self.cmd_fd)
            except (p.ChannelClosed, OSError):
                os._exit(0)  # the command pipe doubles as the death pipe
            op = msg.get("op")
            if op == p.OP_CANCEL:
                self.cancelled.add(msg["request_id"])
            elif op == p.OP_PING:
                self.out.send({"type": p.T_PONG, "request_id": msg.get("request_id", ""), "seq": msg.get("seq")})
            elif op == p.OP_SHUTDOWN:
                self.inbox.put(None)
            else:
                self.inbox.put(msg)

    def serve(self) -> None:
        while (msg := self.inbox.get()) is not None:
            rid = msg.get("request_id", "")
            try:
                if msg["op"] == p.OP_LOAD:
                    self.load(rid, msg["path"])
                elif msg["op"] == p.OP_GENERATE:
                    self.generate(rid, msg)
                else:
                    self.error(rid, "invalid_request", f"unknown operation {msg['op']!r}")
            except Exception as exc:  # one bad request must not take the worker down
                log.exception("request %s failed", rid)
                self.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")
            finally:
                self.cancelled.discard(rid)

    def error(self, rid: str, code: str, message: str) -> None:
        self.out.send({"type": p.T_ERROR, "request_id": rid, "code": code, "message": message})

    def load(self, rid: str, path: str) -> None:
        import mlx.core as mx
        from mlx_lm import load

        start = time.perf_counter()
        try:
            self.model, self.tokenizer, config = load(path, return_config=True)
        except Exception as exc:
            self.error(rid, "model_load_failed", f"{type(exc).__name__}: {exc}")
            return
        self.context_length = config.get("max_position_embeddings") or None
        self.out.send(
            {
                "type": p.T_LOADED,
                "request_id": rid,
                "memory_bytes": int(mx.get_active_memory()),
                "context_length": self.context_length,
                "load_s": time.perf_counter() - start,
            }
        )

    def _prompt_tokens(self, msg: dict[str, Any]) -> list[int]:
        if msg.get("messages") is not None:
            return list(self.tokenizer.apply_chat_template(msg["messages"], add_generation_prompt=True))
        prompt = msg["prompt"]
        bos = self.tokenizer.bos_token
        return list(self.tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))

    def generate(self, rid: str, msg: dict[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        if self.model is None:
            self.error(rid, "invalid_request", "no model is loaded in this worker")
            return
        if rid in self.cancelled:  # the client left while the request was queued
            self.error(rid, "cancelled", "the request was cancelled before it started")
            return
        self.out.send({"type": p.T_STARTED, "request_id": rid})
        start = time.perf_counter()
        tokens = self._prompt_tokens(msg)
        if not tokens:
            self.error(rid, "invalid_request", "the prompt is empty")
            return
        if self.context_length and len(tokens) > self.context_length:
            self.error(
                rid,
                "context_length_exceeded",
                f"the prompt is {len(tokens)} tokens; this model's context is {self.context_length} tokens",
            )
            return
        if msg.get("seed") is not None:
            mx.random.seed(int(msg["seed"]))
        sampler = make_sampler(temp=float(msg.get("temperature", 0.0)), top_p=float(msg.get("top_p", 1.0)))
        stopper = StopMatcher(list(msg.get("stop") or []))
        finish, last, ttft = "length", None, None
        for last in stream_generate(
            self.model, self.tokenizer, tokens, max_tokens=int(msg["max_tokens"]), sampler=sampler
        ):
            if rid in self.cancelled:
                finish = "cancelled"
                break
            if ttft is None:
                ttft = time.perf_counter() - start
            text, stopped = stopper.feed(last.text)
            # One frame per token even when its text is held back (a partial UTF-8
            # character, a possible stop string): the parent's deadlines count tokens.
            self.out.send({"type": p.T_TOKEN, "request_id": rid, "text": text})
            if stopped:
                finish = "stop"
                break
            finish = last.finish_reason or finish
        else:
            if tail := stopper.flush():
                self.out.send({"type": p.T_TOKEN, "request_id": rid, "text": tail})
        completion = last.generation_tokens if last is not None else 0
        self.out.send(
            {
                "type": p.T_DONE,
                "request_id": rid,
                "finish_reason": finish,
                "usage": {
                    "prompt_tokens": len(tokens),
                    "completion_tokens": completion,
                    "total_tokens": len(tokens) + completion,
                },
                "timings": {
                    "ttft_s": ttft,
                    "prompt_tps": last.prompt_tps if last is not None else None,
                    "generation_tps": last.generation_tps if last is not None else None,
                    "peak_memory_bytes": int(mx.get_peak_memory()),
                },
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mlx-jupyter model worker (started by the manager)")
    parser.add_argument("--cmd-fd", type=int, required=True)
    parser.add_argument("--evt-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    os.dup2(2, 1)  # library prints join stderr, which the parent drains into its log
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle

    outbox = Outbox(args.evt_fd)
    worker = Worker(args.cmd_fd, outbox)
    import mlx.core  # noqa: F401  (imported before "hello" so a load skips it)
    import mlx_lm  # noqa: F401

    threading.Thread(target=worker.read_commands, name="commands", daemon=True).start()
    outbox.send({"type": p.T_HELLO, "pid": os.getpid()})
    worker.serve()
    outbox.close()
    os._exit(0)


if __name__ == "__main__":
    main()
