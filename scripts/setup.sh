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
# In CI the CUDA sources must really compile (a broken .cu fails the run), though no kernel runs there.
if [ "${CI:-}" = "true" ] && [ -z "${DEER_SKIP_CUDA:-}" ]; then export DEER_FORCE_CUDA=1; fi

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
# Rebuild only when the sources of the extension or the build switches changed.
src_hash="$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py; \
  echo "${DEER_SKIP_CUDA:-}${DEER_FORCE_CUDA:-}${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -c1-16)"
if [ -f "$VENV/.deer-build-$src_hash" ] && "$VENV/bin/python" -c "import deer._C" 2>/dev/null; then
  echo "[deer setup] deer._C is up to date"
else
  echo "[deer setup] building deer (deer._C: CPU kernels always, CUDA kernels when nvcc is found)"
  rm -f "$VENV"/.deer-build-*
  "${PIP[@]}" --no-build-isolation --no-deps -e .
  touch "$VENV/.deer-build-$src_hash"
fi
"$VENV/bin/python" - <<'PY'
import deer, deer._C
print(f"[deer setup] ok: deer {deer.__version__}, backends compiled: {deer._C.compiled_backends()}")
PY
