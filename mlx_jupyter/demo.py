"""A terminal demo of the engine: load a model, stream an answer, watch the idle unload."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from mlx_jupyter.engine import WorkerManager
from mlx_jupyter.engine.models import DEFAULT_MODEL


def _countdown(manager: WorkerManager) -> None:
    while statuses := manager.status():
        now = time.time()
        line = ", ".join(
            f"{s.id} [{s.state}, pid {s.pid}] "
            + (
                f"unloads in {max(0.0, s.expires_at - now):4.1f}s"
                if s.expires_at
                else ("kept loaded" if s.state == "ready" and not s.active_requests else s.state)
            )
            for s in statuses
        )
        print(f"\r{line}   ", end="", flush=True)
        time.sleep(0.5)
    print("\rno model loaded: the idle reaper unloaded it and its worker process exited")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlx-jupyter-demo", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model id (default: %(default)s)")
    parser.add_argument("--model-dir", action="append", default=[], help="a model_dirs folder (repeatable)")
    parser.add_argument(
        "--prompt",
        default="What does `itertools.chain` do?",
        help="a question (a chat message), or text to continue for a model that takes no chat messages",
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="seconds before the idle unload")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )

    with WorkerManager(idle_timeout=args.idle_timeout, model_dirs=args.model_dir) as manager:
        status = manager.load(args.model)
        print(f"loaded {status.id} in worker pid {status.pid} ({status.memory_bytes / 1e6:.1f} MB)")
        # A question for a chat model; text to continue for a completion model.
        chat = manager.resolver.resolve(args.model).chat
        print(f"\n{args.prompt}", end="\n\n" if chat else "", flush=True)
        asked = {"messages": [{"role": "user", "content": args.prompt}]} if chat else {"prompt": args.prompt}
        for chunk in manager.stream_generate(
            model=args.model, max_tokens=args.max_tokens, temperature=args.temperature, seed=0, **asked
        ):
            print(chunk.text, end="", flush=True)
        t = chunk.timings or {}
        print(
            f"\n\n{chunk.usage['completion_tokens']} tokens, {t.get('generation_tps') or 0:.0f} tokens/s, "
            f"first token after {1000 * (t.get('ttft_s') or 0):.0f} ms, finish: {chunk.finish_reason}\n"
        )
        _countdown(manager)


if __name__ == "__main__":
    sys.exit(main())
