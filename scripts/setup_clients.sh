#!/usr/bin/env bash
# Create .venv-clients with the real API clients that tests/test_clients.py drives; does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
requirements=tests/clients/requirements.txt
stamp=.venv-clients/.installed
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"  # a failed install leaves it stale: install again next time
if [ ! -x .venv-clients/bin/python ]; then
  "$PYTHON" -m venv .venv-clients
fi
.venv-clients/bin/python -m pip install --quiet --upgrade pip
.venv-clients/bin/python -m pip install --quiet -r "$requirements"
echo "$want" > "$stamp"
