#!/usr/bin/env bash
# Install the project, then start JupyterLab with the mlx_jupyter extension on the quickstart notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=(--no-browser)  # open the URL with the token that JupyterLab prints
if [ "$(id -u)" = 0 ]; then
  args+=(--allow-root)  # containers often run as root; Jupyter refuses it unless told
fi
exec .venv/bin/jupyter lab "${args[@]}" notebooks/quickstart.ipynb "$@"
