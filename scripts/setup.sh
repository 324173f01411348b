#!/usr/bin/env bash
# Set up deer on a fresh Linux machine: a virtual environment in .venv with the pinned set from
# constraints.txt (torch first, the registry's standard CUDA build), then deer itself built with
# --no-build-isolation so its extension compiles against exactly that torch.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${DEER_PYTHON:-python3}"
VENV="${DEER_VENV:-$ROOT/.venv}"
# The standard registry build, never a machine-local wheel directory that may hold another build.
export PIP_FIND_LINKS=""
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[deer setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q -c constraints.txt)
stamp="$VENV/.deer-deps-$(sha256sum constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[deer setup] installing pinned dependencies (torch first; several GB on a fresh machine)"
  "${PIP[@]}" setuptools wheel
  "${PIP[@]}" torch torchvision triton
  "${PIP[@]}" -r requirements-dev.txt
  touch "$stamp"
fi
echo "[deer setup] building deer (deer._C: CPU kernels always, CUDA kernels when nvcc is found)"
"${PIP[@]}" --no-build-isolation --no-deps -e .
"$VENV/bin/python" - <<'PY'
import deer, deer._C
print(f"[deer setup] ok: deer {deer.__version__}, backends compiled: {deer._C.compiled_backends()}")
PY
