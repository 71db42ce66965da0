#!/usr/bin/env bash
# Install the project, then start JupyterLab with the mlx_jupyter extension on the quickstart notebook.
# Prints one line per step, then the URL to open; the detail (pip, the build, the server) goes to run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLX_JUPYTER_SETUP_LOG=${MLX_JUPYTER_SETUP_LOG:-$PWD/run.log}
: > "$MLX_JUPYTER_SETUP_LOG"
bash scripts/setup.sh

# No browser: open the URL printed below. default_url makes that page (and /) the
# quickstart; the notebook argument alone would only open a browser there.
args=(--no-browser --LabApp.default_url=/lab/tree/quickstart.ipynb)
if [ "$(id -u)" = 0 ]; then
  args+=(--allow-root)  # containers often run as root; Jupyter refuses it unless told
fi
echo "run: starting JupyterLab (server log: $MLX_JUPYTER_SETUP_LOG)"
.venv/bin/jupyter-lab "${args[@]}" notebooks/quickstart.ipynb "$@" >> "$MLX_JUPYTER_SETUP_LOG" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; exit 130' INT TERM
# Jupyter prints its URL with the token masked; the server's own info file has the real one.
if ! url=$(.venv/bin/python scripts/lab_url.py "$server" lab/tree/quickstart.ipynb); then
  tail -20 "$MLX_JUPYTER_SETUP_LOG"
  echo "run: JupyterLab did not start (full log: $MLX_JUPYTER_SETUP_LOG)" >&2
  exit 1
fi
echo "run: JupyterLab is ready (Ctrl+C stops it). Open: $url"
wait "$server"
