"""per_sample_grad_norm on the CPU: deer's tiled kernel against the reference (einsum in PyTorch ops)
and Opacus' per-sample gradient + per-parameter norm, for the two LoRA phases at ViT-B shapes; and the
norm-only route (materialise vs ghost, which the cost rule picks between).

    pytest bench/bench_per_sample_grad_norm.py [--quick] [--benchmark-json=bench/results/psgn.json]
"""
from __future__ import annotations

import pytest
import torch

from bench.conftest import machine_row
from deer.ops import per_sample_grad_norm, per_sample_grad_norm_only, per_sample_grad_norm_reference


def _cfg(quick):
    if quick:
        return dict(b=4, T=17, n=96, ms=(96, 288), r=8, rounds=3)
    return dict(b=32, T=197, n=768, ms=(768, 2304), r=8, rounds=15)


@pytest.fixture(scope="module")
def cfg(quick):
    return _cfg(quick)


def _inputs(cfg, m_idx, phase, gram):
    g = torch.Generator().manual_seed(m_idx)
    b, T, n, r = cfg["b"], cfg["T"], cfg["n"], cfg["r"]
    m = cfg["ms"][m_idx]
    # B phase: L = G (b, T, m), R = U (b, T, r), K on columns. A phase: L = V (b, T, r), R = X (b, T, n), K on rows.
    p, q = (m, r) if phase == "B" else (r, n)
    L, R = torch.randn(b, T, p, generator=g), torch.randn(b, T, q, generator=g)
    K = None
    if gram:
        A = torch.randn(r, r, generator=g)
        K = A @ A.T + torch.eye(r)
    return m, L, R, K, (1 if phase == "B" else 0)


def _opacus(L, R, s, K, side):
    gs = torch.einsum("n...i,n...j->nij", s * L, R)
    return gs, gs.reshape(len(gs), -1).norm(2, dim=-1) ** 2


METHODS = {
    "deer": ("deer", lambda L, R, K, side: per_sample_grad_norm(L, R, 2.0, K, side)),
    "reference (PyTorch ops)": ("baseline", lambda L, R, K, side: per_sample_grad_norm_reference(L, R, 2.0, K, side)),
    "opacus-style einsum + norm": ("baseline", lambda L, R, K, side: _opacus(L, R, 2.0, K, side)),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", [(i, ph) for i in (0, 1) for ph in ("B", "A")], ids=lambda c: f"m{c[0]}-{c[1]}")
def test_grads_and_norms(benchmark, cfg, method, case):
    m, L, R, K, side = _inputs(cfg, case[0], case[1], gram=False)
    role, fn = METHODS[method]
    benchmark.group = f"psgn m={m} phase {case[1]}"
    benchmark.extra_info.update(machine_row(), role=role, label=method, m=m, phase=case[1])
    benchmark.pedantic(lambda: fn(L, R, K, side), rounds=cfg["rounds"], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("method", ["deer metric", "reference metric"])
@pytest.mark.parametrize("case", [(1, "B"), (1, "A")], ids=lambda c: f"m{c[0]}-{c[1]}")
def test_metric_norms(benchmark, cfg, method, case):
    m, L, R, K, side = _inputs(cfg, case[0], case[1], gram=True)
    fn = per_sample_grad_norm if method.startswith("deer") else per_sample_grad_norm_reference
    benchmark.group = f"psgn regulated metric m={m} phase {case[1]}"
    benchmark.extra_info.update(machine_row(), role="deer" if method.startswith("deer") else "baseline",
                                label=method, m=m, phase=case[1])
    benchmark.pedantic(lambda: fn(L, R, 2.0, K, side), rounds=cfg["rounds"], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("method", ["materialise", "ghost"])
@pytest.mark.parametrize("T", [1, 197])
def test_norm_only_route(benchmark, cfg, method, T):
    """Ghost norms pay only for short sequences (T (p + q) < p q): T = 1 vs the ViT's 197 tokens."""
    g = torch.Generator().manual_seed(T)
    T = min(T, cfg["T"])
    L, R = torch.randn(cfg["b"], T, cfg["ms"][1], generator=g), torch.randn(cfg["b"], T, cfg["r"], generator=g)
    benchmark.group = f"norm only T={T}"
    benchmark.extra_info.update(machine_row(), role="deer" if method == "ghost" else "baseline", label=method, T=T)
    benchmark.pedantic(lambda: per_sample_grad_norm_only(L, R, 2.0, method=method), rounds=cfg["rounds"],
                       warmup_rounds=1, iterations=1)
