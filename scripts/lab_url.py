"""Print the URL that opens a starting JupyterLab, with its real token, once it listens: used by scripts/run.sh."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

from jupyter_core.paths import jupyter_runtime_dir


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pid", type=int, help="the jupyter-lab process")
    parser.add_argument("path", help="what to open, below the server's base URL (lab/tree/quickstart.ipynb)")
    args = parser.parse_args()
    # The server writes this file once it listens; it holds the token even when Jupyter's log masks it.
    info_file = Path(jupyter_runtime_dir()) / f"jpserver-{args.pid}.json"
    while not info_file.exists():
        if not alive(args.pid):
            return 1
        time.sleep(0.2)
    for _ in range(50):  # written, but maybe not complete yet
        try:
            info = json.loads(info_file.read_text())
            break
        except json.JSONDecodeError:
            time.sleep(0.1)
    else:
        return 1
    url = info["url"].rstrip("/") + "/" + args.path
    if info.get("token"):
        url += f"?token={quote(info['token'])}"
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
