"""Kernel time against the memory roofline, per backend, at the issue's shapes: ViT-B (T = 197,
n = 768, m = 768 / 2304, r = 8) at b = 256 on a GPU (b = 32 on the CPU).

Both ops are memory-bound (per_sample_grad_norm does 2 T p q flops per sample on T (p + q) inputs:
about 2 r flops per input element, far under any chip's flops-per-byte), so the floor is the fewest
bytes each must move over the bandwidth measured in the same run:
  per_sample_grad_norm  reads L (b, T, p) and R (b, T, q) once in their dtype, writes the gradients
                        (b, p, q) and the norms (b,) in fp32.           B phase: L = G (p = m), R = U (q = r)
                                                                        A phase: L = V (p = r), R = X (q = n)
  clip_reduce_noise     reads g (b, p, q) fp32 and clip (b,), writes (p, q) fp32 (the noise is generated).
Ceiling: a device-to-device copy of a buffer far larger than the cache (bytes read + bytes written),
the median of several, in this run. Times: CUDA events around each call (host clock on the CPU), the
median over rounds, rotating among input sets that together exceed the L2 so no call is served from
cache. Baselines run on the same inputs: the reference (einsum in PyTorch ops) and what Opacus does
for the layer (einsum per-sample gradients, per-parameter norm; clipped sum + torch.normal noise).

    python -m bench.roofline [--device cuda|cpu] [--quick] [--out DIR]

Writes DIR/roofline.json (one row per op/shape/dtype/method, plus the device, versions and the
ceiling) and DIR/roofline.md (the table printed last).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch

from bench.bench_per_sample_grad_norm import _opacus as _opacus_psgn
from deer.ops import (available_backends, clip_reduce_noise, clip_reduce_noise_reference,
                      per_sample_grad_norm, per_sample_grad_norm_reference)

DATASHEET_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def _timer(device: str):
    """fn -> seconds of one call, synchronised; CUDA events on a GPU."""
    if device == "cuda":
        def t(fn):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3
    else:
        def t(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return t


def measure(fns, device: str, rounds: int, warmup: int = 2) -> tuple[float, float]:
    """Median and min seconds per call, cycling through `fns` (one closure per input set)."""
    timer = _timer(device)
    for k in range(warmup * len(fns)):
        fns[k % len(fns)]()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = [timer(fns[k % len(fns)]) for k in range(rounds)]
    return statistics.median(ts), min(ts)


def copy_bandwidth(device: str, nbytes: int, rounds: int) -> float:
    """GB/s of dst.copy_(src), counting bytes read + written."""
    n = nbytes // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    med, _ = measure([lambda: dst.copy_(src)], device, rounds)
    del src, dst
    return 2 * nbytes / med / 1e9


def psgn_bytes(b, T, p, q, elt) -> int:
    return b * T * (p + q) * elt + b * p * q * 4 + b * 4


def crn_bytes(b, p, q) -> int:
    return b * p * q * 4 + b * 4 + p * q * 4


def _opacus_crn(g, clip, sigma, ebs):
    s = torch.einsum("i,i...->...", clip, g)
    return (s + torch.normal(0.0, sigma, s.shape, device=s.device, dtype=s.dtype)) / ebs


def run(device: str, quick: bool, rounds: int) -> tuple[dict, list[dict]]:
    torch.manual_seed(0)
    if quick:
        b, T, n, ms, r = 4, 17, 96, (96, 288), 8
    else:
        b, T, n, ms, r = (256 if device == "cuda" else 32), 197, 768, (768, 2304), 8
    backends = [x for x in available_backends(device, "per_sample_grad_norm") if x != "reference"]
    if device == "cpu":
        backends = [x for x in backends if x != "triton"]     # the interpreter is not a benchmark target
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    # Input sets per case so that together they exceed the cache (60 MB L2 on an H200).
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 64 << 20
    env = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else
           (platform.processor() or platform.machine()), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "b": b, "T": T, "n": n,
           "r": r, "rounds": rounds, "l2_bytes": l2}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    env["copy_gbps"] = copy_bandwidth(device, (256 << 20) if quick else (2 << 30), max(rounds, 10))
    env["datasheet_gbps"] = next((v for k, v in DATASHEET_GBPS.items() if k in env["device_name"]), None)
    rows = []

    def add(op, shape, dtype, method, nbytes, med, mn):
        gbps = nbytes / med / 1e9
        rows.append(dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), method=method, bytes=nbytes,
                         median_us=med * 1e6, min_us=mn * 1e6, gbps=gbps, pct_copy=100 * gbps / env["copy_gbps"],
                         pct_datasheet=(100 * gbps / env["datasheet_gbps"]) if env["datasheet_gbps"] else None))
        print(f"  {op:22s} {shape:26s} {rows[-1]['dtype']:9s} {method:28s} {med * 1e6:10.1f} us "
              f"{gbps:8.1f} GB/s {rows[-1]['pct_copy']:5.1f}% of copy", flush=True)

    for dtype in dtypes:
        elt = torch.tensor([], dtype=dtype).element_size()
        for phase, m in (("B", ms[0]), ("B", ms[1]), ("A", ms[0])):
            p, q = (m, r) if phase == "B" else (r, n)
            shape = f"{phase} b{b} T{T} p{p} q{q}"
            nbytes = psgn_bytes(b, T, p, q, elt)
            sets = max(2, -(-3 * l2 // (b * T * (p + q) * elt)))
            sets = min(sets, 4)
            data = [(torch.randn(b, T, p, device=device).to(dtype), torch.randn(b, T, q, device=device).to(dtype))
                    for _ in range(sets)]
            # (name, fn, environment while it runs): the CUDA backend twice, its rank <= 8 kernels
            # (thin, the default) and the shared-memory tile kernel (DEER_CUDA_PSGN_KERNEL=tile).
            # Regulated metric: K (r x r) on the rank side, as deer's engine passes it.
            side = 1 if phase == "B" else 0
            A = torch.randn(r, r, device=device)
            K = A @ A.T + torch.eye(r, device=device)
            methods = []
            for bk in backends:
                fn = (lambda L, R, bk=bk: per_sample_grad_norm(L, R, 2.0, None, 1, backend=bk))
                fn_k = (lambda L, R, bk=bk: per_sample_grad_norm(L, R, 2.0, K, side, backend=bk))
                methods.append((f"deer[{bk}]", fn, {}))
                methods.append((f"deer[{bk}] regulated metric", fn_k, {}))
                if bk == "cuda":
                    methods.append(("deer[cuda] tile kernel", fn, {"DEER_CUDA_PSGN_KERNEL": "tile"}))
                    methods.append(("deer[cuda] tile kernel, regulated metric", fn_k,
                                    {"DEER_CUDA_PSGN_KERNEL": "tile"}))
            methods.append(("reference (PyTorch ops)", lambda L, R: per_sample_grad_norm_reference(L, R, 2.0), {}))
            methods.append(("opacus-style einsum + norm", lambda L, R: _opacus_psgn(L, R, 2.0, None, 1), {}))
            for name, fn, env_vars in methods:
                saved = {k: os.environ.get(k) for k in env_vars}
                os.environ.update(env_vars)
                try:
                    med, mn = measure([lambda L=L, R=R, fn=fn: fn(L, R) for L, R in data], device, rounds)
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                add("per_sample_grad_norm", shape, dtype, name, nbytes, med, mn)
            del data
    # clip_reduce_noise on the per-sample gradients (fp32, as per_sample_grad_norm writes them).
    for phase, m in (("B", ms[1]), ("A", ms[0])):
        p, q = (m, r) if phase == "B" else (r, n)
        shape = f"{phase} b{b} p{p} q{q}"
        nbytes = crn_bytes(b, p, q)
        sets = min(4, max(2, -(-3 * l2 // (b * p * q * 4))))
        data = [(torch.randn(b, p, q, device=device), torch.rand(b, device=device)) for _ in range(sets)]
        A = torch.randn(r, r, device=device, dtype=torch.float64)
        chol = torch.linalg.cholesky(A @ A.T + torch.eye(r, device=device, dtype=torch.float64)).mT.contiguous()
        side = 1 if phase == "B" else 0
        methods = {}
        for bk in [x for x in available_backends(device, "clip_reduce_noise") if x in backends]:
            methods[f"deer[{bk}] isotropic"] = lambda g, c, bk=bk: clip_reduce_noise(g, c, 1.0, b, None, side, 7, 1, 2,
                                                                                     0, backend=bk)
            methods[f"deer[{bk}] regulated"] = lambda g, c, bk=bk: clip_reduce_noise(g, c, 1.0, b, chol, side, 7, 1,
                                                                                     2, 0, backend=bk)
        methods["reference (PyTorch ops) isotropic"] = lambda g, c: clip_reduce_noise_reference(g, c, 1.0, b, None,
                                                                                               side, 7, 1, 2, 0)
        methods["opacus-style sum + torch.normal"] = lambda g, c: _opacus_crn(g, c, 1.0, b)
        for name, fn in methods.items():
            med, mn = measure([lambda g=g, c=c, fn=fn: fn(g, c) for g, c in data], device, rounds)
            add("clip_reduce_noise", shape, torch.float32, name, nbytes, med, mn)
        del data
    return env, rows


def markdown(env: dict, rows: list[dict]) -> str:
    ds = f"{env['datasheet_gbps']:.0f} GB/s datasheet; " if env["datasheet_gbps"] else ""
    out = [f"Roofline on {env['device_name']} ({env['date']}; torch {env['torch']}, triton {env['triton']}): "
           f"copy ceiling {env['copy_gbps']:.0f} GB/s measured ({ds}read + write), median of {env['rounds']} "
           f"calls, b = {env['b']}, T = {env['T']}.", "",
           "| op | shape | dtype | method | median us | GB/s | % of copy |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['method']} | {r['median_us']:.1f} | "
                   f"{r['gbps']:.0f} | {r['pct_copy']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run of this script)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "build"))
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("roofline: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    rounds = a.rounds or (5 if a.quick else (50 if a.device == "cuda" else 7))
    env, rows = run(a.device, a.quick, rounds)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "roofline.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    md = markdown(env, rows)
    with open(os.path.join(a.out, "roofline.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
