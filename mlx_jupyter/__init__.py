"""Run local MLX language models from Jupyter."""

__version__ = "0.1.0"
