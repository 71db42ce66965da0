"""A real worker process driven through its frame protocol: send a generation, read its frames back."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.field_checks import Limits
from mlx_jupyter.engine.request import GenerationRequest
from mlx_jupyter.engine.worker import WorkerProcess
from tests.models import TINY_CONTEXT


def submit(worker: WorkerProcess, rid: str, **fields: Any) -> queue.SimpleQueue:
    """Send a generation of these request fields as ``rid``; returns the queue its frames arrive on."""
    frames = worker.open(rid)
    request = GenerationRequest.parse(fields, Limits(max_tokens=TINY_CONTEXT))
    worker.send({"op": p.OP_GENERATE, "request_id": rid, **request.worker_message()})
    return frames


def drain(
    frames: queue.SimpleQueue, on_token: Callable[[int], object] | None = None
) -> tuple[str, dict[str, Any], int]:
    """Text, final frame (done or error) and number of token frames of one request.

    ``on_token(n)`` runs as the n-th token frame arrives.
    """
    texts = []
    while True:
        frame = frames.get(timeout=30)
        if frame["type"] == p.T_TOKEN:
            texts.append(frame["text"])
            if on_token is not None:
                on_token(len(texts))
        elif frame["type"] in (p.T_DONE, p.T_ERROR):
            return "".join(texts), frame, len(texts)
