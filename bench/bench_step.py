"""End-to-end private LoRA training step: deer vs Opacus vs non-private LoRA (deer's layer and peft's).

One case = one full step (forward, backward, per-sample clipping, noise, optimizer step) of a timm ViT
with LoRA on the attention qkv projection (or qkv + proj + MLP), or of a decoder LM (tiny Llama,
GPT-2-shaped) with LoRA on the attention projections and the causal LM loss on right-padded
sequences, timed by pytest-benchmark, with its peak memory and a machine-readable row in
`extra_info`. Every configuration has two non-private floors: deer's LoRA layer and peft's.
Methods and how each is built: bench/models.py.

    pytest bench/bench_step.py --benchmark-json=bench/results/step.json         # default sweep
    DEER_BENCH_QUICK=1 pytest bench/bench_step.py --benchmark-json=/tmp/q.json  # smoke (< 60 s)
    python -m bench.report bench/results/step.json                               # table + plots

Default CPU sweep (2-core friendly): ViT-tiny, batch 32, image 64 (17 tokens), rank 8, LoRA on qkv as
the centre, both phases; then one knob at a time: model small, batch 8/16/64, image 32/128, rank 4/32,
LoRA on every Linear of the blocks; then the decoders, tiny Llama and GPT-2-shaped at (batch, tokens) =
(16, 128) and (8, 512), rank 8, phase B. After its own rounds every case runs up to 5 more,
interleaved with the non-private step of its configuration (`paired_overhead` in its row: the
median per-pair time ratio - 1, which a shared machine's drifting load barely moves). CUDA (when present): ViT-B/16 at 224 px, batch 64/128/256, plus
tiny/small at batch 32, every deer backend available. At the centre configurations (and CUDA batch 256)
deer also runs with the fused optimizer step (make_private(fused_update=True), id suffix '-fused').
glibc's malloc keeps freed memory for reuse during the run (bench/memory.py: keep_freed_memory;
DEER_BENCH_MALLOC=default turns that off). DEER_BENCH_ROUNDS sets the timed rounds per
case (default 7 on CPU, 20 on CUDA), DEER_BENCH_PAIRS the paired rounds (default 5),
DEER_BENCH_THREADS torch's intra-op threads; each case's 1-minute
load average is recorded (shared machines); DEER_BENCH_CASES (a regular expression on the case id)
runs a subset. `--quick` (or DEER_BENCH_QUICK=1): a 2-block
ViT-tiny at 32 px, batch 8, and 1-layer decoders on 4 sequences of 16 tokens, every method/backend once; it checks every case runs and writes its
row, and asserts nothing about speed.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import warnings

from dataclasses import replace

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `bench` is imported as a package from the repository root
    sys.path.insert(0, _ROOT)

from bench.memory import malloc_state, peak_memory
from bench.models import Case, build_step, device_name

CPU_CENTER = dict(model="tiny", batch=32, img=64, rank=8, targets="qkv")
CUDA_CENTER = dict(model="base", batch=64, img=224, rank=8, targets="qkv")
QUICK = dict(model="tiny", depth=2, batch=8, img=32, rank=4, targets="qkv")
# Decoder LMs (CPU): tiny Llama and a GPT-2-shaped model, LoRA r = 8 on the attention projections,
# (batch, tokens) = (16, 128) and (8, 512); quick: 1 layer, 4 sequences of 16 tokens.
DECODERS = [dict(arch=a, model="tiny", img=0, rank=8, targets="attn", batch=b, seq=t)
            for a in ("llama", "gpt2") for b, t in ((16, 128), (8, 512))]
QUICK_DECODERS = [dict(arch=a, model="tiny", depth=1, img=0, rank=4, targets="attn", batch=4, seq=16)
                  for a in ("llama", "gpt2")]


def _quick(config) -> bool:
    try:
        flag = bool(config.getoption("--quick", default=False))
    except ValueError:
        flag = False
    return flag or os.environ.get("DEER_BENCH_QUICK", "0") == "1"


def _deer_backends(device: str) -> list[str]:
    from deer.ops import available_backends
    bs = available_backends(device)
    if device == "cpu":
        # Triton on the CPU runs through the interpreter (TRITON_INTERPRET=1): a correctness tool,
        # orders of magnitude slower, not a benchmark target.
        bs = [b for b in bs if b != "triton"]
    return bs


def _methods(device: str, backends: list[str], fused: bool = False) -> list[dict]:
    """Every compared method for one configuration (fused: also deer with the fused optimizer step,
    isotropic noise, on the compiled / Triton backends)."""
    out = [dict(method="nonprivate", noise="none"), dict(method="peft", noise="none")]
    for b in backends:
        for noise in ("isotropic", "regulated"):
            out.append(dict(method="deer", backend=b, noise=noise))
        if fused and b != "reference":
            out.append(dict(method="deer", backend=b, noise="isotropic", fused=True))
    out += [dict(method="opacus_hooks", noise="isotropic"), dict(method="opacus_ghost", noise="isotropic"),
            dict(method="deer_on_opacus", noise="paper")]
    return out


def _with(center: dict, **kw) -> dict:
    d = dict(center)
    d.update(kw)
    return d


def cases_for(device: str, quick: bool) -> list[Case]:
    backends = _deer_backends(device)
    fast_backends = [b for b in backends if b != "reference"]  # the knob sweeps use compiled kernels only
    if not fast_backends:
        fast_backends = backends
    cases: list[Case] = []

    def add(cfg: dict, phases=("B",), backs=None, fused=False):
        for phase in phases:
            for m in _methods(device, backs if backs is not None else fast_backends, fused):
                cases.append(Case(device=device, phase=phase, **cfg, **m))

    if quick:
        add(QUICK, phases=("A", "B"), backs=backends, fused=True)
        for d in QUICK_DECODERS:
            add(d, backs=backends)
        return cases
    if device == "cpu":
        c = CPU_CENTER
        add(c, phases=("A", "B"), backs=backends, fused=True)
        add(_with(c, model="small"), phases=("A", "B"))
        for b in (8, 16, 64):
            add(_with(c, batch=b))
        for img in (32, 128):
            add(_with(c, img=img))
        for r in (4, 32):
            add(_with(c, rank=r))
        add(_with(c, targets="all"))
        for d in DECODERS:
            add(d)
    else:
        c = CUDA_CENTER
        add(c, phases=("A", "B"), backs=backends, fused=True)
        for b in (128, 256):
            add(_with(c, batch=b), fused=b == 256)
        for r in (4, 32):
            add(_with(c, rank=r))
        add(_with(c, targets="all"))
        add(_with(c, img=384, batch=32))
        for model in ("tiny", "small"):
            add(_with(c, model=model, batch=32))
            add(_with(c, model=model, batch=256))
    return cases


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    quick = _quick(metafunc.config)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = [c for d in devices for c in cases_for(d, quick)]
    # DEER_BENCH_CASES: a regular expression on the case id (e.g. '^cuda-base-b256-') to run a subset,
    # as bench/gpu_check.sh does to fit a device lease.
    pattern = os.environ.get("DEER_BENCH_CASES")
    if pattern:
        import re
        cases = [c for c in cases if re.search(pattern, c.id())]
    metafunc.parametrize("case", cases, ids=[c.id() for c in cases])


def environment_row(device: str) -> dict:
    import opacus
    import peft
    import timm
    import transformers

    import deer
    return {
        "device_name": device_name(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "opacus": opacus.__version__, "timm": timm.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__,
        "malloc": malloc_state(),
        "deer": getattr(deer, "__version__", "unknown"), "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


_WARMED: set[str] = set()

# The non-private step of the configuration being measured (built once per configuration, outside
# every case's memory measurement): each case's rounds are interleaved with rounds of it, so the
# overhead compares the two under the same load (a shared machine's load drifts between cases).
_FLOOR: dict = {}


def _floor_step(case: Case):
    key = replace(case, method="nonprivate", noise="none", backend="-")
    if case.method == "nonprivate":
        return None
    if _FLOOR.get("key") != key:
        _FLOOR.clear()
        step, _ = build_step(key)
        run = _synced(step, case.device)
        run()
        run()
        _FLOOR.update(key=key, run=run)
    return _FLOOR["run"]


def paired_overhead(run, floor, rounds: int) -> dict:
    """Alternates `rounds` steps of the case and of the non-private floor (order flipped every round)
    and returns the median and min of the per-pair ratio case / floor, minus 1."""
    import statistics
    import time
    ratios = []
    for k in range(rounds):
        t = {}
        for name, fn in ((("case", run), ("floor", floor)) if k % 2 == 0 else (("floor", floor), ("case", run))):
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        ratios.append(t["case"] / t["floor"])
    return {"paired_overhead": statistics.median(ratios) - 1, "paired_overhead_min": min(ratios) - 1,
            "paired_rounds": rounds}


def _warm_up(device: str) -> None:
    """Run every method once on a tiny case before the first measurement in this process: lazy
    imports, thread pools and first-call allocations otherwise land in the first case's time and
    peak memory."""
    if device in _WARMED:
        return
    for cfg in [QUICK] + QUICK_DECODERS:
        for m in _methods(device, _deer_backends(device)[:1]):
            step, _ = build_step(Case(device=device, phase="B", **cfg, **m))
            step()
    _WARMED.add(device)


def _synced(step, device: str):
    if device.startswith("cuda"):
        def run():
            step()
            torch.cuda.synchronize()
        return run
    return step


def test_step(benchmark, case: Case, request):
    quick = _quick(request.config)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not quick:
        _warm_up(case.device)
    floor = _floor_step(case)
    with peak_memory(case.device) as pm:
        step, info = build_step(case)
        run = _synced(step, case.device)
        run()          # first step: lazy state (optimizer buffers, Opacus hooks) is created here
        if not quick:
            run()
    benchmark.group = case.config_id()
    benchmark.extra_info.update(case.as_row())
    benchmark.extra_info.update(environment_row(case.device))
    benchmark.extra_info.update({"impl": info["impl"], "peak_mem_bytes": pm.bytes, "peak_mem_kind": pm.kind,
                                 "quick": quick, "loadavg_1min": os.getloadavg()[0]})
    rounds = 1 if quick else int(os.environ.get("DEER_BENCH_ROUNDS", 7 if case.device == "cpu" else 20))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0 if quick else 1, iterations=1)
    if floor is not None:
        # 5 pairs by default (the default sweep stays under 20 minutes on 2 cores); DEER_BENCH_PAIRS
        # sets more for a focused rerun of a few configurations
        pairs = int(os.environ.get("DEER_BENCH_PAIRS", min(rounds, 5)))
        benchmark.extra_info.update(paired_overhead(run, floor, pairs))
    # The step really trained: every trained parameter is finite (a NaN would void the timing).
    for p in info["params"]:
        assert torch.isfinite(p).all(), f"{case.id()}: non-finite parameter after the step"
    assert benchmark.extra_info["method"] == case.method
