"""Run local MLX language models from Jupyter."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    from mlx_jupyter.server.app import MLXExtension

    return [{"module": "mlx_jupyter.server.app", "app": MLXExtension}]


def _jupyter_labextension_paths() -> list[dict]:
    # Where `jupyter labextension develop` links from: the build output of labextension/.
    return [{"src": "labextension", "dest": "mlx-jupyter"}]
