"""Admission: which waiting request gets a model slot, and which idle model makes room — pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_jupyter.engine.errors import MemoryLimitError


@dataclass(frozen=True)
class Resident:
    """What admission needs to know of one resident model.

    Args:
        model: its id.
        state: ``starting``, ``ready``, ``draining`` or ``stopping``.
        leases: requests holding it.
        last_used: when it was last used (any clock: only the order counts).
        claimed_by: the ticket (``seq``) it is claimed for, which it will make room for once idle.
        memory_bytes: what it holds (or will hold) in memory.
    """

    model: str
    state: str
    leases: int
    last_used: float
    claimed_by: int | None
    memory_bytes: int

    @property
    def in_service(self) -> bool:
        return self.state in ("starting", "ready")


@dataclass(frozen=True)
class Decision:
    """What a waiting request does now.

    ``action`` is ``grant`` (lease ``model``), ``load`` (start ``model``: there is room),
    ``evict`` (stop idle ``victim`` to make room), ``claim`` (reserve busy ``victim``: it
    takes no newer request and makes room when idle) or ``wait``.
    """

    action: str
    victim: str | None = None


WAIT = Decision("wait")


def decide(
    seq: int,
    model: str,
    size_bytes: int,
    resident: Sequence[Resident],
    waiting: Sequence[tuple[int, str]],
    max_loaded_models: int,
    memory_limit: int,
) -> Decision:
    """What request ``seq`` for ``model`` (``size_bytes`` of weights) does, given what is resident
    and who waits (``(seq, model)`` in arrival order). Raises MemoryLimitError if the model can
    never fit.

    Requests are served in arrival order: only the first one that needs a slot may take or
    make one, and a model another earlier request waits for is never evicted. A busy model
    is never evicted; the least recently used idle one is.
    """
    in_service = {r.model: r for r in resident if r.in_service}
    current = in_service.get(model)
    if current is not None:
        # A model claimed by an earlier request takes no new leases, so a stream of
        # requests for it cannot starve the request waiting for its slot.
        claimed_earlier = current.claimed_by is not None and current.claimed_by < seq
        return Decision("grant") if current.state == "ready" and not claimed_earlier else WAIT
    first = next((s for s, m in waiting if m not in in_service), None)
    if first != seq:
        return WAIT
    if memory_limit and size_bytes > memory_limit:
        raise MemoryLimitError(f"model {model!r} needs {size_bytes} bytes but memory_limit is {memory_limit} bytes")
    used = sum(r.memory_bytes for r in resident)
    if len(resident) < max_loaded_models and (not memory_limit or used + size_bytes <= memory_limit):
        return Decision("load")
    wanted_earlier = {m for s, m in waiting if s < seq}
    candidates = sorted(
        (r for r in in_service.values() if r.state == "ready" and r.model not in wanted_earlier),
        key=lambda r: r.last_used,
    )
    for r in candidates:
        if r.leases == 0 and r.claimed_by in (None, seq):
            return Decision("evict", r.model)
    if candidates and not any(r.claimed_by == seq for r in candidates):
        victim = next((r for r in candidates if r.claimed_by is None), None)
        if victim is not None:
            return Decision("claim", victim.model)
    return WAIT
