"""The real worker, started with one name taken out of mlx or mlx-lm: ``MLX_TEST_WITHOUT`` is ``module.name``."""

from __future__ import annotations

import importlib
import os

from mlx_jupyter.engine import worker_main

if __name__ == "__main__":
    module, _, name = os.environ["MLX_TEST_WITHOUT"].rpartition(".")
    delattr(importlib.import_module(module), name)
    worker_main.main()
