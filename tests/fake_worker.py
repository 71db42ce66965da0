"""A stand-in worker for tests: speaks the worker protocol, then misbehaves as MLX_TEST_FAKE_WORKER says.

``not-an-object``: the second generate gets a frame that is JSON but not an object.
``immortal``: ignores shutdown and the end of its command pipe; a generate makes it close
its event pipe. It exits only when its parent is gone or it is killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from mlx_jupyter.engine import protocol as p


def _live_on(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.1)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cmd-fd", type=int, required=True)
    parser.add_argument("--evt-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()
    behaviour = os.environ["MLX_TEST_FAKE_WORKER"]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    p.write_frame(args.evt_fd, {"type": p.T_HELLO, "pid": os.getpid()})
    generates = 0
    while True:
        try:
            msg = p.read_frame(args.cmd_fd)
        except p.ChannelClosed:
            if behaviour == "immortal":
                _live_on(args.parent_pid)
            os._exit(0)
        op, rid = msg.get("op"), msg.get("request_id", "")
        if op == p.OP_LOAD:
            loaded = {"memory_bytes": 0, "context_length": 512, "load_s": 0.0, "batching": True}
            p.write_frame(args.evt_fd, {"type": p.T_LOADED, "request_id": rid, **loaded})
        elif op == p.OP_PING:
            p.write_frame(args.evt_fd, {"type": p.T_PONG, "request_id": rid, "seq": msg.get("seq")})
        elif op == p.OP_SHUTDOWN and behaviour != "immortal":
            os._exit(0)
        elif op == p.OP_GENERATE:
            generates += 1
            p.write_frame(args.evt_fd, {"type": p.T_STARTED, "request_id": rid})
            if behaviour == "not-an-object" and generates == 2:
                body = b"[1, 2]"
                os.write(args.evt_fd, len(body).to_bytes(4, "big") + body)
            elif behaviour == "immortal":
                os.close(args.evt_fd)
                _live_on(args.parent_pid)


if __name__ == "__main__":
    main()
