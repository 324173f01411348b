"""Pure-PyTorch reference of the DP-LoRA math (docs/design.md sections 1-6). Runs in float64; the
oracle for every kernel backend. Written for clarity, not speed: every formula here is the definition.

Conventions (one LoRA layer on a frozen Linear with weight W of shape (m, n) = (out, in)):
    A: (r, n), B: (m, r), scale s = alpha / r
    y = x W^T + b + s (x A^T) B^T
    For sample i with token rows X_i (T x n) and output gradient G_i (T x m):
        U_i = X_i A^T            g_B,i = s G_i^T U_i   (m x r)
        V_i = G_i B              g_A,i = s V_i^T X_i   (r x n)
Phases: "A" trains A (B frozen), "B" trains B (A frozen), "AB" trains both (FedAvg-LoRA baseline).
Regulated metric: B phase ||g A||_F^2 = tr(g K g^T), K = A A^T + lam I;
                  A phase ||B g||_F^2 = tr(g^T K g), K = B^T B + lam I.
Whitening Phi: A phase Phi(g) = R g, B phase Phi(g) = g R^T, with K = R^T R (R upper triangular):
||Phi(g)||_F = ||g||_K, so metric clipping bounds the whitened sensitivity by C.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

Phase = Literal["A", "B", "AB"]
Metric = Literal["euclidean", "regulated"]
NoiseKind = Literal["isotropic", "regulated"]
RegulatedForm = Literal["cholesky", "pinv"]

CLIP_EPS = 1e-6  # c_i = min(1, C / (N_i + eps)): eps keeps a zero-norm sample finite (as Opacus)

PHASES = ("A", "B", "AB")


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES} ('A' trains A with B frozen, 'B' trains B "
                         f"with A frozen, 'AB' trains both), got {phase!r}")
    return phase


def trained_factors(phase: str) -> tuple[str, ...]:
    return {"A": ("A",), "B": ("B",), "AB": ("A", "B")}[check_phase(phase)]


# --------------------------------------------------------------------------------------------
# Forward and per-sample gradients
# --------------------------------------------------------------------------------------------

def lora_forward(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T for x of shape (..., n)."""
    y = x @ W.T + s_mul(scale, (x @ A.T) @ B.T)
    return y if bias is None else y + bias


def s_mul(scale: float, t: torch.Tensor) -> torch.Tensor:
    return t * scale


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(b, n) -> (b, 1, n); (b, T, n) unchanged; anything else is an error."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    raise ValueError(f"expected a 2-D (batch, features) or 3-D (batch, tokens, features) tensor, "
                     f"got shape {tuple(t.shape)}")


def per_sample_grads(x: torch.Tensor, grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: float, phase: str = "AB") -> dict[str, torch.Tensor]:
    """Per-sample gradients of the trained factors: {'A': (b, r, n)} and/or {'B': (b, m, r)}.

    x: (b, n) or (b, T, n) layer input; grad_out: dL/dy with the same leading shape and m features,
    where L = sum_i L_i (so grad_out[i] only depends on sample i).
    """
    X, G = as_tokens(x), as_tokens(grad_out)
    out = {}
    for f in trained_factors(phase):
        if f == "B":
            U = X @ A.T                                   # (b, T, r)
            out["B"] = scale * torch.einsum("btm,btr->bmr", G, U)
        else:
            V = G @ B                                     # (b, T, r)
            out["A"] = scale * torch.einsum("btr,btn->brn", V, X)
    return out


# --------------------------------------------------------------------------------------------
# Metric, norms, clipping
# --------------------------------------------------------------------------------------------

def metric_gram(A: torch.Tensor, B: torch.Tensor, factor: str, lam: float = 0.0) -> torch.Tensor:
    """K for the regulated metric of the *trained* factor: B trained -> A A^T + lam I;
    A trained -> B^T B + lam I (r x r)."""
    if factor == "B":
        K = A @ A.T
    elif factor == "A":
        K = B.T @ B
    else:
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    if lam < 0:
        raise ValueError(f"ridge lambda must be >= 0, got {lam}")
    return K + lam * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)


def sq_norms(g: torch.Tensor, factor: str, K: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared norms of g (b, ...): Euclidean when K is None, else the regulated metric
    (B: tr(g K g^T) with g (b, m, r); A: tr(g^T K g) with g (b, r, n))."""
    if K is None:
        return g.flatten(1).pow(2).sum(1)
    if factor == "B":
        return torch.einsum("bmr,rs,bms->b", g, K, g)
    if factor == "A":
        return torch.einsum("brn,rs,bsn->b", g, K, g)
    raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")


def cholesky_upper(K: torch.Tensor) -> torch.Tensor:
    """R upper-triangular with K = R^T R. Raises a clear error when K is not positive definite
    (B = 0 at LoRA init makes B^T B singular: use a ridge lambda > 0)."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise ValueError("regulated metric: K = frozen^T frozen + lambda I is not positive definite "
                         "(the frozen factor is rank deficient, e.g. B = 0 at initialisation). "
                         "Use a ridge lambda > 0.")
    return L.mT


def whiten(g: torch.Tensor, R: torch.Tensor, factor: str) -> torch.Tensor:
    """Phi(g): A trained -> R g; B trained -> g R^T. ||Phi(g)||_F = ||g||_K. Works batched."""
    return R @ g if factor == "A" else g @ R.mT


def clip_factors(total_sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c_i = min(1, C / (N_i + 1e-6))."""
    return (max_grad_norm / (total_sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def per_layer_bounds(max_grad_norm: float | Sequence[float], n_layers: int) -> list[float]:
    """Per-layer clipping bounds C_l. A scalar C is split evenly, C_l = C / sqrt(L), so that the
    total sensitivity sqrt(sum_l C_l^2) equals C (the noise is calibrated to that total)."""
    if isinstance(max_grad_norm, (int, float)):
        return [float(max_grad_norm) / math.sqrt(n_layers)] * n_layers
    bounds = [float(c) for c in max_grad_norm]
    if len(bounds) != n_layers:
        raise ValueError(f"per-layer clipping needs one bound per trained tensor: got {len(bounds)} "
                         f"bounds for {n_layers} tensors")
    return bounds


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------

def isotropic_noise(shape: Sequence[int], generator: torch.Generator | None = None,
                    dtype=torch.float64, device=None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype, device=device)


def regulated_noise_cholesky(K: torch.Tensor, factor: str, other_dim: int,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-cost regulated noise (what deer implements): with K = R^T R,
    A trained: xi = R^{-1} Z, Z ~ N(0, I) of shape (r, n)   -> every column has covariance K^{-1};
    B trained: xi = Z R^{-T}, Z of shape (m, r)             -> every row has covariance K^{-1}.
    Costs r * other_dim random numbers and one triangular solve."""
    R = cholesky_upper(K)
    r = K.shape[0]
    if factor == "A":
        Z = torch.randn(r, other_dim, generator=generator, dtype=K.dtype, device=K.device)
        return torch.linalg.solve_triangular(R, Z, upper=True)
    Z = torch.randn(other_dim, r, generator=generator, dtype=K.dtype, device=K.device)
    # xi R^T = Z  <=>  xi = Z R^{-T}
    return torch.linalg.solve_triangular(R.mT, Z, upper=False, left=False)


def regulated_noise_pinv(A: torch.Tensor, B: torch.Tensor, factor: str, lam: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's form: draw a full (m x n) Gaussian N and map it through the frozen factor,
    A trained: xi = (B^T B)^{-1} B^T N;  B trained: xi = N A^T (A A^T)^{-1}.
    With a ridge lam > 0 an extra independent r-dimensional draw Z completes the covariance:
    xi = K^{-1}(B^T N + sqrt(lam) Z), whose covariance K^{-1}(B^T B + lam I)K^{-1} = K^{-1}, the same
    distribution as the Cholesky form. Costs m*n random numbers."""
    m, r = B.shape
    n = A.shape[1]
    N = torch.randn(m, n, generator=generator, dtype=A.dtype, device=A.device)
    K = metric_gram(A, B, factor, lam)
    if factor == "A":
        rhs = B.T @ N
        if lam > 0:
            rhs = rhs + math.sqrt(lam) * torch.randn(r, n, generator=generator, dtype=A.dtype, device=A.device)
        return torch.linalg.solve(K, rhs)
    rhs = N @ A.T
    if lam > 0:
        rhs = rhs + math.sqrt(lam) * torch.randn(m, r, generator=generator, dtype=A.dtype, device=A.device)
    return torch.linalg.solve(K, rhs.T).T


# --------------------------------------------------------------------------------------------
# A complete reference DP step for a set of LoRA layers
# --------------------------------------------------------------------------------------------

@dataclass
class LayerBatch:
    """What one LoRA layer contributes to a DP step: its input x, output gradient grad_out (of the
    summed per-sample loss), its factors and scale."""
    x: torch.Tensor
    grad_out: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclass
class DPStepResult:
    grads: list[dict[str, torch.Tensor]]          # per layer: factor -> noisy mean gradient
    sq_norms: torch.Tensor                        # (b,) total per-sample squared norm (flat) or (L', b)
    clip: torch.Tensor                            # (b,) flat factors, or (L', b) per-layer factors
    clipped_sum: list[dict[str, torch.Tensor]]    # per layer: factor -> sum_i c_i g_i (no noise)
    noise_multiplier_effective: float             # sigma as the accountant must charge it
    info: dict = field(default_factory=dict)


def dp_step(layers: Sequence[LayerBatch], phase: str, max_grad_norm: float | Sequence[float],
            noise_multiplier: float, expected_batch_size: float, *, metric: Metric = "euclidean",
            noise: NoiseKind = "isotropic", clipping: Literal["flat", "per_layer"] = "flat",
            lam: float = 0.0, regulated_form: RegulatedForm = "cholesky",
            generator: torch.Generator | None = None) -> DPStepResult:
    """One DP-SGD step on the trained LoRA factors of `layers`:
        S = sum_i c_i g_i + sigma C xi,    returned gradient S / expected_batch_size.
    metric: 'euclidean' or 'regulated' (norms in the frozen factor's metric, phases A/B only).
    noise: 'isotropic' (xi ~ N(0, I)) or 'regulated' (covariance K^{-1}, phases A/B only).
    clipping: 'flat' (one bound C on the norm over all layers) or 'per_layer' (bound C_l each;
    the noise std is sigma * sqrt(sum C_l^2) on every tensor).
    The returned noise_multiplier_effective is what an honest accountant charges: sigma, except for
    Euclidean clipping with regulated noise (the paper's mechanism), where the whitened sensitivity
    is C * sigma_max(frozen) and the true multiplier is sigma / sqrt(lambda_max(K)) (the worst layer),
    and for metric clipping with isotropic noise, where the Euclidean sensitivity is
    C / sqrt(lambda_min(K)) and the true multiplier sigma * sqrt(lambda_min(K)).
    """
    check_phase(phase)
    if not layers:
        raise ValueError("dp_step needs at least one LoRA layer")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if phase == "AB" and (metric == "regulated" or noise == "regulated"):
        raise ValueError("the regulated metric and regulated noise need a frozen factor: use phase "
                         "'A' or 'B' (phase 'AB' trains both factors)")
    factors = trained_factors(phase)

    per_layer = []       # list of dict factor -> per-sample grads
    grams = []           # list of dict factor -> K (regulated) or None
    for lb in layers:
        g = per_sample_grads(lb.x, lb.grad_out, lb.A, lb.B, lb.scale, phase)
        per_layer.append(g)
        need_K = metric == "regulated" or noise == "regulated"
        grams.append({f: (metric_gram(lb.A, lb.B, f, lam) if need_K else None) for f in factors})

    # Per-sample squared norms of each trained tensor, in the chosen metric.
    tensor_norms = []
    for g, Ks in zip(per_layer, grams):
        for f in factors:
            tensor_norms.append(sq_norms(g[f], f, Ks[f] if metric == "regulated" else None))
    tensor_norms = torch.stack(tensor_norms)                       # (L', b)

    if clipping == "flat":
        total = tensor_norms.sum(0)
        c = clip_factors(total, float(max_grad_norm))
        clip_per_tensor = [c] * tensor_norms.shape[0]
        sens = float(max_grad_norm)
        norms_out, clip_out = total, c
    elif clipping == "per_layer":
        bounds = per_layer_bounds(max_grad_norm, tensor_norms.shape[0])
        clip_per_tensor = [clip_factors(tensor_norms[k], bounds[k]) for k in range(len(bounds))]
        sens = math.sqrt(sum(b_ ** 2 for b_ in bounds))
        norms_out, clip_out = tensor_norms, torch.stack(clip_per_tensor)
    else:
        raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")

    grads_out, sums_out = [], []
    k = 0
    for lb, g, Ks in zip(layers, per_layer, grams):
        layer_grads, layer_sums = {}, {}
        for f in factors:
            ci = clip_per_tensor[k]
            k += 1
            S = torch.einsum("b,b...->...", ci.to(g[f].dtype), g[f])
            layer_sums[f] = S
            if noise == "isotropic":
                xi = isotropic_noise(S.shape, generator, dtype=S.dtype, device=S.device)
            elif regulated_form == "cholesky":
                other = S.shape[1] if f == "A" else S.shape[0]
                xi = regulated_noise_cholesky(Ks[f], f, other, generator)
            else:
                xi = regulated_noise_pinv(lb.A, lb.B, f, lam, generator)
            layer_grads[f] = (S + noise_multiplier * sens * xi) / expected_batch_size
        grads_out.append(layer_grads)
        sums_out.append(layer_sums)

    eff = effective_multiplier(noise_multiplier, metric, noise, [Ks[f] for Ks in grams for f in factors])
    return DPStepResult(grads=grads_out, sq_norms=norms_out, clip=clip_out, clipped_sum=sums_out,
                        noise_multiplier_effective=eff,
                        info={"sensitivity": sens, "phase": phase, "metric": metric, "noise": noise,
                              "clipping": clipping})


def effective_multiplier(noise_multiplier: float, metric: Metric, noise: NoiseKind,
                         Ks: Sequence[torch.Tensor | None]) -> float:
    """The multiplier an honest accountant charges for one release whose clipping `metric` and
    `noise` use the grams Ks (every trained tensor's K; unused when metric and noise agree):
      matching metric and noise: sigma (sensitivity C in the metric the noise is calibrated for);
      Euclidean clipping + regulated noise (the paper's mechanism): whitened sensitivity
        C sigma_max(frozen), so sigma / max sqrt(lambda_max(K)) over the tensors (inf if that is 0);
      metric clipping + isotropic noise: ||g||_F <= ||g||_K / sqrt(lambda_min(K)), Euclidean
        sensitivity C / sqrt(lambda_min), so sigma * min sqrt(lambda_min(K)).
    The one rule used by dp_step, the PrivacyEngine and the federated client and server steps."""
    if noise == "regulated" and metric == "euclidean":
        smax = max(float(torch.linalg.eigvalsh(K.double()).max().sqrt()) for K in Ks)
        return noise_multiplier / smax if smax > 0 else math.inf
    if noise == "isotropic" and metric == "regulated":
        return noise_multiplier * min(float(torch.linalg.eigvalsh(K.double()).min().clamp(min=0).sqrt()) for K in Ks)
    return noise_multiplier
