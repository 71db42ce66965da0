"""The memory bound of a model load in a worker: what ``memory_limit`` lets the load allocate."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator

# What a load allocates besides the weights: the tokenizer, and the thread pools of mlx and of
# the tokenizer (up to 8 MiB of stack per thread, about a thread per core). Measured on 2
# cores: about 45 MiB for builtin:tiny and builtin:pydoc.
LOAD_HEADROOM = 128 << 20
STACK_PER_CPU = 8 << 20


def _data_bytes() -> int | None:
    """This process's private writable memory (VmData), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def bounded_memory(limit: int) -> Iterator[int | None]:
    """For the block, let the process allocate only ``limit`` bytes (plus headroom) beyond what it has.

    RLIMIT_DATA counts private writable memory (heap, anonymous maps, thread stacks), not
    mapped files. An allocation past it raises MemoryError, or, inside mlx, may abort the
    process (the parent reports that as the same error); no core is dumped meanwhile.
    Yields the headroom granted besides ``limit``, or None when nothing is bounded (no
    limit, or no /proc: not Linux).
    """
    used = _data_bytes()
    if not limit or used is None:
        yield None
        return
    headroom = LOAD_HEADROOM + STACK_PER_CPU * (os.cpu_count() or 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    bound = used + limit + headroom
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    resource.setrlimit(resource.RLIMIT_DATA, (bound if hard == resource.RLIM_INFINITY else min(bound, hard), hard))
    try:
        yield headroom
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CORE, core)
