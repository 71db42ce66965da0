"""Finding the kernel's model host: the server that started it, one named explicitly, or an engine in the kernel."""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL
from mlx_jupyter.engine.settings import EngineSettings
from mlx_jupyter.kernel.client.base import MLXClient
from mlx_jupyter.kernel.client.errors import AuthError, ClientError
from mlx_jupyter.kernel.client.local import LocalClient
from mlx_jupyter.kernel.client.server import ServerClient

log = logging.getLogger(__name__)


@dataclass
class Discovery:
    """Where ``discover`` looks for a host; the magics make one from their traits.

    Args:
        server: ``"auto"`` (the environment, then the runtime file, else local),
            ``"local"`` (always a kernel-hosted engine) or a server URL.
        token: the Jupyter token for an explicit URL (default: ``MLX_JUPYTER_TOKEN``).
        timeout: seconds a server request (a whole stream's gaps included) may take.
        local: the settings of a kernel-hosted engine (None: the defaults).
    """

    server: str = "auto"
    token: str = field(default="", repr=False)  # a repr may end up in a shared notebook's output
    timeout: float = 600.0
    local: EngineSettings | None = None


def discover(config: Discovery) -> MLXClient:
    """The first candidate server whose ``mlx/api/health`` answers, else an engine in the kernel.

    An explicit URL is never replaced by a local engine: its failure is raised.
    """
    for url, token in server_candidates(config):
        client = ServerClient(url, token, config.timeout)
        try:
            client.health()
        except AuthError:
            return client  # the extension is there; its errors say what to fix
        except ClientError as exc:
            client.close()
            if config.server not in ("", "auto"):
                raise
            log.info("mlx_jupyter: %s is not usable (%s)", client.host, exc)
            continue
        return client
    return LocalClient(config.local)


def server_candidates(config: Discovery) -> list[tuple[str, str]]:
    """``(url, token)`` pairs to probe, in order."""
    if config.server == "local":
        return []
    if config.server not in ("", "auto"):
        return [(config.server, config.token or os.environ.get(ENV_TOKEN, ""))]
    found = []
    if os.environ.get(ENV_URL):
        found.append((os.environ[ENV_URL], os.environ.get(ENV_TOKEN, "")))
    info = runtime_file_server()
    if info is not None:
        found.append(info)
    return found


def runtime_file_server() -> tuple[str, str] | None:
    """The URL and token in ``jpserver-<JPY_PARENT_PID>.json``, if the parent is a Jupyter server."""
    pid = os.environ.get("JPY_PARENT_PID", "")
    if not pid.isdigit():
        return None
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        info = json.loads((Path(jupyter_runtime_dir()) / f"jpserver-{pid}.json").read_text())
    except (OSError, ValueError, ImportError):
        return None
    url = info.get("url") or ""
    if not url:
        return None
    base = info.get("base_url") or "/"
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, base, "", "")), info.get("token") or ""


class ClientCache:
    """One client, found on first use by ``find`` and kept until ``reset``; any thread may ask.

    ``find`` probes the network, so it runs outside the lock, which guards ``_client``
    only; when two threads race, the first client found is kept and the other closed.
    """

    def __init__(self, find: Callable[[], MLXClient]) -> None:
        self._find = find
        self._client: MLXClient | None = None
        self._lock = threading.Lock()

    def get(self) -> MLXClient:
        client = self._client
        if client is not None:
            return client
        found: MLXClient | None = self._find()
        with self._lock:
            if self._client is None:
                self._client, found = found, None
                log.info("mlx_jupyter: models served by %s", self._client.host)
            client = self._client
        if found is not None:  # another thread was quicker
            found.close()
        return client

    def current(self) -> MLXClient | None:
        """The client, without finding one."""
        return self._client

    def reset(self) -> None:
        """Close and forget the client, so the next ``get`` looks again."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
