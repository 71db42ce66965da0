"""Worker process entry point: the only module that imports mlx and mlx_lm."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.load_bound import bounded_memory

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


def _warm_cxx_exceptions() -> None:
    """Throw one C++ exception on the main thread now, while memory is plentiful.

    libstdc++ allocates a thread's exception state at its first throw: were that first throw
    a bad_alloc at a load's memory bound, that allocation would fail too, and glibc would end
    the process instead of the load raising MemoryError.
    """
    import mlx.core as mx

    with contextlib.suppress(ValueError):
        mx.zeros((2,)).reshape(3)


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
            except Exception:  # e.g. MemoryError at a load's bound: this frame is lost, the thread lives on
                log.exception("could not send a %r frame", message.get("type"))


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


class _Stream:
    """One generation the worker has taken on: its text-side state and its clock."""

    def __init__(self, rid: str, tokens: list[int], max_tokens: int, stop: list[str], detokenizer: Any) -> None:
        self.rid = rid
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.stopper = StopMatcher(stop)
        self.detokenizer = detokenizer
        self.start = time.perf_counter()
        self.first_at: float | None = None
        self.generated = 0


def _batchable(msg: dict[str, Any]) -> bool:
    """Greedy or unseeded requests share the batch; a seeded sampled one runs alone.

    Sampling draws from MLX's one global random state, which every sequence in a batch
    shares, so only a request with the whole worker to itself can honour its seed.
    """
    return msg.get("seed") is None or float(msg.get("temperature", 0.0)) == 0.0


class Worker:
    """Serves one model. MLX runs on the main thread only; the reader thread only queues.

    Concurrent generations share one ``BatchGenerator`` of ``batch_size`` rows: each loop
    turn takes every queued message, admits waiting requests in arrival order while a
    row is free, then decodes one step for the whole batch, so requests join and leave
    between steps. A request beyond the batch waits queued, and is sent ``started`` only
    when it gets a row. A request that cannot share the batch (see ``_batchable``) waits
    until the batch drains and then runs alone; requests behind it wait too, so service
    stays first come, first served.

    Threads: the reader adds a generate's id to ``live`` before queuing it, and records a
    cancel only for an id in ``live``; the main thread takes an id out of ``live``, then
    out of ``cancelled``, when its request ends. So ``cancelled`` holds only requests the
    worker has, plus the few that raced their own end, which each loop turn drops.
    """

    def __init__(self, cmd_fd: int, outbox: Outbox) -> None:
        self.cmd_fd = cmd_fd
        self.out = outbox
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.live: set[str] = set()
        self.cancelled: set[str] = set()
        self.batch_size = p.BATCH_SIZE
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.batch: Any = None  # a BatchGenerator once a model that supports batching is loaded
        self.waiting: deque[dict[str, Any]] = deque()
        self.running: dict[int, _Stream] = {}  # BatchGenerator uid -> stream
        self._samplers: dict[tuple[float, float], Any] = {}

    def read_commands(self) -> None:
        """Reader thread: cancels and pings act at once, loads and generates go to the main thread.

        A frame that is no request is answered with an error when its request id can be
        found, logged, and skipped: the other requests go on.
        """
        while True:
            try:
                msg = p.read_frame(self.cmd_fd)
            except (p.ChannelClosed, OSError):
                os._exit(0)  # the command pipe doubles as the death pipe
            except p.BadFrame as exc:
                log.warning("bad frame for request %s: %s", exc.request_id, exc)
                if exc.request_id is not None:
                    self.error(exc.request_id, "invalid_request", f"the worker could not read the request: {exc}")
                continue
            try:
                self.command(msg)
            except Exception as exc:
                log.exception("message %.200r failed", msg)
                if isinstance(rid := msg.get("request_id"), str):
                    self.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def command(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("request_id")
        if op == p.OP_PING:
            self.out.send({"type": p.T_PONG, "request_id": rid if isinstance(rid, str) else "", "seq": msg.get("seq")})
        elif op == p.OP_SHUTDOWN:
            self.inbox.put(None)
        elif not isinstance(rid, str):
            log.warning("message %.200r has no request id; dropped", msg)
        elif op == p.OP_CANCEL:
            if rid in self.live:  # a finished or unknown request has nothing to cancel
                self.cancelled.add(rid)
        elif op == p.OP_GENERATE:
            self.live.add(rid)
            self.inbox.put(msg)
        elif op == p.OP_LOAD:
            self.inbox.put(msg)
        else:
            self.error(rid, "invalid_request", f"unknown operation {op!r}")

    def serve(self) -> None:
        while True:
            idle = not self.running and not self.waiting
            try:
                msg = self.inbox.get() if idle else self.inbox.get_nowait()
                while True:
                    if msg is None:
                        return
                    self.handle(msg)
                    msg = self.inbox.get_nowait()
            except queue.Empty:
                pass
            self.cancelled.intersection_update(self.live)  # cancels that raced their request's end
            self.admit()
            if self.running:
                self.step()

    def handle(self, msg: dict[str, Any]) -> None:
        rid = msg["request_id"]
        if msg["op"] == p.OP_GENERATE:
            self.waiting.append(msg)
            return
        try:
            self.load(rid, msg)
        except Exception as exc:  # one bad request must not take the worker down
            log.exception("request %s failed", rid)
            self.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def error(self, rid: str, code: str, message: str) -> None:
        self.live.discard(rid)
        self.cancelled.discard(rid)
        self.out.send({"type": p.T_ERROR, "request_id": rid, "code": code, "message": message})

    def load(self, rid: str, msg: dict[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        self.batch_size = max(1, int(msg.get("batch_size") or p.BATCH_SIZE))
        memory_limit = int(msg.get("memory_limit") or 0)
        start = time.perf_counter()
        try:
            with bounded_memory(memory_limit) as headroom:
                self.model, self.tokenizer, config = load(msg["path"], return_config=True)
        except MemoryError:
            self.error(
                rid,
                "model_load_failed",
                f"model {msg.get('model')!r} ran out of memory while loading: memory_limit is {memory_limit} "
                f"bytes, and a load may use that plus {headroom} bytes for its tokenizer and threads. Check the "
                "model's config.json (a size such as num_hidden_layers may be far too large), or raise "
                "memory_limit (0 = no limit)",
            )
            return
        except Exception as exc:
            self.error(rid, "model_load_failed", f"{type(exc).__name__}: {exc}")
            return
        self.context_length = config.get("max_position_embeddings") or None
        # Models whose caches cannot be merged (e.g. sliding windows) serve one at a time.
        if all(hasattr(c, "merge") for c in make_prompt_cache(self.model)):
            self.batch = self._new_batch()
        self.out.send(
            {
                "type": p.T_LOADED,
                "request_id": rid,
                "memory_bytes": int(mx.get_active_memory()),
                "context_length": self.context_length,
                "load_s": time.perf_counter() - start,
                "batching": self.batch is not None,
            }
        )

    def _new_batch(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(self.model, completion_batch_size=self.batch_size, prefill_batch_size=self.batch_size)

    # -- admission --------------------------------------------------------------

    def admit(self) -> None:
        """Start waiting requests in order while they get a free row (or run alone on an empty batch)."""
        if self.cancelled and self.waiting:  # a queued request whose client left ends now, rowless
            keep = deque()
            for msg in self.waiting:
                if msg["request_id"] in self.cancelled:
                    self.error(msg["request_id"], "cancelled", "the request was cancelled before it started")
                else:
                    keep.append(msg)
            self.waiting = keep
        while self.waiting:
            msg = self.waiting[0]
            rid = msg["request_id"]
            solo = self.batch is None or not _batchable(msg)
            if self.running and (solo or len(self.running) >= self.batch_size):
                return  # wait for rows to free up; later requests keep their place behind this one
            self.waiting.popleft()
            try:
                self.start(rid, msg, solo)
            except Exception as exc:
                log.exception("request %s failed", rid)
                self.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def start(self, rid: str, msg: dict[str, Any], solo: bool) -> None:
        if self.model is None:
            self.error(rid, "invalid_request", "no model is loaded in this worker")
            return
        if rid in self.cancelled:  # the client left while a request ahead of it ran alone
            self.error(rid, "cancelled", "the request was cancelled before it started")
            return
        self.out.send({"type": p.T_STARTED, "request_id": rid})
        stream = _Stream(
            rid,
            self._prompt_tokens(msg),
            int(msg["max_tokens"]),
            list(msg.get("stop") or []),
            self.tokenizer.detokenizer,
        )
        if not stream.tokens:
            self.error(rid, "invalid_request", "the prompt is empty")
            return
        if self.context_length and len(stream.tokens) > self.context_length:
            self.error(
                rid,
                "context_length_exceeded",
                f"the prompt is {len(stream.tokens)} tokens; this model's context is {self.context_length} tokens",
            )
            return
        sampler = self._sampler(float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)))
        if solo:
            self.generate_alone(stream, sampler, msg.get("seed"))
            return
        from mlx_lm.generate import make_stop_sequences

        (uid,) = self.batch.insert(
            [stream.tokens],
            max_tokens=[stream.max_tokens],
            samplers=[sampler],
            stop_sequences=[make_stop_sequences(self.tokenizer)],
        )
        self.running[uid] = stream

    def _sampler(self, temperature: float, top_p: float) -> Any:
        # Requests with equal parameters share one sampler object, which lets the batch
        # sample all of them in one call instead of row by row.
        from mlx_lm.sample_utils import make_sampler

        key = (temperature, top_p)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(temp=temperature, top_p=top_p)
        return self._samplers[key]

    def _prompt_tokens(self, msg: dict[str, Any]) -> list[int]:
        if msg.get("messages") is not None:
            return list(self.tokenizer.apply_chat_template(msg["messages"], add_generation_prompt=True))
        prompt = msg["prompt"]
        bos = self.tokenizer.bos_token
        return list(self.tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))

    # -- batched decoding -------------------------------------------------------

    def step(self) -> None:
        """Decode one step for the whole batch, then send each request its token."""
        cancelled = [uid for uid, s in self.running.items() if s.rid in self.cancelled]
        if cancelled:
            self.batch.remove(cancelled)
            for uid in cancelled:
                self.finish(self.running.pop(uid), "cancelled")
        if not self.running:
            return
        try:
            _, responses = self.batch.next()
        except Exception as exc:  # the batch's state is unknown now: fail its requests, start afresh
            log.exception("batch step failed")
            self.batch = self._new_batch()
            for stream in self.running.values():
                self.error(stream.rid, "internal_error", f"{type(exc).__name__}: {exc}")
            self.running.clear()
            return
        for r in responses:
            stream = self.running[r.uid]
            stream.generated += 1
            if stream.first_at is None:
                stream.first_at = time.perf_counter()
            if r.finish_reason != "stop":  # an end-of-sequence token adds no text
                stream.detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                stream.detokenizer.finalize()
            text, stopped = stream.stopper.feed(stream.detokenizer.last_segment)
            # One frame per token even when its text is held back (a partial UTF-8
            # character, a possible stop string): the parent's deadlines count tokens.
            self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": text})
            if stopped:
                self.batch.remove([r.uid])
                self.finish(self.running.pop(r.uid), "stop")
            elif r.finish_reason is not None:
                if tail := stream.stopper.flush():
                    self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": tail})
                self.finish(self.running.pop(r.uid), r.finish_reason)

    def finish(self, stream: _Stream, reason: str) -> None:
        import mlx.core as mx

        now = time.perf_counter()
        ttft = None if stream.first_at is None else stream.first_at - stream.start
        decode_s = None if stream.first_at is None else now - stream.first_at
        self.live.discard(stream.rid)
        self.cancelled.discard(stream.rid)
        self.out.send(
            {
                "type": p.T_DONE,
                "request_id": stream.rid,
                "finish_reason": reason,
                "usage": {
                    "prompt_tokens": len(stream.tokens),
                    "completion_tokens": stream.generated,
                    "total_tokens": len(stream.tokens) + stream.generated,
                },
                "timings": {
                    "ttft_s": ttft,
                    "prompt_tps": len(stream.tokens) / ttft if ttft else None,
                    "generation_tps": (stream.generated - 1) / decode_s if decode_s and stream.generated > 1 else None,
                    "peak_memory_bytes": int(mx.get_peak_memory()),
                },
            }
        )

    # -- one at a time ----------------------------------------------------------

    def generate_alone(self, stream: _Stream, sampler: Any, seed: Any) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate

        if seed is not None:
            mx.random.seed(int(seed))
        finish, last = "length", None
        for last in stream_generate(
            self.model, self.tokenizer, stream.tokens, max_tokens=stream.max_tokens, sampler=sampler
        ):
            if stream.rid in self.cancelled:
                finish = "cancelled"
                break
            stream.generated = last.generation_tokens
            if stream.first_at is None:
                stream.first_at = time.perf_counter()
            text, stopped = stream.stopper.feed(last.text)
            self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": text})
            if stopped:
                finish = "stop"
                break
            finish = last.finish_reason or finish
        else:
            if tail := stream.stopper.flush():
                self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": tail})
        self.finish(stream, finish)


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

    _warm_cxx_exceptions()

    threading.Thread(target=worker.read_commands, name="commands", daemon=True).start()
    outbox.send({"type": p.T_HELLO, "pid": os.getpid()})
    worker.serve()
    outbox.close()
    os._exit(0)


if __name__ == "__main__":
    main()
