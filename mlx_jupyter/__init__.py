"""Run local MLX language models from Jupyter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from mlx_jupyter.server.app import MLXExtension

    return [{"module": "mlx_jupyter.server.app", "app": MLXExtension}]


def load_ipython_extension(shell: InteractiveShell) -> None:
    """``%load_ext mlx_jupyter``: the %%mlx and %mlx magics."""
    from mlx_jupyter.kernel.magics import load_ipython_extension

    load_ipython_extension(shell)


def unload_ipython_extension(shell: InteractiveShell) -> None:
    """``%unload_ext mlx_jupyter``: forget the client (a kernel-hosted engine stops its workers)."""
    from mlx_jupyter.kernel.magics import unload_ipython_extension

    unload_ipython_extension(shell)


def _jupyter_labextension_paths() -> list[dict]:
    # Where `jupyter labextension develop` links from: the build output of labextension/.
    return [{"src": "labextension", "dest": "mlx-jupyter"}]
