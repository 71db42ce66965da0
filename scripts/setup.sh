#!/usr/bin/env bash
# Create .venv and install the project with its test tools; does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.mlx-jupyter-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
# OpenBLAS: the Linux mlx[cpu] wheel bundles the reference BLAS, and scripts/train_builtin.py
# (which preloads OpenBLAS when present) trains about 20x faster with it. Optional: best effort.
if [ "$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenblas0-pthread >/dev/null 2>&1 \
    || echo "note: could not install OpenBLAS; scripts/train_builtin.py will train slowly"
fi
