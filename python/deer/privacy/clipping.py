"""Per-sample gradients of the trained LoRA factors, their norms in the chosen metric, and the
clipping factors (flat over all layers, or per layer).

For one unit with captured chunks (X, U, G) of a logical batch (several chunks = gradient
accumulation over physical batches):
    B trained: g_i = s G_i^T U_i  (m x r),  regulated norm tr(g K g^T),  K = A A^T + lam I
    A trained: g_i = s V_i^T X_i  (r x n),  regulated norm tr(g^T K g),  K = B^T B + lam I,  V = G B
The per-sample gradients and norms come from deer.ops.per_sample_grad_norm (C++/CUDA/Triton
kernels, or the PyTorch reference on any device).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import reference as ref
from ..ops import per_sample_grad_norm


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(b, n) -> (b, 1, n); (b, T, n) as is; (b, d1, d2, ..., n) -> (b, d1*d2*..., n)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    if t.dim() > 3:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    raise ValueError(f"a LoRA layer's input must have a batch dimension, got shape {tuple(t.shape)}")


def chunk_grads(unit, factor: str, chunk, gram, loss_reduction: str = "mean", backend: str | None = None):
    """(g (b, p, q), sq_norms (b,)) of `factor` from one captured chunk (X, U, G [, V]); `gram` is K
    for the regulated metric or None (Euclidean)."""
    X, U, G = chunk
    G = _tokens(G)
    scale = unit.scale
    if loss_reduction == "mean":
        # The loss was a mean over this physical batch: dL/dy_i = (1/b) dL_i/dy_i. Undo it so
        # that g_i is the gradient of sample i's own loss (as Opacus does for 'mean'); the factor
        # rides on the kernel's scale instead of a pass over G.
        scale = scale * G.shape[0]
    if factor == "B":
        if U is None:
            raise RuntimeError(f"{unit.name}: B is trained but its capture has no U (the phase changed "
                               f"between backward and step?); call optimizer.zero_grad() after set_phase")
        return per_sample_grad_norm(*_same_dtype(G, _tokens(U)), scale, gram, 1, backend=backend)
    if X is None:
        raise RuntimeError(f"{unit.name}: A is trained but its capture has no X (the phase changed "
                           f"between backward and step?); call optimizer.zero_grad() after set_phase")
    # V = G B: the LoRA backward hands it over when A is trained (B is unchanged until the step).
    V = getattr(chunk, "V", None)
    V = _tokens(V) if V is not None else G @ unit.lora_B.detach().to(G.dtype)
    return per_sample_grad_norm(*_same_dtype(V, _tokens(X)), scale, gram, 0, backend=backend)


def _same_dtype(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast the captures can mix dtypes (the layer input X in fp32 from a LayerNorm, V = G B
    in bf16 from the autocast backward): the kernels take one dtype, so promote the pair (the
    kernels accumulate in fp32 either way)."""
    if L.dtype == R.dtype:
        return L, R
    dt = torch.promote_types(L.dtype, R.dtype)
    return L.to(dt), R.to(dt)


def cholesky_upper(K: torch.Tensor, where: str = "") -> torch.Tensor:
    """R upper-triangular with K = R^T R, for the small r x r Gram K (as deer.reference.cholesky_upper).
    Computed by LAPACK through numpy in float64 on the host: K is r x r (r <= a few dozen), and this
    torch build's CPU linalg.cholesky costs ~10-20 ms per call against ~0.1 ms here. Called once per
    phase per trained factor (deer.privacy.release.FrozenMetric)."""
    import numpy as np
    Kd = K.detach().to(device="cpu", dtype=torch.float64)
    try:
        L = np.linalg.cholesky(Kd.numpy())
    except np.linalg.LinAlgError:
        L = None
    if L is None or not np.isfinite(L).all():
        raise ValueError(f"regulated metric{' of ' + where if where else ''}: K = frozen^T frozen + lambda I is not "
                         "positive definite (the frozen factor is rank deficient, e.g. B = 0 at initialisation, or "
                         "not finite). Use a ridge lam > 0.")
    return torch.from_numpy(L.T.copy()).to(device=K.device, dtype=K.dtype)


def nonfinite_sample_mask(sq_norms: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Mask (b,) of the samples whose squared norm in any trained tensor is NaN/Inf (what a NaN/Inf
    gradient gives), or None when there is none (one host sync). Shared by the PrivacyEngine and the
    federated client's private step."""
    bad = None
    for n in sq_norms:
        if n is not None:
            b = ~torch.isfinite(n)
            bad = b if bad is None else bad | b
    return bad if bad is not None and bool(bad.any()) else None


def zero_samples(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """x with the samples (dim 0) in `bad` set to 0: torch.where, since 0 * NaN would still be NaN."""
    return torch.where(bad.view((-1,) + (1,) * (x.dim() - 1)), torch.zeros_like(x), x)


def nonfinite_outputs(outs: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the tensors in `outs` holding a NaN/Inf: one host sync for all of them (not one per
    tensor) in the usual case where every one is finite."""
    if not outs or bool(torch.stack([torch.isfinite(o).all().to(outs[0].device) for o in outs]).all()):
        return []
    return [k for k, o in enumerate(outs) if not torch.isfinite(o).all()]


def clip_factors(tensors, clipping: str, max_grad_norm, batch: int,
                 bad: torch.Tensor | None):
    """Per-tensor clip factors (list of (b,) tensors) and the total L2 sensitivity of the clipped sum.
    flat: c_i = min(1, C / (N_i + 1e-6)), N_i^2 = sum over all trained tensors of their squared norms.
    per_layer: tensor l gets its own bound C_l (a scalar C is split as C / sqrt(L)); sensitivity
    sqrt(sum_l C_l^2)."""
    present = [t.sq_norms for t in tensors if t.sq_norms is not None]
    dev = present[0].device if present else tensors[0].param.device
    # fp32 norms from the kernels, fp64 when the model runs in fp64 (the reference tests)
    acc = torch.float64 if any(n.dtype == torch.float64 for n in present) else torch.float32
    zeros = torch.zeros(batch, dtype=acc, device=dev)
    norms = [t.sq_norms.to(acc) if t.sq_norms is not None else zeros for t in tensors]
    if clipping == "flat":
        C = float(max_grad_norm)
        total = torch.stack(norms).sum(0)
        c = ref.clip_factors(total, C)
        if bad is not None:
            c = zero_samples(c, bad)
        return [c] * len(tensors), C, total.sqrt()
    if clipping == "per_layer":
        bounds = ref.per_layer_bounds(max_grad_norm, len(tensors))
        cs = []
        for n, Cl in zip(norms, bounds):
            c = ref.clip_factors(n, Cl)
            if bad is not None:
                c = zero_samples(c, bad)
            cs.append(c)
        return cs, math.sqrt(sum(b * b for b in bounds)), torch.stack(norms).sum(0).sqrt()
    raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
