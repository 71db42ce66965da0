#!/usr/bin/env bash
# Install the project, then run the engine demo on the built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mlx_jupyter.demo "$@"
