#!/usr/bin/env bash
# The test command: set up (idempotent), run pytest, then build and run the C++ tests with ctest.
# pytest exiting 5 (nothing collected) is a failure here, never a silent pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
set +e
$PY -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[deer test] pytest collected no tests: failing"; exit 1; fi
if [ $rc -ne 0 ]; then exit $rc; fi
# Benchmark smoke run: every bench case runs once on tiny shapes and writes its JSON row; it asserts
# nothing about speed (speed lives in the full `pytest bench/` run, see README.md).
echo "[deer test] benchmark smoke run (DEER_BENCH_QUICK=1)"
mkdir -p build
set +e
DEER_BENCH_QUICK=1 $PY -m pytest bench -q -p no:cacheprovider --benchmark-json=build/bench_quick.json
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[deer test] pytest collected no benchmarks: failing"; exit 1; fi
if [ $rc -ne 0 ]; then exit $rc; fi
$PY - <<'PY'
import json
rows = json.load(open("build/bench_quick.json"))["benchmarks"]
assert rows, "the benchmark smoke run wrote no rows"
print(f"[deer test] benchmark smoke: {len(rows)} cases wrote JSON rows")
PY
echo "[deer test] C++ tests (CMake + ctest)"
TORCH_PREFIX="$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
NV_LIB="$($PY -c 'import glob, os, nvidia; print(next(iter(sorted(glob.glob(os.path.join(nvidia.__path__[0], "cu*", "lib")))), ""))' 2>/dev/null || true)"
PYBIND_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S . -B build-cmake -G Ninja -DCMAKE_MAKE_PROGRAM="$(realpath "$(dirname $PY)/ninja")" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -Dpybind11_DIR="$PYBIND_DIR" -DDEER_NVIDIA_LIB_DIR="$NV_LIB" \
  -DPython_EXECUTABLE="$(realpath $PY)" -DCMAKE_BUILD_TYPE=Release > build-cmake.log 2>&1 \
  || { cat build-cmake.log; exit 1; }
cmake --build build-cmake -j "$(nproc)" >> build-cmake.log 2>&1 || { tail -50 build-cmake.log; exit 1; }
(cd build-cmake && ctest --output-on-failure)
