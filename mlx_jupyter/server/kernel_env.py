"""Exports the server's URL and token to the environment that kernels started by the server inherit."""

from __future__ import annotations

import os

from jupyter_server.serverapp import ServerApp

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL

WILDCARD_IPS = ("", "0.0.0.0", "::")


def kernel_url(serverapp: ServerApp) -> str | None:
    """The URL (with base_url) a kernel on this machine reaches the server at; None on a unix socket."""
    if serverapp.sock:
        return None  # urllib cannot speak http+unix; kernels fall back to a local engine
    ip = "localhost" if serverapp.ip in WILDCARD_IPS else None
    return serverapp._get_urlparts(path=serverapp.base_url, ip=ip).geturl()


class KernelEnv:
    """Sets ``MLX_JUPYTER_SERVER_URL`` / ``MLX_JUPYTER_TOKEN`` in ``os.environ`` while the server runs.

    Jupyter builds a kernel's environment from the server's ``os.environ``, so kernels
    started after ``export`` inherit both. The port is final only once the server binds
    it, so ``export`` runs as the first callback of the server's event loop.
    """

    def __init__(self, serverapp: ServerApp) -> None:
        self.serverapp = serverapp
        self.exported: dict[str, str] = {}

    def export(self) -> None:
        url = kernel_url(self.serverapp)
        if url is None:
            return
        self.exported = {ENV_URL: url, ENV_TOKEN: self.serverapp.identity_provider.token or ""}
        os.environ.update(self.exported)

    def withdraw(self) -> None:
        """Remove what ``export`` set (an in-process server must not leak into later code)."""
        for name, value in self.exported.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        self.exported = {}
