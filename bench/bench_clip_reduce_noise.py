"""The DP part of one LoRA layer's backward on the CPU: deer's kernels against (a) the float64-capable
reference in PyTorch ops, (b) what Opacus does for the same layer and (c) the paper's regulated noise.

    pytest bench/bench_clip_reduce_noise.py [--quick] [--benchmark-json=bench/results/crn.json]

Shapes: ViT-B (b = 32, T = 197, n = 768, m = 768 and 2304 (qkv), r = 8); --quick shrinks them.
Inputs are what a LoRA layer's backward already holds (X, U = X A^T, G = dL/dY, V = G B): no method
is charged for them. Every method outputs the noisy clipped mean gradient of the trained factor(s).

deer (phase B trains B, phase A trains A; 'AB' = both, the FedAvg-LoRA baseline):
    per_sample_grad_norm (grads + norms in one pass) -> clip factors -> clip_reduce_noise
    deer-fused: per_sample_grad_norm_only -> clip factors -> clip_reduce_noise_fused (no per-sample grads)
Opacus-style (what opacus.GradSampleModule + DPOptimizer do for a Linear A and a Linear B): einsum
    per-sample gradients per trainable Linear, per-parameter norms stacked into the flat norm, clip
    factors, einsum("i,i...") clipped sum, torch.normal noise, / expected batch size; plus the summed
    gradient that autograd computes for every trainable parameter under Opacus' hooks.
Paper regulated noise: a full m x n Gaussian draw mapped through the frozen factor's pseudo-inverse
    (B phase xi = N A^T (A A^T)^{-1}) against deer's r-dimensional draw + triangular solve, both with
    the same clipped sum.
Whole-model release (12 ViT-B qkv B factors): clip_reduce_noise_grouped against one call per layer,
and the fused optimizer step (AdamW, SGD-momentum) against writing .grad and calling optimizer.step().
Targets: deer >= 2x faster than Opacus-style (isotropic noise) and >= 10x faster than the paper's
regulated noise. Group summary at the end of the run: baseline median / deer median.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.conftest import machine_row
from deer.ops import (clip_reduce_noise, clip_reduce_noise_fused, clip_reduce_noise_reference,
                      per_sample_grad_norm, per_sample_grad_norm_only, per_sample_grad_norm_reference)

C, SIGMA, EPS = 1.0, 1.1, 1e-6


def _shapes(quick):
    if quick:
        return dict(b=4, T=17, n=96, ms=(96, 288), r=8, rounds=3)
    return dict(b=32, T=197, n=768, ms=(768, 2304), r=8, rounds=15)


class Layer:
    def __init__(self, b, T, n, m, r, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.b, self.T, self.n, self.m, self.r = b, T, n, m, r
        self.s = 2.0
        self.X = torch.randn(b, T, n, generator=g)
        self.G = torch.randn(b, T, m, generator=g) / math.sqrt(T * m)
        self.A = torch.randn(r, n, generator=g) / math.sqrt(n)
        self.B = torch.randn(m, r, generator=g) / math.sqrt(r)
        self.U = self.X @ self.A.T                      # kept from the forward pass
        self.V = self.G @ self.B                        # computed by the backward anyway
        lam = 1e-3
        self.K_B = self.A @ self.A.T + lam * torch.eye(r)   # metric / noise of the B phase
        self.K_A = self.B.T @ self.B + lam * torch.eye(r)
        self.R_B = torch.linalg.cholesky(self.K_B).mT.contiguous()
        self.R_A = torch.linalg.cholesky(self.K_A).mT.contiguous()

    def factors(self, phase):
        """(left, right, chol, noise_side) of the trained factor(s)."""
        out = []
        if "B" in phase:
            out.append((self.G, self.U, self.R_B, 1))
        if "A" in phase:
            out.append((self.V, self.X, self.R_A, 0))
        return out


def deer_step(layer, phase, regulated=False, step=0):
    fs = layer.factors(phase)
    gn = [per_sample_grad_norm(L, R, layer.s) for L, R, _, _ in fs]
    total = sum(n for _, n in gn)
    clip = (C / (total.sqrt() + EPS)).clamp(max=1.0)
    return [clip_reduce_noise(g, clip, SIGMA * C, layer.b, Rc if regulated else None, side, seed=1, step=step, layer=k)
            for k, ((g, _), (_, _, Rc, side)) in enumerate(zip(gn, fs))]


def deer_fused_step(layer, phase, regulated=False, step=0):
    fs = layer.factors(phase)
    total = sum(per_sample_grad_norm_only(L, R, layer.s) for L, R, _, _ in fs)
    clip = (C / (total.sqrt() + EPS)).clamp(max=1.0)
    return [clip_reduce_noise_fused(L, R, layer.s, clip, SIGMA * C, layer.b, Rc if regulated else None, side,
                                    seed=1, step=step, layer=k) for k, (L, R, Rc, side) in enumerate(fs)]


def reference_step(layer, phase, step=0):
    fs = layer.factors(phase)
    gn = [per_sample_grad_norm_reference(L, R, layer.s) for L, R, _, _ in fs]
    total = sum(n for _, n in gn)
    clip = (C / (total.sqrt() + EPS)).clamp(max=1.0)
    return [clip_reduce_noise_reference(g, clip, SIGMA * C, layer.b, None, side, seed=1, step=step, layer=k)
            for k, ((g, _), (_, _, _, side)) in enumerate(zip(gn, fs))]


def opacus_step(layer, phase):
    """Opacus for lora_A = Linear(n, r) and lora_B = Linear(r, m) inside y += s * B(A(x)).
    Backprops: at B's output s * G; at A's output s * G B = s * V. Activations: X for A, U for B."""
    grads_sample, summed = [], []
    if "B" in phase:
        bp = layer.s * layer.G
        grads_sample.append(torch.einsum("n...i,n...j->nij", bp, layer.U))          # (b, m, r)
        summed.append(bp.reshape(-1, layer.m).T @ layer.U.reshape(-1, layer.r))      # autograd's p.grad
    if "A" in phase:
        bp = layer.s * layer.V
        grads_sample.append(torch.einsum("n...i,n...j->nij", bp, layer.X))          # (b, r, n)
        summed.append(bp.reshape(-1, layer.r).T @ layer.X.reshape(-1, layer.n))
    per_param = torch.stack([gs.reshape(len(gs), -1).norm(2, dim=-1) for gs in grads_sample], dim=1)
    norms = per_param.norm(2, dim=1)
    clip = (C / (norms + EPS)).clamp(max=1.0)
    out = []
    for gs in grads_sample:
        s = torch.einsum("i,i...", clip, gs)
        noise = torch.normal(0.0, SIGMA * C, size=s.shape)
        out.append((s + noise) / layer.b)
    return out, summed


def paper_regulated_step(layer, phase):
    """Clipped sum as deer, noise the paper's way: full (m x n) draw through the pseudo-inverse."""
    fs = layer.factors(phase)
    gn = [per_sample_grad_norm(L, R, layer.s) for L, R, _, _ in fs]
    total = sum(n for _, n in gn)
    clip = (C / (total.sqrt() + EPS)).clamp(max=1.0)
    out = []
    for (g, _), (_, _, _, side) in zip(gn, fs):
        S = torch.einsum("b,bpq->pq", clip, g)
        N = torch.randn(layer.m, layer.n)
        if side == 1:   # B phase: xi = N A^T (A A^T)^{-1}
            xi = torch.linalg.solve(layer.K_B, (N @ layer.A.T).T).T
        else:           # A phase: xi = (B^T B)^{-1} B^T N
            xi = torch.linalg.solve(layer.K_A, layer.B.T @ N)
        out.append((S + SIGMA * C * xi) / layer.b)
    return out


def _layers(quick):
    sh = _shapes(quick)
    return [(m, Layer(sh["b"], sh["T"], sh["n"], m, sh["r"])) for m in sh["ms"]], sh["rounds"]


def _cases():
    return [(m_idx, phase) for m_idx in (0, 1) for phase in ("B", "A", "AB")]


@pytest.fixture(scope="module")
def layers(quick):
    torch.manual_seed(0)
    return _layers(quick)


def _run(benchmark, fn, rounds, group, label, role, **info):
    benchmark.group = group
    benchmark.extra_info.update(machine_row(), role=role, label=label, **info)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


METHODS = {
    "deer": (lambda L, ph: deer_step(L, ph), "deer"),
    "deer-fused": (lambda L, ph: deer_fused_step(L, ph), "deer"),
    "reference (PyTorch ops)": (lambda L, ph: reference_step(L, ph), "baseline"),
    "opacus-style": (lambda L, ph: opacus_step(L, ph), "baseline"),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"m{c[0]}-{c[1]}")
def test_isotropic_dp_step(benchmark, layers, method, case):
    (m, layer), rounds = layers[0][case[0]], layers[1]
    fn, role = METHODS[method]
    _run(benchmark, lambda: fn(layer, case[1]), rounds, f"isotropic m={m} phase {case[1]}", method, role,
         m=m, phase=case[1], b=layer.b, T=layer.T, n=layer.n, r=layer.r)


REG_METHODS = {
    "deer regulated": (lambda L, ph: deer_step(L, ph, regulated=True), "deer"),
    "deer-fused regulated": (lambda L, ph: deer_fused_step(L, ph, regulated=True), "deer"),
    "paper regulated (m x n draw + pinv)": (paper_regulated_step, "baseline"),
}


@pytest.mark.parametrize("method", list(REG_METHODS))
@pytest.mark.parametrize("case", [(i, ph) for i in (0, 1) for ph in ("B", "A")], ids=lambda c: f"m{c[0]}-{c[1]}")
def test_regulated_dp_step(benchmark, layers, method, case):
    (m, layer), rounds = layers[0][case[0]], layers[1]
    fn, role = REG_METHODS[method]
    _run(benchmark, lambda: fn(layer, case[1]), rounds, f"regulated m={m} phase {case[1]}", method, role,
         m=m, phase=case[1], b=layer.b, T=layer.T, n=layer.n, r=layer.r)


def _noise_only_deer(layer, phase):
    # Zero-cost clipped sum (b = 1 sample) so that only the noise is timed.
    out = []
    for _, _, Rc, side in layer.factors(phase):
        shape = (1, layer.m, layer.r) if side == 1 else (1, layer.r, layer.n)
        out.append(clip_reduce_noise(torch.zeros(shape), torch.ones(1), SIGMA * C, layer.b, Rc, side, seed=3))
    return out


def _noise_only_paper(layer, phase):
    out = []
    for _, _, _, side in layer.factors(phase):
        N = torch.randn(layer.m, layer.n)
        out.append(torch.linalg.solve(layer.K_B, (N @ layer.A.T).T).T if side == 1
                   else torch.linalg.solve(layer.K_A, layer.B.T @ N))
    return out


@pytest.mark.parametrize("method", ["deer regulated noise", "paper regulated noise"])
@pytest.mark.parametrize("case", [(i, ph) for i in (0, 1) for ph in ("B", "A")], ids=lambda c: f"m{c[0]}-{c[1]}")
def test_regulated_noise_only(benchmark, layers, method, case):
    (m, layer), rounds = layers[0][case[0]], layers[1]
    fn = _noise_only_deer if method.startswith("deer") else _noise_only_paper
    _run(benchmark, lambda: fn(layer, case[1]), rounds, f"noise only m={m} phase {case[1]}", method,
         "deer" if method.startswith("deer") else "baseline", m=m, phase=case[1])


def test_methods_agree_without_noise(layers):
    """The benchmarked routes compute the same clipped sum (checked once, noise off, float64)."""
    (m, layer) = layers[0][0]
    for phase in ("B", "A"):
        L, R, _, side = layer.factors(phase)[0]
        g, n = per_sample_grad_norm(L.double(), R.double(), layer.s)
        clip = (C / (n.sqrt() + EPS)).clamp(max=1.0)
        a = clip_reduce_noise(g, clip, 0.0, layer.b)
        bf = clip_reduce_noise_fused(L.double(), R.double(), layer.s, clip, 0.0, layer.b)
        gs = torch.einsum("n...i,n...j->nij", layer.s * L.double(), R.double())
        c = torch.einsum("i,i...", clip, gs) / layer.b
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(bf, c)


def _model_release_inputs(quick):
    """Per-sample gradients, clip factors and a shared Cholesky factor of the B phase of a 12-block
    ViT-B/16-like model's qkv LoRA layers (3 blocks with --quick)."""
    sh = _shapes(quick)
    L, b, m, r = (3 if quick else 12), sh["b"], sh["ms"][1], sh["r"]
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(b, m, r, generator=g) for _ in range(L)]
    clips = [torch.rand(b, generator=g) for _ in range(L)]
    A = torch.randn(r, r, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(A @ A.T + torch.eye(r, dtype=torch.float64)).mT.contiguous().float()
    return L, b, m, r, grads, clips, chol


@pytest.mark.parametrize("method", ["deer grouped", "deer one call per layer"])
def test_grouped_model_release(benchmark, quick, method):
    """The release of every trained factor of a 12-block ViT-B/16-like model in the B phase (qkv:
    m = 2304, r = 8; b = 32 per-sample gradients, regulated noise): clip_reduce_noise_grouped against
    one clip_reduce_noise call per layer (the same outputs; see tests/test_clip_reduce_noise.py)."""
    from deer.ops import clip_reduce_noise_grouped
    sh = _shapes(quick)
    L, b, m, r, grads, clips, chol = _model_release_inputs(quick)
    if method == "deer grouped":
        fn = lambda: clip_reduce_noise_grouped(grads, clips, SIGMA * C, b, [chol] * L, 1, 3, 1, list(range(L)), 0)
    else:
        fn = lambda: [clip_reduce_noise(gk, ck, SIGMA * C, b, chol, 1, 3, 1, k, 0)
                      for k, (gk, ck) in enumerate(zip(grads, clips))]
    _run(benchmark, fn, sh["rounds"], f"release of {L} layers m={m} phase B", method,
         "deer" if method == "deer grouped" else "baseline", m=m, layers=L, b=b)


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD-momentum"])
@pytest.mark.parametrize("method", ["deer fused step", "deer release, then optimizer.step()"])
def test_fused_optimizer_step(benchmark, quick, method, optimizer):
    """The same 12-layer release followed by the optimizer's step of every factor: the fused step
    (clip_reduce_noise_grouped(updates=...): each element is stepped where the kernel writes it)
    against writing .grad and calling torch's optimizer (its default foreach implementation)."""
    from deer.ops import FusedUpdate, clip_reduce_noise_grouped
    sh = _shapes(quick)
    L, b, m, r, grads, clips, chol = _model_release_inputs(quick)
    g = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(m, r, generator=g) * 0.1) for _ in range(L)]
    opt = (torch.optim.AdamW(params, lr=1e-3) if optimizer == "AdamW"
           else torch.optim.SGD(params, lr=0.1, momentum=0.9))
    args = (grads, clips, SIGMA * C, b, [chol] * L, 1, 3, 1, list(range(L)), 0)
    if method == "deer fused step":
        def fn():
            clip_reduce_noise_grouped(*args, updates=[FusedUpdate.from_optimizer(opt, p) for p in params])
    else:
        def fn():
            for p, out in zip(params, clip_reduce_noise_grouped(*args)):
                p.grad = out
            opt.step()
    _run(benchmark, fn, sh["rounds"], f"release + {optimizer} step of {L} layers m={m} phase B", method,
         "deer" if method == "deer fused step" else "baseline", m=m, layers=L, b=b)
