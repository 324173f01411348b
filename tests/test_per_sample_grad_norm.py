"""per_sample_grad_norm (and per_sample_grad_norm_only) on every available backend against the
float64 reference, on fresh random inputs with odd sizes (seed in every assertion message)."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deer.ops import (BackendUnavailable, per_sample_grad_norm, per_sample_grad_norm_only,
                      per_sample_grad_norm_reference, unavailable_reason)
from deer.ops.per_sample_grad_norm import ghost_pays

OP = "per_sample_grad_norm"


def _backends():
    out = ["reference"]
    if unavailable_reason("cpu", "cpu", OP) is None:
        out.append("cpu")
    if importlib.util.find_spec(f"deer_kernels.{OP}") is not None and (
            torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    for variant in ("cuda", "cuda-tile"):
        out.append(pytest.param(variant, marks=[pytest.mark.cuda, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA device")]))
    return out


@pytest.fixture
def backend(request, monkeypatch):
    """The backend under test; 'cuda-tile' is the CUDA backend with its rank <= 8 shapes sent to the
    shared-memory tile kernel (DEER_CUDA_PSGN_KERNEL=tile) instead of the default thin kernel, so a
    GPU run tests both."""
    if request.param == "cuda-tile":
        monkeypatch.setenv("DEER_CUDA_PSGN_KERNEL", "tile")
        return "cuda"
    return request.param


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_if_unavailable(backend):
    why = unavailable_reason(backend, _device(backend), OP)
    if why:
        pytest.skip(why)


def _metrics(p, q, gen):
    """Euclidean plus K on each side that is a LoRA rank (<= 128): the regulated metric's K is r x r."""
    out = [(None, 1)]
    if q <= 128:
        out.append((_spd(q, gen), 1))
    if p <= 128:
        out.append((_spd(p, gen), 0))
    return out


def _rel(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _spd(k, gen):
    A = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return A @ A.T + 0.1 * torch.eye(k, dtype=torch.float64)


# (b, T, p, q): T = 1 and 97, ranks 1/4/8/64 on either side (B phase q = r, A phase p = r), batch 1 and 33.
SHAPES = [(1, 1, 5, 1), (33, 97, 17, 4), (3, 97, 40, 8), (2, 7, 64, 64), (33, 1, 8, 30), (1, 97, 1, 23),
          # ranks 2 and 16 (fixed-size Gram loops of the column metric), a ViT-tiny qkv layer (T = 17)
          (5, 3, 40, 2), (2, 9, 23, 16), (4, 17, 576, 8)]
BIG = [(2, 3, 2304, 8), (2, 5, 8, 768)]  # ViT-B qkv (m = 2304) B phase, n = 768 A phase


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("shape", SHAPES + BIG)
def test_fp32_matches_float64_reference(backend, shape, gen):
    _skip_if_unavailable(backend)
    b, T, p, q = shape
    if backend == "triton" and not torch.cuda.is_available() and p * q * T * b > 200_000:
        pytest.skip("interpreted Triton: large shapes are covered on a GPU")
    dev = _device(backend)
    L = torch.randn(b, T, p, generator=gen, dtype=torch.float64)
    R = torch.randn(b, T, q, generator=gen, dtype=torch.float64)
    scale = 0.37
    for gram, side in _metrics(p, q, gen):
        g0, n0 = per_sample_grad_norm_reference(L, R, scale, gram, side)
        g, n = per_sample_grad_norm(L.float().to(dev), R.float().to(dev), scale,
                                    None if gram is None else gram.float().to(dev), side, backend=backend)
        assert g.shape == (b, p, q) and n.shape == (b,)
        assert g.dtype == torch.float32 and n.dtype == torch.float32
        msg = f"seed {gen.initial_seed()} shape {shape} gram_side {side if gram is not None else None}"
        assert _rel(g, g0) <= 1e-5, msg
        assert _rel(n, n0) <= 1e-5, msg


@pytest.mark.parametrize("backend", _backends(), indirect=True)
def test_fp64_is_exact_to_rounding(backend, gen):
    _skip_if_unavailable(backend)
    if backend == "triton":
        pytest.skip("the Triton kernels accumulate in fp32")
    dev = _device(backend)
    L = torch.randn(5, 11, 19, generator=gen, dtype=torch.float64)
    R = torch.randn(5, 11, 3, generator=gen, dtype=torch.float64)
    K = _spd(3, gen)
    g0, n0 = per_sample_grad_norm_reference(L, R, 1.3, K, 1)
    g, n = per_sample_grad_norm(L.to(dev), R.to(dev), 1.3, K.to(dev), 1, backend=backend)
    assert g.dtype == torch.float64
    assert _rel(g, g0) <= 1e-12 and _rel(n, n0) <= 1e-12, f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(33, 97, 17, 4), (3, 1, 8, 129)])
def test_low_precision_within_twice_reference_error(backend, dtype, shape, gen):
    """Inputs rounded to fp16/bf16; truth = float64 math on those rounded inputs. The kernel must be
    no worse than 2x the error of the same formula run in that dtype with PyTorch ops."""
    _skip_if_unavailable(backend)
    dev = _device(backend)
    b, T, p, q = shape
    L = torch.randn(b, T, p, generator=gen).to(dtype)
    R = torch.randn(b, T, q, generator=gen).to(dtype)
    side = 1 if q <= p else 0                                        # K on the rank side
    # Truth sees K rounded to `dtype` exactly as the kernel and the low-precision formula do, so the
    # comparison measures arithmetic error only (an unrounded K made the bound a coin toss: CI saw
    # the kernel's fp32-accumulated norm at 1.7e-4 vs a lucky 6.5e-5 for fp16 einsum).
    K = _spd(min(p, q), gen).to(dtype).double()
    g0, n0 = per_sample_grad_norm_reference(L.double(), R.double(), 0.5, K, side)
    g_lp = 0.5 * torch.einsum("btp,btq->bpq", L, R)                  # reference math in `dtype`
    n_lp = (torch.einsum("bpq,qs,bps->b", g_lp, K.to(dtype), g_lp) if side == 1
            else torch.einsum("bpq,ps,bsq->b", g_lp, K.to(dtype), g_lp))
    g, n = per_sample_grad_norm(L.to(dev), R.to(dev), 0.5, K.to(dtype).to(dev), side, backend=backend)
    msg = f"seed {gen.initial_seed()} {dtype}"
    assert _rel(g, g0) <= 2 * _rel(g_lp, g0), msg
    assert _rel(n, n0) <= 2 * _rel(n_lp, n0) + 1e-6, msg


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("method", ["auto", "materialise", "ghost"])
@pytest.mark.parametrize("shape", [(4, 3, 300, 8), (33, 97, 17, 4), (2, 5, 8, 768)])
def test_norm_only_matches_reference(backend, method, shape, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    b, T, p, q = shape
    L = torch.randn(b, T, p, generator=gen, dtype=torch.float64)
    R = torch.randn(b, T, q, generator=gen, dtype=torch.float64)
    for gram, side in _metrics(p, q, gen):
        n0 = per_sample_grad_norm_reference(L, R, 0.8, gram, side)[1]
        for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5 if method != "ghost" else 1e-4)):
            if dt == torch.float64 and backend == "triton":
                continue  # the Triton kernels take fp32/fp16/bf16
            # Ghost norms sum T^2 signed products of token inner products: fp32 cancellation costs a
            # decade against the materialised route, hence the looser fp32 bound for that route.
            n = per_sample_grad_norm_only(L.to(dt).to(dev), R.to(dt).to(dev), 0.8,
                                          None if gram is None else gram.to(dt).to(dev), side, method=method,
                                          backend=backend)
            assert n.shape == (b,)
            assert _rel(n, n0) <= tol, f"seed {gen.initial_seed()} {method} {dt} side {side}"


def test_ghost_cost_rule():
    assert ghost_pays(1, 768, 8)           # 2-D inputs: ghost is T (p + q) work
    assert not ghost_pays(197, 2304, 8)    # ViT-B sequence: materialising is cheaper
    assert not ghost_pays(197, 8, 768)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_2d_inputs_are_one_token(backend, gen):
    _skip_if_unavailable(backend)
    L = torch.randn(6, 10, generator=gen)
    R = torch.randn(6, 3, generator=gen)
    g, n = per_sample_grad_norm(L, R, 2.0, backend=backend)
    want = 2.0 * L.double()[:, :, None] * R.double()[:, None, :]
    assert _rel(g, want) <= 1e-6, f"seed {gen.initial_seed()}"


def test_bad_input_says_what_is_wrong():
    L, R = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises((ValueError, RuntimeError), match="share batch and token"):
        per_sample_grad_norm(L, R, 1.0, backend="cpu")
    with pytest.raises((ValueError, RuntimeError), match=r"gram must be \(5, 5\)"):
        per_sample_grad_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1.0, gram=torch.eye(4), gram_side=1,
                             backend="cpu")
    with pytest.raises(ValueError, match="gram_side"):
        per_sample_grad_norm(L, R, 1.0, gram_side=2)
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_norm_only(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1.0, method="fast")
    with pytest.raises(BackendUnavailable, match="cuda"):
        per_sample_grad_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1.0, backend="cuda") \
            if not torch.cuda.is_available() else (_ for _ in ()).throw(BackendUnavailable("cuda n/a"))


_ISA_CHECK = textwrap.dedent("""
    import sys, torch
    import deer._C as C
    from deer.ops import per_sample_grad_norm, per_sample_grad_norm_reference, clip_reduce_noise_fused
    want, seed = sys.argv[1], int(sys.argv[2])
    print("isa", C.cpu_isa())
    if C.cpu_isa() != want:
        sys.exit(3)                                   # the CPU lacks it: the caller skips
    gen = torch.Generator().manual_seed(seed)
    def spd(k):
        A = torch.randn(k, k, generator=gen, dtype=torch.float64)
        return A @ A.T + 0.1 * torch.eye(k, dtype=torch.float64)
    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
    for b, T, p, q in [(1, 1, 5, 1), (33, 97, 17, 4), (3, 17, 40, 8), (2, 7, 64, 64), (5, 3, 40, 2),
                       (2, 9, 23, 16), (4, 17, 576, 8), (3, 5, 8, 97), (2, 3, 3, 100)]:
        L = torch.randn(b, T, p, generator=gen, dtype=torch.float64)
        R = torch.randn(b, T, q, generator=gen, dtype=torch.float64)
        metrics = [(None, 1)] + ([(spd(q), 1)] if q <= 128 else []) + ([(spd(p), 0)] if p <= 128 else [])
        for K, side in metrics:
            g0, n0 = per_sample_grad_norm_reference(L, R, 0.37, K, side)
            for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
                g, n = per_sample_grad_norm(L.to(dt), R.to(dt), 0.37, None if K is None else K.to(dt), side,
                                            backend="cpu")
                assert rel(g, g0) <= tol and rel(n, n0) <= tol, (want, seed, (b, T, p, q), side, dt)
        c = torch.rand(b, generator=gen, dtype=torch.float64)
        want_sum = torch.einsum("b,bpq->pq", c, 0.37 * torch.einsum("btp,btq->bpq", L, R)) / 3.0
        for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            got = clip_reduce_noise_fused(L.to(dt), R.to(dt), 0.37, c.to(dt), 0.0, 3.0, backend="cpu")
            assert rel(got, want_sum) <= tol, ("fused", want, seed, (b, T, p, q), dt)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_cpu_instruction_set_matches_reference(isa, gen):
    """The tile GEMM and norm loops are compiled once per instruction set and one is picked at load
    time; DEER_CPU_ISA caps the pick, so the narrower builds run here too (in a child process)."""
    if unavailable_reason("cpu", "cpu", OP) is not None:
        pytest.skip(unavailable_reason("cpu", "cpu", OP))
    seed = gen.initial_seed()
    env = dict(os.environ, DEER_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ISA_CHECK, isa, str(seed)], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip(f"this CPU has no {isa} ({r.stdout.strip()})")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"seed {seed}\n{r.stdout}\n{r.stderr}"
