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
from .config import MethodSpec
from .model import AdapterState


@dataclass
class AggregateResult:
    adapters: AdapterState
    noise_multiplier: float | None     # client level: what the accountant charges for this release
    clip_fraction: float | None = None


def _copy(state: AdapterState) -> AdapterState:
    return {n: {f: t.clone() for f, t in d.items()} for n, d in state.items()}


def aggregate(global_state: AdapterState, updates: list[AdapterState], weights: list[float], phase: str,
              spec: MethodSpec, *, privacy: str = "none", noise_multiplier: float = 0.0,
              max_grad_norm: float = 1.0, lam: float = 0.1,
              generator: torch.Generator | None = None, denominator: float | None = None) -> AggregateResult:
    if not updates and (privacy != "client" or denominator is None):
        raise ValueError("aggregate needs at least one client update (client level: or a denominator)")
    factors = ref.trained_factors(phase)
    out = _copy(global_state)
    if privacy != "client":
        w = torch.tensor(weights, dtype=torch.float64)
        if (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"aggregation weights must be >= 0 with a positive sum, got {weights}")
        w = w / w.sum()
        for n in out:
            for f in factors:
                acc = sum(wk * u[n][f].double() for wk, u in zip(w, updates))
                out[n][f] = acc.to(global_state[n][f].dtype)
        return AggregateResult(out, None)

    # client level: deltas in float64, clipped jointly over all layers in the chosen metric
    m = float(denominator) if denominator is not None else len(updates)
    if not m > 0:
        raise ValueError(f"client-level denominator must be > 0, got {denominator}")
    C = float(max_grad_norm)
    Ks = {}
    if spec.metric == "regulated" or spec.noise == "regulated":
        for n, d in global_state.items():
            A0, B0 = d["A"].double(), d["B"].double()
            Ks[n] = {f: ref.metric_gram(A0, B0, f, lam) for f in factors}
    deltas, sq = [], []
    for u in updates:
        dk = {n: {f: u[n][f].double() - global_state[n][f].double() for f in factors} for n in global_state}
        tot = torch.zeros((), dtype=torch.float64)
        for n in dk:
            for f in factors:
                K = Ks[n][f] if spec.metric == "regulated" else None
                tot = tot + ref.sq_norms(dk[n][f].unsqueeze(0), f, K)[0]
        deltas.append(dk)
        sq.append(tot)
    c = ref.clip_factors(torch.stack(sq), C) if sq else torch.zeros(0, dtype=torch.float64)
    for n in out:
        for f in factors:
            mean = sum((ck * dk[n][f] for ck, dk in zip(c, deltas)),
                       torch.zeros_like(global_state[n][f], dtype=torch.float64)) / m
            shape = mean.shape
            if spec.noise == "regulated":
                other = shape[1] if f == "A" else shape[0]
                xi = ref.regulated_noise_cholesky(Ks[n][f], f, other, generator)
            else:
                xi = ref.isotropic_noise(shape, generator)
            out[n][f] = (global_state[n][f].double() + mean + noise_multiplier * C * xi / m).to(global_state[n][f].dtype)
    eff = ref.effective_multiplier(noise_multiplier, spec.metric, spec.noise,
                                   [K for d in Ks.values() for K in d.values()])
    return AggregateResult(out, eff, float((c < 1).double().mean()) if len(c) else None)
