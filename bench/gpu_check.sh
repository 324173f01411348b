#!/usr/bin/env bash
# On a GPU machine: build deer._C with the CUDA kernels (DEER_FORCE_CUDA=1 fails loudly if they cannot
# be built), run the kernel tests including the CUDA and Triton ones, then the kernel benchmarks, and
# write everything under ${OUT:-bench/results}/gpu_check-<date>/ (pytest-benchmark JSON, logs,
# nvidia-smi and build info).
#   bash bench/gpu_check.sh            # from the repository root; QUICK=1 for the --quick shapes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DEST="${OUT:-bench/results}/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$DEST"
QUICK_FLAG=""
[ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"; } \
  > "$DEST/device.txt" 2>&1
echo "== build (DEER_FORCE_CUDA=1)"
DEER_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" "$PY" setup.py build_ext --inplace \
  > "$DEST/build.log" 2>&1 || { tail -50 "$DEST/build.log"; exit 1; }
"$PY" -c "import deer._C as C; b = C.compiled_backends(); print('compiled backends:', b); assert 'cuda' in b" \
  | tee -a "$DEST/device.txt"

echo "== kernel tests (cpu, cuda, triton, reference)"
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_per_sample_grad_norm.py tests/test_clip_reduce_noise.py \
  tests/test_ops_dispatch.py --junitxml="$DEST/tests.xml" 2>&1 | tee "$DEST/tests.log" || status=1

echo "== kernel benchmarks"
for op in per_sample_grad_norm clip_reduce_noise; do
  "$PY" -m pytest -q -p no:cacheprovider "bench/bench_${op}.py" $QUICK_FLAG \
    --benchmark-json="$DEST/bench_${op}.json" 2>&1 | tee "$DEST/bench_${op}.log" || status=1
done
echo "results in $DEST"
exit $status
