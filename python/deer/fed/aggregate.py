"""Server-side aggregation of one sub-round: only the factors trained in that phase change.

Without client-level privacy: the weighted mean of the clients' trained factors (weights sum to 1).
In a 'B' or 'A' phase every client shares the frozen factor, so the aggregated product is exact:
mean_k(B_k) A = mean_k(B_k A). In 'AB' (FedAvg-LoRA) mean(B_k) mean(A_k) != mean(B_k A_k).

Client-level privacy (user level): each client's whole update Delta_k (all layers and trained
factors together) is clipped to C in the method's metric, and the server releases

    global + (sum_k clip(Delta_k) + sigma C xi) / D,

D = `denominator`. The engines pass D = q N, the EXPECTED number of participants under Poisson client
sampling (rate q), a public constant: adding or removing one client changes the sum by at most C, so
the release is the Gaussian mechanism with sensitivity C / D and noise sigma C / D, i.e. multiplier
sigma, composed as a Poisson subsampled Gaussian at rate q. The sum may be empty (nobody sampled, or
every sampled client failed): the release is then noise alone and is charged the same. Without a
denominator D is the number of updates given (the realised count; only sound where that count is
public, e.g. q = 1 without faults).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference as ref
from ..nn import LoRAState, lora_key
from ..privacy.mechanism import Mechanism


@dataclass
class AggregateResult:
    adapters: LoRAState
    noise_multiplier: float | None     # client level: what the accountant charges for this release
    clip_fraction: float | None = None


def aggregate(global_state: LoRAState, updates: list[LoRAState], weights: list[float], phase: str,
              mechanism: Mechanism, *, privacy: str = "none", noise_multiplier: float = 0.0,
              max_grad_norm: float = 1.0,
              generator: torch.Generator | None = None, denominator: float | None = None) -> AggregateResult:
    if not updates and (privacy != "client" or denominator is None):
        raise ValueError("aggregate needs at least one client update (client level: or a denominator)")
    factors = ref.trained_factors(phase)
    out = {k: t.clone() for k, t in global_state.items()}
    trained = {k: lora_key(k) for k in global_state if lora_key(k)[1] in factors}   # name -> (unit, factor)
    if privacy != "client":
        w = torch.tensor(weights, dtype=torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"aggregation weights must be finite and >= 0 with a positive sum, got {weights}")
        w = w / w.sum()
        for k in trained:
            out[k] = sum(wk * u[k].double() for wk, u in zip(w, updates)).to(global_state[k].dtype)
        return AggregateResult(out, None)

    # client level: deltas in float64, clipped jointly over all layers in the chosen metric
    m = float(denominator) if denominator is not None else len(updates)
    if not m > 0:
        raise ValueError(f"client-level denominator must be > 0, got {denominator}")
    C = float(max_grad_norm)
    if mechanism.clipping != "flat":
        raise ValueError(f"client-level aggregation clips each client's whole update to one bound; the {mechanism.name} "
                         f"mechanism's per-layer clipping is not supported there: use clipping='flat'")
    Ks = {}
    if mechanism.needs_gram:
        for k, (n, f) in trained.items():
            B0 = global_state[f"{n}.lora_B"].double()
            # a unit trained fully (deer.nn.FullLinear) has no A in the state: its A is the identity
            A0 = global_state[f"{n}.lora_A"].double() if f"{n}.lora_A" in global_state else \
                torch.eye(B0.shape[1], dtype=torch.float64)
            Ks[k] = ref.metric_gram(A0, B0, f, mechanism.lam)
    # Norms of the deltas scaled by their largest entry s, so that no finite update (a float64 1e300 from a
    # faulty site) overflows the squared norm to inf (or the regulated quadratic form to inf - inf):
    # with u = delta / s, ||delta|| = s ||u|| and the clipped delta c delta = (c s) u, where
    # c s = min(s, C s / (s ||u|| + eps)) = min(s, C / (||u|| + eps / s)) (ref.clip_factors' formula).
    scaled, coef, clipped = [], [], []
    for u in updates:
        dk = {k: u[k].double() - global_state[k].double() for k in trained}
        s = max((float(d.abs().max()) for d in dk.values() if d.numel()), default=0.0)
        if not s > 0:
            continue                       # a zero update contributes nothing, clipped or not
        tot = torch.zeros((), dtype=torch.float64)
        for k, (_, f) in trained.items():
            dk[k] = dk[k] / s
            K = Ks[k] if mechanism.metric == "regulated" else None
            tot = tot + ref.sq_norms(dk[k].unsqueeze(0), f, K)[0]
        cs = min(s, C / (float(tot.sqrt()) + ref.CLIP_EPS / s))
        scaled.append(dk)
        coef.append(cs)
        clipped.append(cs < s)
    for k, (_, f) in trained.items():
        mean = sum((ck * dk[k] for ck, dk in zip(coef, scaled)), torch.zeros_like(global_state[k], dtype=torch.float64)) / m
        shape = mean.shape
        if mechanism.noise == "regulated":
            other = shape[1] if f == "A" else shape[0]
            xi = ref.regulated_noise_cholesky(Ks[k], f, other, generator)
        else:
            xi = ref.isotropic_noise(shape, generator)
        out[k] = (global_state[k].double() + mean + noise_multiplier * C * xi / m).to(global_state[k].dtype)
    eff = mechanism.effective_multiplier(noise_multiplier, list(Ks.values()))
    return AggregateResult(out, eff, sum(clipped) / len(updates) if updates else None)
