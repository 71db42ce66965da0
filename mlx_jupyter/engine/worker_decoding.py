"""The worker's main thread: loads its model and decodes requests, batched or alone."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from typing import Any

from mlx_jupyter.engine import mlx_lm_adapter as lm
from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.load_bound import bounded_memory
from mlx_jupyter.engine.stop_strings import StopMatcher
from mlx_jupyter.engine.token_logprobs import entry
from mlx_jupyter.engine.token_text import TextStream, TokenBytes
from mlx_jupyter.engine.worker_channel import Commands

log = logging.getLogger("mlx_jupyter.worker")
# Shared samplers kept, one per distinct (temperature, top_p, top_k, min_p); rows holding one keep it.
MAX_SAMPLERS = 64


class _Stream:
    """One generation the worker has taken on: its text-side state and its clock."""

    def __init__(
        self, rid: str, tokens: list[int], max_tokens: int, stop: list[str], detokenizer: Any, top_logprobs: int | None
    ) -> None:
        self.rid = rid
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.stopper = StopMatcher(stop)
        self.detokenizer = detokenizer
        self.top_logprobs = top_logprobs  # None: the request wants no log probabilities
        self.start = time.perf_counter()
        self.first_at: float | None = None
        self.generated = 0


def _batchable(msg: dict[str, Any]) -> bool:
    """Greedy or unseeded requests share the batch; a seeded sampled one runs alone.

    Sampling draws from MLX's one global random state, which every sequence in a batch
    shares, so only a request with the whole worker to itself can honour its seed.
    """
    return msg.get("seed") is None or float(msg.get("temperature", 0.0)) == 0.0


class Decoder:
    """Serves one model on the main thread, the only one that runs MLX.

    Concurrent generations share one ``lm.Batch`` of ``batch_size`` rows: each loop turn
    takes every queued message, admits waiting requests in arrival order while a row is
    free, then decodes one step for the whole batch, so requests join and leave between
    steps. A request beyond the batch waits queued, and is sent ``started`` only when it
    gets a row. A request that cannot share the batch (see ``_batchable``) waits until the
    batch drains and then runs alone; requests behind it wait too, so service stays first
    come, first served. ``commands`` is the reader thread's side (see ``Commands``).
    """

    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self.out = commands.out
        self.batch_size = p.BATCH_SIZE
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.vocab_size = 0
        self.batch: lm.Batch | None = None  # once a model that supports batching is loaded
        self.waiting: deque[dict[str, Any]] = deque()
        self.running: dict[int, _Stream] = {}  # batch uid -> stream
        self._samplers: dict[tuple[float, float, int, float], Any] = {}
        self.kind = "plain"  # how the tokenizer spells bytes (see lm.tokenizer_kind)
        self.spell: TokenBytes | None = None  # token id -> bytes, once a model is loaded

    def serve(self) -> None:
        inbox = self.commands.inbox
        while True:
            idle = not self.running and not self.waiting
            try:
                msg = inbox.get() if idle else inbox.get_nowait()
                while True:
                    if msg is None:
                        return
                    self.handle(msg)
                    msg = inbox.get_nowait()
            except queue.Empty:
                pass
            self.commands.drop_stale()
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
            self.commands.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def load(self, rid: str, msg: dict[str, Any]) -> None:
        self.batch_size = max(1, int(msg.get("batch_size") or p.BATCH_SIZE))
        memory_limit = int(msg.get("memory_limit") or 0)
        start = time.perf_counter()
        try:
            with bounded_memory(memory_limit) as headroom:
                self.model, self.tokenizer, config = lm.load(msg["path"])
        except MemoryError:
            self.commands.error(
                rid,
                "model_load_failed",
                f"model {msg.get('model')!r} ran out of memory while loading: memory_limit is {memory_limit} "
                f"bytes, and a load may use that plus {headroom} bytes for its tokenizer and threads. Check the "
                "model's config.json (a size such as num_hidden_layers may be far too large), or raise "
                "memory_limit (0 = no limit)",
            )
            return
        except Exception as exc:
            self.commands.error(rid, "model_load_failed", f"{type(exc).__name__}: {exc}")
            return
        self.context_length = config.get("max_position_embeddings") or None
        # The scores' width: a multimodal model's config has it in its text_config; else the tokenizer's.
        text_config = config.get("text_config") or {}
        self.vocab_size = int(
            config.get("vocab_size") or text_config.get("vocab_size") or len(self.tokenizer.get_vocab())
        )
        self.kind = lm.tokenizer_kind(self.tokenizer)
        self.spell = TokenBytes(self.tokenizer.convert_ids_to_tokens, self.kind, self.tokenizer.decode)
        if lm.can_batch(self.model):
            self.batch = lm.Batch(self.model, self.tokenizer, self.batch_size)
        self.out.send(
            {
                "type": p.T_LOADED,
                "request_id": rid,
                "memory_bytes": lm.active_memory(),
                "context_length": self.context_length,
                "load_s": time.perf_counter() - start,
                "batching": self.batch is not None,
            }
        )

    # -- admission --------------------------------------------------------------

    def admit(self) -> None:
        """Start waiting requests in order while they get a free row (or run alone on an empty batch)."""
        cancelled = self.commands.cancelled
        if cancelled and self.waiting:  # a queued request whose client left ends now, rowless
            keep = deque()
            for msg in self.waiting:
                if msg["request_id"] in cancelled:
                    self.commands.error(msg["request_id"], "cancelled", "the request was cancelled before it started")
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
                self.commands.error(rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def start(self, rid: str, msg: dict[str, Any], solo: bool) -> None:
        if self.model is None:
            self.commands.error(rid, "invalid_request", "no model is loaded in this worker")
            return
        if rid in self.commands.cancelled:  # the client left while a request ahead of it ran alone
            self.commands.error(rid, "cancelled", "the request was cancelled before it started")
            return
        self.out.send({"type": p.T_STARTED, "request_id": rid})
        stream = _Stream(
            rid,
            self._prompt_tokens(msg),
            int(msg["max_tokens"]),
            list(msg.get("stop") or []),
            self._detokenizer(chat=msg.get("messages") is not None),
            int(msg.get("top_logprobs") or 0) if msg.get("logprobs") else None,
        )
        if not stream.tokens:
            self.commands.error(rid, "invalid_request", "the prompt is empty")
            return
        if self.context_length and len(stream.tokens) > self.context_length:
            self.commands.error(
                rid,
                "context_length_exceeded",
                f"the prompt is {len(stream.tokens)} tokens; this model's context is {self.context_length} tokens",
            )
            return
        outside = sorted(int(t) for t in msg.get("logit_bias") or {} if not 0 <= int(t) < self.vocab_size)
        if outside:
            self.commands.error(
                rid,
                "invalid_request",
                f"logit_bias names token {outside[0]}, outside this model's vocabulary of {self.vocab_size} tokens",
                param="logit_bias",
                limit=self.vocab_size - 1,
                value=outside[0],
            )
            return
        sampler = self._sampler(msg)
        processors = lm.logits_processors(
            {int(t): float(b) for t, b in (msg.get("logit_bias") or {}).items()},
            float(msg.get("repetition_penalty", 1.0)),
            int(msg.get("repetition_context_size", 20)),
            float(msg.get("presence_penalty", 0.0)),
            float(msg.get("frequency_penalty", 0.0)),
        )
        if solo:
            self.generate_alone(stream, sampler, processors, msg.get("seed"))
            return
        assert self.batch is not None
        self.running[self.batch.add(stream.tokens, stream.max_tokens, sampler, processors)] = stream

    def _sampler(self, msg: dict[str, Any]) -> Any:
        top_k = int(msg.get("top_k", 0))
        if top_k >= self.vocab_size:  # every token is among the top k: no filter
            top_k = 0
        key = (float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)), top_k, float(msg.get("min_p", 0.0)))
        # Requests with equal parameters share one sampler object, which lets the batch
        # sample all of them in one call instead of row by row.
        if key not in self._samplers:
            if len(self._samplers) >= MAX_SAMPLERS:  # clients that vary their temperature: start over
                self._samplers.clear()
            self._samplers[key] = lm.sampler(*key)
        return self._samplers[key]

    def _detokenizer(self, chat: bool) -> Any:
        """The text of the answer's tokens from their bytes; a chat answer loses its first leading space."""
        if self.kind == "plain":  # no bytes to spell: mlx-lm's own
            return lm.detokenizer(self.tokenizer)
        assert self.spell is not None
        return TextStream(self.spell, trim_first_space=chat)

    def _prompt_tokens(self, msg: dict[str, Any]) -> list[int]:
        if msg.get("messages") is not None:
            return lm.encode_chat(self.tokenizer, msg["messages"])
        return lm.encode_prompt(self.tokenizer, msg["prompt"])

    # -- batched decoding -------------------------------------------------------

    def step(self) -> None:
        """Decode one step for the whole batch, then send each request its token."""
        assert self.batch is not None
        cancelled = [uid for uid, s in self.running.items() if s.rid in self.commands.cancelled]
        if cancelled:
            self.batch.remove(cancelled)
            for uid in cancelled:
                self.finish(self.running.pop(uid), "cancelled")
        if not self.running:
            return
        try:
            responses = self.batch.step()
        except Exception as exc:  # the batch's state is unknown now: fail its requests, start afresh
            log.exception("batch step failed")
            self.batch = lm.Batch(self.model, self.tokenizer, self.batch_size)
            for stream in self.running.values():
                self.commands.error(stream.rid, "internal_error", f"{type(exc).__name__}: {exc}")
            self.running.clear()
            return
        for r in responses:
            stream = self.running[r.uid]
            try:
                self.deliver(r, stream)
            except Exception as exc:  # one request's token (its text, its logprobs) fails that request alone
                log.exception("request %s failed", stream.rid)
                if self.running.pop(r.uid, None) is not None:
                    if r.finish_reason is None:
                        self.batch.remove([r.uid])
                    self.commands.error(stream.rid, "internal_error", f"{type(exc).__name__}: {exc}")

    def deliver(self, r: Any, stream: _Stream) -> None:
        """Send one batch row's new token to its request, and end the request if it is done."""
        assert self.batch is not None
        stream.generated += 1
        if stream.first_at is None:
            stream.first_at = time.perf_counter()
        text, stopped = stream.stopper.feed(self._text(stream, r.token, r.finish_reason))
        # One frame per token even when its text is held back (a partial UTF-8
        # character, a possible stop string): the parent's deadlines count tokens.
        self.send_token(stream, text, r.token, r.logprobs)
        if stopped:
            self.batch.remove([r.uid])
            self.finish(self.running.pop(r.uid), "stop")
        elif r.finish_reason is not None:
            if tail := stream.stopper.flush():
                self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": tail})
            self.finish(self.running.pop(r.uid), r.finish_reason)

    @staticmethod
    def _text(stream: _Stream, token: int, finish_reason: str | None) -> str:
        """The text ``token`` completes, and with the last token whatever the detokenizer held back."""
        if finish_reason != "stop":  # an end-of-sequence token adds no text
            stream.detokenizer.add_token(token)
        if finish_reason is not None:
            stream.detokenizer.finalize()
        return stream.detokenizer.last_segment

    def send_token(self, stream: _Stream, text: str, token: int, logprobs: Any) -> None:
        frame = {"type": p.T_TOKEN, "request_id": stream.rid, "text": text}
        if stream.top_logprobs is not None:
            assert self.spell is not None
            chosen, alternatives = lm.top_logprobs(logprobs, token, stream.top_logprobs)
            frame["logprobs"] = [entry(token, chosen, alternatives, self.spell)]
        self.out.send(frame)

    def finish(self, stream: _Stream, reason: str) -> None:
        now = time.perf_counter()
        ttft = None if stream.first_at is None else stream.first_at - stream.start
        decode_s = None if stream.first_at is None else now - stream.first_at
        self.commands.end(stream.rid)
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
                    "peak_memory_bytes": lm.peak_memory(),
                },
            }
        )

    # -- one at a time ----------------------------------------------------------

    def generate_alone(self, stream: _Stream, sampler: Any, processors: list[Any], seed: Any) -> None:
        finish, last = "length", None
        for last in lm.generate_alone(
            self.model,
            self.tokenizer,
            stream.tokens,
            stream.max_tokens,
            sampler,
            processors,
            None if seed is None else int(seed),
        ):
            if stream.rid in self.commands.cancelled:
                finish = "cancelled"
                break
            stream.generated = last.generation_tokens
            if stream.first_at is None:
                stream.first_at = time.perf_counter()
            text, stopped = stream.stopper.feed(self._text(stream, last.token, last.finish_reason))
            self.send_token(stream, text, last.token, last.logprobs)
            if stopped:
                finish = "stop"
                break
            finish = last.finish_reason or finish
        else:
            if tail := stream.stopper.flush():
                self.out.send({"type": p.T_TOKEN, "request_id": stream.rid, "text": tail})
        self.finish(stream, finish)
