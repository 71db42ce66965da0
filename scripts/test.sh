#!/usr/bin/env bash
# Install what the tests need, then run ruff and the whole test suite (lock checker in validate mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLX_JUPYTER_LOCKDEP=validate
export MLX_JUPYTER_STRESS_SECONDS=${MLX_JUPYTER_STRESS_SECONDS:-20}
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
