"""per_sample_grad_norm: per-sample gradients of the trained LoRA factor and their squared norms.

    g_i = scale * L_i^T R_i            L: (b, T, p), R: (b, T, q)  ->  g: (b, p, q)
    n_i = ||g_i||_F^2                  gram None
    n_i = tr(g_i K g_i^T)              gram_side = 1, K: (q, q)   (B phase: L = G, R = U = X A^T)
    n_i = tr(g_i^T K g_i)              gram_side = 0, K: (p, p)   (A phase: L = V = G B, R = X)
2-D inputs (b, features) are treated as T = 1. Outputs are fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from . import resolve_backend


def _tokens(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"per_sample_grad_norm: {name} must be (b, features) or (b, T, features), "
                         f"got shape {tuple(t.shape)}")
    return t


def per_sample_grad_norm_reference(left, right, scale, gram=None, gram_side=1):
    left, right = _tokens(left, "left"), _tokens(right, "right")
    acc = torch.float64 if left.dtype == torch.float64 else torch.float32
    g = scale * torch.einsum("btp,btq->bpq", left.to(acc), right.to(acc))
    if gram is None:
        n = g.flatten(1).pow(2).sum(1)
    elif gram_side == 1:
        n = torch.einsum("bpq,qs,bps->b", g, gram.to(acc), g)
    else:
        n = torch.einsum("bpq,ps,bsq->b", g, gram.to(acc), g)
    return g, n


def per_sample_grad_norm(left: torch.Tensor, right: torch.Tensor, scale: float,
                         gram: torch.Tensor | None = None, gram_side: int = 1,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if gram_side not in (0, 1):
        raise ValueError(f"per_sample_grad_norm: gram_side must be 0 (K acts on rows) or 1 (columns), got {gram_side}")
    left, right = _tokens(left, "left"), _tokens(right, "right")
    b = resolve_backend(left.device, backend)
    if b == "reference":
        return per_sample_grad_norm_reference(left, right, scale, gram, gram_side)
    if b == "triton":
        from deer_kernels.per_sample_grad_norm import per_sample_grad_norm as triton_op
        return triton_op(left, right, scale, gram, gram_side)
    return torch.ops.deer.per_sample_grad_norm(left, right, float(scale), gram, int(gram_side))
