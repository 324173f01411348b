"""per_sample_grad_norm: per-sample gradients of the trained LoRA factor and their squared norms.

    g_i = scale * L_i^T R_i            L: (b, T, p), R: (b, T, q)  ->  g: (b, p, q)
    n_i = ||g_i||_F^2                  gram None
    n_i = tr(g_i K g_i^T)              gram_side = 1, K: (q, q)   (B phase: L = G, R = U = X A^T)
    n_i = tr(g_i^T K g_i)              gram_side = 0, K: (p, p)   (A phase: L = V = G B, R = X)
2-D inputs (b, features) are treated as T = 1. Outputs are fp32 (fp64 for fp64 inputs).

per_sample_grad_norm_only returns the squared norms alone. method 'auto' picks by cost between
'materialise' (form g_i in cache, reduce, discard) and 'ghost' (never form g_i):
    ||g_i||^2 = s^2 <L_i L_i^T, R_i R_i^T>,  tr(g K g^T) = s^2 <L L^T, R K R^T>,  tr(g^T K g) = s^2 <L K L^T, R R^T>
Ghost costs ~T^2 (p + q) against ~T p q, so it pays when T (p + q) < p q: short sequences only, for
LoRA shapes (one of p, q is the rank).
"""
from __future__ import annotations

import torch

from . import acc_dtype, resolve_backend


def _tokens(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"per_sample_grad_norm: {name} must be (b, features) or (b, T, features), "
                         f"got shape {tuple(t.shape)}")
    return t


def per_sample_grad_norm_reference(left, right, scale, gram=None, gram_side=1):
    left, right = _tokens(left, "left"), _tokens(right, "right")
    acc = acc_dtype(left.dtype)
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
    b = resolve_backend(left.device, backend, op="per_sample_grad_norm", dtype=left.dtype)
    if b == "reference":
        return per_sample_grad_norm_reference(left, right, scale, gram, gram_side)
    if b == "triton":
        from deer_kernels.per_sample_grad_norm import per_sample_grad_norm as triton_op
        return triton_op(left, right, scale, gram, gram_side)
    return torch.ops.deer.per_sample_grad_norm(left, right, float(scale), gram, int(gram_side))


_NORM_METHODS = {"auto": 0, "materialise": 1, "ghost": 2}


def ghost_pays(T: int, p: int, q: int) -> bool:
    """The cost rule of method='auto': ghost norms are cheaper when T (p + q) < p q."""
    return T * (p + q) < p * q


def per_sample_grad_norm_only_reference(left, right, scale, gram=None, gram_side=1, method="auto"):
    """Ghost-norm formula in PyTorch ops (method 'ghost'), or the materialised reference otherwise."""
    left, right = _tokens(left, "left"), _tokens(right, "right")
    if method == "auto":
        method = "ghost" if ghost_pays(left.shape[1], left.shape[2], right.shape[2]) else "materialise"
    if method != "ghost":
        return per_sample_grad_norm_reference(left, right, scale, gram, gram_side)[1]
    acc = acc_dtype(left.dtype)
    L, R = left.to(acc), right.to(acc)
    LL = (L @ gram.to(acc) if gram is not None and gram_side == 0 else L) @ L.mT
    RR = (R @ gram.to(acc) if gram is not None and gram_side == 1 else R) @ R.mT
    return (LL * RR).sum((1, 2)) * (scale * scale)


def per_sample_grad_norm_only(left: torch.Tensor, right: torch.Tensor, scale: float,
                              gram: torch.Tensor | None = None, gram_side: int = 1, method: str = "auto",
                              backend: str | None = None) -> torch.Tensor:
    """Per-sample squared norms (b,) of g_i = scale * L_i^T R_i without returning g (see module doc)."""
    if gram_side not in (0, 1):
        raise ValueError(f"per_sample_grad_norm_only: gram_side must be 0 or 1, got {gram_side}")
    if method not in _NORM_METHODS:
        raise ValueError(f"per_sample_grad_norm_only: method must be one of {tuple(_NORM_METHODS)}, got {method!r}")
    left, right = _tokens(left, "left"), _tokens(right, "right")
    b = resolve_backend(left.device, backend, op="per_sample_grad_norm", dtype=left.dtype)
    if b == "reference":
        return per_sample_grad_norm_only_reference(left, right, scale, gram, gram_side, method)
    if b == "triton":
        if method == "ghost":
            return per_sample_grad_norm_only_reference(left, right, scale, gram, gram_side, "ghost")
        from deer_kernels.per_sample_grad_norm import per_sample_grad_norm as triton_op
        return triton_op(left, right, scale, gram, gram_side)[1]
    return torch.ops.deer.per_sample_grad_norm_only(left, right, float(scale), gram, int(gram_side),
                                                    _NORM_METHODS[method])
