#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install farm with its exact pins. Idempotent: a second run
# only checks. Usage: scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$HERE/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.farm-installed"
REQ_HASH="$(cat "$HERE/requirements.txt" "$HERE/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch/torchvision: exact pins; on the project machines pip reads them from local disk.
"$VENV/bin/python" -m pip install -q -r "$HERE/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e "$HERE"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import torch, torchvision, ray, mlflow, farm; print('farm env ok: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
echo "$REQ_HASH" > "$STAMP"
