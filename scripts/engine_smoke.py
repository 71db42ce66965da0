"""Smoke check of the engine on mlx's default device (run it on a CUDA machine to check the GPU path).

Loads builtin:tiny in a worker, checks that a greedy answer repeats, that 8 concurrent
requests (batched in the worker) give the same text as one at a time, that a closed
stream is cancelled, and that unloading ends the worker process. Prints what it saw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx

from mlx_jupyter.engine import WorkerManager

MODEL = "builtin:tiny"


def main() -> None:
    print("mlx", mx.__version__, "default device", mx.default_device())
    with WorkerManager(idle_timeout=0, max_loaded_models=2) as manager:
        start = time.perf_counter()
        status = manager.load(MODEL)
        print(f"load {MODEL}: {time.perf_counter() - start:.2f}s, worker pid {status.pid}")
        if shutil.which("nvidia-smi"):  # the worker's pid here shows the model is on the GPU
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
            print("GPU processes:", subprocess.run(query, capture_output=True, text=True).stdout.split("\n"))
        greedy = {"model": MODEL, "max_tokens": 64, "temperature": 0.0, "seed": 1}
        first, again = (manager.generate("The Zen of Python", **greedy) for _ in range(2))
        print("greedy answer repeats:", first.text == again.text, first.usage, first.timings)
        prompts = [f"Line {i}: Beautiful is better than" for i in range(8)]
        alone = [manager.generate(p, **greedy).text for p in prompts]
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: manager.generate(p, **greedy), prompts))
        wall = time.perf_counter() - start
        tokens = sum(r.usage["completion_tokens"] for r in together)
        same = sum(r.text == a for r, a in zip(together, alone, strict=True))
        print(f"{len(prompts)} concurrent: {tokens / wall:.0f} tok/s in all; same text as alone: {same}/{len(prompts)}")
        stream = manager.stream_generate("Cancel me", model=MODEL, max_tokens=400, temperature=0.0)
        next(stream)
        stream.close()
        print("after a closed stream:", [(s.id, s.state, s.active_requests) for s in manager.status()])
        manager.unload(MODEL)
        print("unloaded; worker process still there:", os.path.exists(f"/proc/{status.pid}"))


if __name__ == "__main__":
    main()
