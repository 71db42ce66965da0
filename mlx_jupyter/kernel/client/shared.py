"""``get_client()`` for plain Python: the client of this shell's magics, else one shared by the process."""

from __future__ import annotations

from typing import Any

from IPython.core.getipython import get_ipython

from mlx_jupyter.kernel.client.base import MLXClient
from mlx_jupyter.kernel.client.discovery import ClientCache, Discovery, discover
from mlx_jupyter.kernel.client.errors import ClientError
from mlx_jupyter.kernel.client.server import ServerClient

# For code that runs where the magics are not loaded: found with the default settings.
_process_client = ClientCache(lambda: discover(Discovery()))


def get_client() -> MLXClient:
    """The client the ``%mlx`` magics of this IPython shell use (found on first use, as their
    traits say); where they are not loaded, one found with the default settings and kept."""
    magics = _shell_magics()
    return magics.client if magics is not None else _process_client.get()


def reset_client() -> None:
    """Close and forget the client ``get_client`` gives, so that the next call looks again."""
    magics = _shell_magics()
    if magics is not None:
        magics.close()
    else:
        _process_client.reset()


def openai_base_url() -> str:
    """``<server>/mlx/v1`` of the server serving this kernel (needs a server, not a local engine)."""
    return _server_client().url + "mlx/v1"


def openai_api_key() -> str:
    """The credential for ``openai_base_url()``: the Jupyter token (the client insists on a non-empty key)."""
    return _server_client().token or "unused"


def _shell_magics() -> Any:
    """The MLXMagics registered in the running IPython shell, if any."""
    shell = get_ipython()
    return shell.magics_manager.registry.get("MLXMagics") if shell is not None else None


def _server_client() -> ServerClient:
    client = get_client()
    if not isinstance(client, ServerClient):
        raise ClientError(
            "the OpenAI-compatible API needs a Jupyter server with mlx_jupyter; this kernel runs a local engine",
            "no_server",
        )
    return client
