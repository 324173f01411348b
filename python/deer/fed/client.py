"""One client's local training, the same code for every method, engine and privacy level.

The client starts from the global adapters, trains the factors of the current phase with plain SGD
(no optimizer state survives the round) and returns its new adapters. Under sample-level privacy
each step is a DP-SGD step: Poisson sampling with rate q = b / n_k, per-sample clipping over all
LoRA layers in the method's metric, and noise; `private_step` is the one place that performs it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference as ref
from ..nn.lora import LoRALinear
from .config import MethodSpec
from .model import AdapterState, get_adapters, named_lora, set_adapters, set_phase


class ClientTimeout(RuntimeError):
    pass


@dataclass
class LocalTrainConfig:
    local_epochs: int
    batch_size: int
    lr: float
    privacy: str                    # none | sample | client (client: trains non-privately)
    noise_multiplier: float = 0.0   # sample level
    max_grad_norm: float = 1.0
    lam: float = 0.1
    local_steps: int | None = None  # fixed number of steps (else local_epochs passes over the data)


@dataclass
class ClientUpdate:
    adapters: AdapterState
    num_examples: int
    steps: int
    loss: float
    # sample-level accounting: what this client released, as (noise multiplier, sample rate, steps)
    releases: list[tuple[float, float, int]] = field(default_factory=list)


def local_steps(n: int, batch_size: int, local_epochs: int) -> int:
    return local_epochs * max(1, math.ceil(n / batch_size))


def _joint_regulated_step(layers: list[LoRALinear], captured, C: float, sigma: float, b: float, lam: float,
                          frozen: dict[str, dict[str, torch.Tensor]], gen) -> list[dict[str, torch.Tensor]]:
    """DP step for an 'AB' sub-round with the regulated metric and noise (DEeR without the deviation
    eliminator): g_A is measured and noised through K_A = B0^T B0 + lam I and g_B through
    K_B = A0 A0^T + lam I, where A0, B0 are the sub-round's starting (global, public) factors. The
    whitening (g_A, g_B) -> (R_A g_A, g_B R_B^T) is a fixed bijection, so joint clipping to C plus
    noise of covariance K^{-1} is the Gaussian mechanism with sensitivity C."""
    grads, norms, Ks = [], [], []
    for lyr, (x, _u, g) in zip(layers, captured):
        A0, B0 = frozen[lyr.name]["A"], frozen[lyr.name]["B"]
        pg = ref.per_sample_grads(x, g, lyr.lora_A.detach(), lyr.lora_B.detach(), lyr.scale, "AB")
        K = {"A": ref.metric_gram(A0, B0, "A", lam), "B": ref.metric_gram(A0, B0, "B", lam)}
        grads.append(pg)
        Ks.append(K)
        norms += [ref.sq_norms(pg[f], f, K[f]) for f in ("A", "B")]
    c = ref.clip_factors(torch.stack(norms).sum(0), C)
    out = []
    for pg, K in zip(grads, Ks):
        d = {}
        for f in ("A", "B"):
            S = torch.einsum("b,b...->...", c.to(pg[f].dtype), pg[f])
            other = S.shape[1] if f == "A" else S.shape[0]
            xi = ref.regulated_noise_cholesky(K[f], f, other, gen)
            d[f] = (S + sigma * C * xi) / b
        out.append(d)
    return out


def private_step(layers: list[LoRALinear], phase: str, spec: MethodSpec, cfg: LocalTrainConfig,
                 expected_batch: float, frozen: AdapterState, gen: torch.Generator):
    """One DP-SGD step from the captured (X, U, G) of every LoRA layer. Returns (per-layer gradient
    dicts, noise multiplier the accountant must charge). The deer PrivacyEngine, once it exists,
    replaces the body of this function and nothing else."""
    captured = []
    for lyr in layers:
        cap = lyr.pop_captured()
        if len(cap) != 1:
            raise RuntimeError(f"LoRA layer {lyr.name} captured {len(cap)} batches, expected 1")
        captured.append(cap[0])
    if phase == "AB" and spec.metric == "regulated":
        grads = _joint_regulated_step(layers, captured, cfg.max_grad_norm, cfg.noise_multiplier,
                                      expected_batch, cfg.lam, frozen, gen)
        return grads, cfg.noise_multiplier
    batches = [ref.LayerBatch(x, g, lyr.lora_A.detach(), lyr.lora_B.detach(), lyr.scale)
               for lyr, (x, _u, g) in zip(layers, captured)]
    res = ref.dp_step(batches, phase, cfg.max_grad_norm, cfg.noise_multiplier, expected_batch,
                      metric=spec.metric, noise=spec.noise, lam=cfg.lam, generator=gen)
    return res.grads, res.noise_multiplier_effective


def local_train(model: nn.Module, start: AdapterState, x: torch.Tensor, y: torch.Tensor, phase: str,
                spec: MethodSpec, cfg: LocalTrainConfig, gen: torch.Generator, *,
                deadline: float | None = None,
                hook: Callable[[int, nn.Module], None] | None = None) -> ClientUpdate:
    """Train from `start` on (x, y) for the given phase; return the client's new adapters.

    deadline: time.monotonic() value after which the client gives up (ClientTimeout, checked
    between steps). hook(step, model): called before each step (fault injection in tests)."""
    set_adapters(model, start)
    set_phase(model, phase)
    named = named_lora(model)
    layers = list(named.values())
    trained = [getattr(l, "lora_" + f) for l in layers for f in ref.trained_factors(phase)]
    n = len(y)
    if n == 0:
        raise ValueError("client has no training data")
    steps = cfg.local_steps or local_steps(n, cfg.batch_size, cfg.local_epochs)
    releases: list[tuple[float, float, int]] = []
    model.train()
    last = float("nan")
    if cfg.privacy == "sample":
        q = min(1.0, cfg.batch_size / n)
        for step in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                raise ClientTimeout(f"local training passed its deadline after {step}/{steps} steps")
            if hook:
                hook(step, model)
            idx = (torch.rand(n, generator=gen) < q).nonzero().squeeze(1)
            if len(idx) > 0:
                for l in layers:
                    l.capture = True
                try:
                    loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum")
                    loss.backward()
                finally:
                    for l in layers:
                        l.capture = False
                grads, sigma_eff = private_step(layers, phase, spec, cfg, q * n, start, gen)
                last = float(loss.detach()) / len(idx)
                with torch.no_grad():
                    for l, gd in zip(layers, grads):
                        for f, gf in gd.items():
                            getattr(l, "lora_" + f).sub_(cfg.lr * gf.to(l.lora_A.dtype))
                for p in trained:
                    p.grad = None
            else:
                # An empty Poisson batch still releases pure noise (the mechanism ran): account it.
                # Skipping the update is post-processing; sigma is the configured multiplier.
                sigma_eff = cfg.noise_multiplier
            releases.append((float(sigma_eff), q, 1))
    else:
        for step in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                raise ClientTimeout(f"local training passed its deadline after {step}/{steps} steps")
            if hook:
                hook(step, model)
            epoch_step = step % max(1, math.ceil(n / cfg.batch_size))
            if epoch_step == 0:  # a fresh shuffle every pass over the data
                perm = torch.randperm(n, generator=gen)
            idx = perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, trained)
            with torch.no_grad():
                for p, g in zip(trained, grads):
                    p.sub_(cfg.lr * g)
            last = float(loss.detach())
    return ClientUpdate(get_adapters(model), n, steps, last, _merge(releases))


def _merge(rel: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    out: list[list] = []
    for s, q, k in rel:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1][2] += k
        else:
            out.append([s, q, k])
    return [tuple(o) for o in out]
