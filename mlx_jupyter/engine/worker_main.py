"""Worker process entry point: checks mlx and mlx-lm, says hello, then serves its model until told to stop."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading

from mlx_jupyter.engine import mlx_lm_adapter as lm
from mlx_jupyter.engine import protocol as p
from mlx_jupyter.engine.worker_channel import Commands, Outbox
from mlx_jupyter.engine.worker_decoding import Decoder

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
    commands = Commands(args.cmd_fd, outbox)
    decoder = Decoder(commands)
    try:
        lm.check()  # imports mlx and mlx-lm before "hello", so a load skips that
    except lm.IncompatibleMLXLM as exc:
        # In place of the hello: the parent's spawn raises it as a ModelLoadError.
        log.error("%s", exc)
        outbox.send({"type": p.T_ERROR, "request_id": "", "code": "model_load_failed", "message": str(exc)})
        outbox.close()
        os._exit(1)
    lm.warm_cxx_exceptions()

    threading.Thread(target=commands.read, name="commands", daemon=True).start()
    outbox.send({"type": p.T_HELLO, "pid": os.getpid()})
    decoder.serve()
    outbox.close()
    os._exit(0)


if __name__ == "__main__":
    main()
