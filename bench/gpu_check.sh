#!/usr/bin/env bash
# Everything a GPU lease is for, in one call: build deer._C with the CUDA kernels for the card
# (DEER_FORCE_CUDA=1 fails loudly if they cannot be built), run compute-sanitizer on both CUDA ops,
# run the kernel tests (cuda, triton, cpu, reference), the kernel roofline (bench/roofline.py:
# time and % of the copy bandwidth measured in the same run, b = 256 ViT-B shapes) and the
# end-to-end ViT-B/16 step against non-private LoRA and Opacus (bench/bench_step.py). Results land
# in ${OUT:-bench/results}/gpu_check-<date>/ as JSON, logs and device/version info; a summary is
# printed last. Each stage has a time limit so one slow stage cannot eat the lease.
#
# The device machine has its own torch/Triton and no package registry. deer's privacy accounting
# needs opacus (pure Python), which that image lacks: fetch its wheel here first, then carry it:
#   bash bench/gpu_check.sh --fetch-wheels          # here: writes .whl/ (ignored by git)
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# QUICK=1 uses the --quick shapes; STAGES="build tests roofline step" picks stages (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  PIPPY=.venv/bin/python; [ -x "$PIPPY" ] || PIPPY=python3
  opacus_v="$(grep -E '^opacus==' constraints.txt | cut -d= -f3)"
  "$PIPPY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "opacus==${opacus_v}"
  ls -l .whl
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${STAGES:-build sanitize tests roofline step}
DEST="${OUT:-bench/results}/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$DEST"
QUICK_FLAG=""
CASES='^cuda-base-b(64|256)-img224-r8-qkv-[AB]-(nonprivate|deer\[cuda\]|opacus_hooks)-[a-z]+$|^cuda-base-b256-img224-r8-qkv-B-deer\[cuda\]-isotropic-fused$'
if [ "${QUICK:-0}" = "1" ]; then QUICK_FLAG="--quick"; CASES='^cuda-'; fi
export PY DEST
status=0
summary=()
stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, log to $DEST/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if [ "$(type -t "$1")" = function ]; then  # timeout runs programs: hand a function to a child bash
    timeout "$limit" bash -c "$(declare -f "$1"); $1" > "$DEST/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$DEST/$name.log" 2>&1
  fi
  local rc=$?
  summary+=("$name: rc=$rc in $((SECONDS - t0))s")
  tail -15 "$DEST/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi || true; "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true; nvcc --version | tail -2 || true; git rev-parse HEAD || true; } \
  > "$DEST/device.txt" 2>&1
tail -8 "$DEST/device.txt"

build() {
  DEER_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$PY" setup.py build_ext --inplace &&
    "$PY" -c "import deer._C as C; b = C.compiled_backends(); print('compiled backends:', b); assert 'cuda' in b"
}
stage build 400 build || { printf '%s\n' "${summary[@]}"; exit 1; }

# compute-sanitizer (memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
# hazards) on one call of each CUDA op at odd shapes, and a grouped release with fused AdamW / SGD steps.
sanitize() {
  local py='import torch, deer.ops as o
for (b,T,p,q) in [(3,97,2304,8),(2,33,8,129),(2,5,37,64)]:
    L=torch.randn(b,T,p,device="cuda"); R=torch.randn(b,T,q,device="cuda"); K=torch.eye(q,device="cuda")*2
    o.per_sample_grad_norm(L,R,0.5,K,1,backend="cuda")
    g,_=o.per_sample_grad_norm(L,R,0.5,None,1,backend="cuda")
    o.clip_reduce_noise(g,torch.rand(b,device="cuda"),1.0,4.0,torch.linalg.cholesky(K).mT.contiguous(),1,1,2,3,4,backend="cuda")
    W=[torch.nn.Parameter(torch.zeros(p,q,device="cuda")) for _ in range(8)]  # 8 layers: the grouped kernel
    opt=torch.optim.AdamW(W[:4]); sgd=torch.optim.SGD(W[4:],lr=0.1,momentum=0.9)
    o.clip_reduce_noise_grouped([g]*8,[torch.rand(b,device="cuda")]*8,1.0,4.0,None,1,1,2,list(range(8)),4,backend="cuda",
        updates=[o.FusedUpdate.from_optimizer(opt if k<4 else sgd,W[k]) for k in range(8)])
torch.cuda.synchronize(); print("sanitized calls done")'
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "$py" &&
    compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -c "$py"
}
stage sanitize 180 sanitize

stage tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_per_sample_grad_norm.py \
  tests/test_per_sample_grad_norm_triton.py tests/test_clip_reduce_noise.py tests/test_clip_reduce_noise_triton.py \
  tests/test_clip_reduce_noise_update.py tests/test_ops_dispatch.py --junitxml="$DEST/tests.xml"

stage roofline 180 "$PY" -m bench.roofline --device cuda $QUICK_FLAG --out "$DEST"

# ViT-B/16 (224 px, LoRA r = 8 on qkv) at batch 64 and 256, both phases: non-private LoRA, deer's
# CUDA kernels (isotropic and regulated), Opacus hooks; paired overheads and peak memory per row.
stage step 420 env DEER_BENCH_ROUNDS="${DEER_BENCH_ROUNDS:-5}" \
  DEER_BENCH_CASES="${DEER_BENCH_CASES:-$CASES}" \
  "$PY" -m pytest -q -p no:cacheprovider bench/bench_step.py $QUICK_FLAG --benchmark-json="$DEST/bench_step.json"

echo "== summary (results in $DEST)"
printf '%s\n' "${summary[@]}"
[ -f "$DEST/roofline.md" ] && tail -n +3 "$DEST/roofline.md" | head -40
exit $status
