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
  # The JupyterLab extension is built below with this venv's jlpm, not in pip's build env.
  SKIP_JUPYTER_BUILDER=1 .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi

# The JupyterLab extension and the dashboard widget's script: built again when their
# sources change, then linked into the venv so `jupyter labextension list` shows it.
lab_stamp=.venv/.mlx-jupyter-labextension
lab_want=$(cd labextension && cat package.json yarn.lock tsconfig.json .yarnrc.yml install.json src/*.ts style/* | sha256sum | cut -d' ' -f1)
if [ ! -f "$lab_stamp" ] || [ "$(cat "$lab_stamp")" != "$lab_want" ] \
    || [ ! -f mlx_jupyter/labextension/package.json ] || [ ! -f mlx_jupyter/kernel/static/dashboard.js ]; then
  rm -f "$lab_stamp"  # a failed build leaves partial output: build again next time
  log=.venv/labextension-build.log
  if ! (
    export PATH="$PWD/.venv/bin:$PATH"
    cd labextension && jlpm install && jlpm build && cd .. && jupyter-builder develop --overwrite .
  ) > "$log" 2>&1; then
    tail -40 "$log"
    echo "setup: building the JupyterLab extension failed (full log: $log)" >&2
    exit 1
  fi
  echo "$lab_want" > "$lab_stamp"
fi

# The real API clients (openai, LangChain, litellm, jupyter-ai-magics) in a venv of their own:
# their dependencies conflict with or bloat the project's.
bash scripts/setup_clients.sh

# The browser test drives Debian's chromium (Playwright downloads no browser of its own).
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi

# OpenBLAS: the Linux mlx[cpu] wheel bundles the reference BLAS, and scripts/train_builtin.py
# (which preloads OpenBLAS when present) trains about 20x faster with it. Optional: best effort.
if [ "$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libopenblas0-pthread >/dev/null 2>&1 \
    || echo "note: could not install OpenBLAS; scripts/train_builtin.py will train slowly"
fi
