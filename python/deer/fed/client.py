"""One client's local training, the same code for every method, engine and privacy level.

The client starts from the global adapters, trains the factors of the current phase with SGD
(torch.optim.SGD, optional momentum and weight decay; the optimizer is created afresh every sub-round)
and returns its new adapters. Under sample-level privacy
each step is a DP-SGD step: Poisson sampling of the client's records with rate q = b / n_k (each
record independently), per-sample clipping over all LoRA layers in the method's metric, Gaussian
noise (isotropic, or regulated through the frozen factor), and division by the *expected* batch size
q n_k. `private_step` performs it through deer.privacy.release, the one private release deer has
(the drop-in engine's step runs the same code): per-sample gradients and norms from deer's
kernels, then the clipped sum and noise of every trained factor in one grouped kernel call
(Philox stream keyed by (seed, step, layer, client)).

The backend comes from LocalTrainConfig.backend (config key `backend`): None picks one for the
tensors' device (or DEER_BACKEND), 'cpu' | 'cuda' | 'triton' force one, and 'reference' runs the
float64 oracle (the ops' PyTorch reference in float64). Every backend draws the same noise from the
same key, so the kernel path and the reference path agree to float32 rounding, noise included.
Each step releases one subsampled Gaussian with multiplier sigma (as the accountant is charged) and
rate q; a step whose Poisson batch is empty still releases noise alone and is charged the same.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference as ref
from ..nn import LoRALinear, LoRAState, get_lora_state, lora_layers, set_lora_state, set_phase
from ..privacy.mechanism import LAM, Mechanism
from ..privacy.release import FrozenMetric, per_sample_tensors, physical_batches, release
from .config import MethodSpec


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
    lam: float = LAM
    local_steps: int | None = None  # fixed number of steps (else local_epochs passes over the data)
    backend: str | None = None      # DP-step backend: None (auto) | cpu | cuda | triton | reference
    momentum: float = 0.0           # torch.optim.SGD's, on the (private) gradients; fresh every sub-round
    weight_decay: float = 0.0


@dataclass
class ClientUpdate:
    adapters: LoRAState
    num_examples: int
    steps: int
    loss: float
    # sample-level accounting: what this client released, as (noise multiplier, sample rate, steps)
    releases: list[tuple[float, float, int]] = field(default_factory=list)
    # trained factors the method keeps on the client (MethodSpec.shared: FedSA-LoRA's B); never sent
    personal: LoRAState = field(default_factory=dict)


@dataclass(frozen=True)
class NoiseKey:
    """The Philox key of one DP step's noise: (seed, step, layer, client), layer = 2 * LoRA layer
    index + (0 for A, 1 for B). The engines use seed = stream_seed(seed, 'noise', client, round,
    sub-round) and the client's id, so no two releases of a run share noise."""
    seed: int
    step: int
    client: int = 0


def local_steps(n: int, batch_size: int, local_epochs: int) -> int:
    return local_epochs * max(1, math.ceil(n / batch_size))


def private_step(layers: list[LoRALinear], phase: str, mechanism: Mechanism, cfg: LocalTrainConfig,
                 expected_batch: float, metric: FrozenMetric, key: NoiseKey,
                 captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None):
    """One DP-SGD step from the captured (X, U, G) of every LoRA layer (G of the summed loss, so G_i
    is sample i's own output gradient), through deer.privacy.release, the release the drop-in engine
    runs too. Returns (per-layer {factor: private gradient}, the noise multiplier the accountant must
    charge).

    captured: one (X, U, G) per layer (default: popped from the layers' capture lists); an empty list
    means an empty Poisson batch, which releases noise alone. `metric` is the sub-round's FrozenMetric:
    K of a factor comes from the *other* factor's value at the start of the sub-round (the global
    adapters, public). In 'A'/'B' phases that is the frozen factor itself; in an 'AB' sub-round with
    a regulated mechanism (DEeR without the deviation eliminator) both factors train and each is
    measured and noised through the other's starting value: the whitening is then still a fixed
    bijection, so joint clipping to C plus noise of covariance K^{-1} is the Gaussian mechanism with
    sensitivity C (docs/design.md section 5)."""
    units = [(lyr.name, lyr) for lyr in layers]
    if captured is None:   # one forward and backward per local step: one physical batch per layer
        chunks = [physical_batches(lyr, lyr.pop_captured()) for lyr in layers]
        for lyr, cs in zip(layers, chunks):
            if len(cs) != 1:
                raise RuntimeError(f"LoRA layer {lyr.name} captured {len(cs)} batches (backward passes) in one local "
                                   f"step, expected 1")
    elif len(captured) == 0:
        chunks = [[] for _ in layers]
    elif len(captured) != len(layers):
        raise ValueError(f"captured holds {len(captured)} batches for {len(layers)} LoRA layers")
    else:
        chunks = [[c] for c in captured]
    sigma = float(cfg.noise_multiplier)
    eff = metric.effective_multiplier(sigma)
    tensors = per_sample_tensors(units, chunks, metric, "sum", cfg.backend)
    rel = release(tensors, mechanism, noise_multiplier=sigma, max_grad_norm=float(cfg.max_grad_norm),
                  expected_batch_size=float(expected_batch), seed=key.seed, step=key.step, client=key.client,
                  backend=cfg.backend, effective_multiplier=eff,
                  where=f" (client {key.client}, step {key.step})")
    out: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    for t, r in zip(tensors, rel.grads):
        out[t.layer_id // 2][t.factor] = r
    return out, eff


def local_train(model: nn.Module, start: LoRAState, x: torch.Tensor, y: torch.Tensor, phase: str,
                spec: MethodSpec, cfg: LocalTrainConfig, gen: torch.Generator, *,
                deadline: float | None = None,
                hook: Callable[[int, nn.Module], None] | None = None,
                noise_seed: int | None = None, client: int = 0) -> ClientUpdate:
    """Train from `start` on (x, y) for the given phase; return the client's new adapters.

    gen: the client's stream for this sub-round (Poisson sampling of records, shuffles).
    noise_seed, client: the Philox key of the DP noise, (noise_seed, step, layer, client); by default
    noise_seed is drawn from `gen`. deadline: time.monotonic() value after which the client gives up
    (ClientTimeout, checked between steps). hook(step, model): called before each step (fault
    injection in tests)."""
    set_lora_state(model, start, strict=True)
    set_phase(model, phase)
    layers = lora_layers(model)
    mech = spec.mechanism.replace(lam=cfg.lam)
    metric = FrozenMetric([(l.name, l) for l in layers], phase, mech.validate(phase, frozen_at_start=True)) \
        if cfg.privacy == "sample" else None
    trained = [l.factor(f) for l in layers for f in l.trained]
    opt = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(y)
    if n == 0:
        raise ValueError("client has no training data")
    steps = cfg.local_steps or local_steps(n, cfg.batch_size, cfg.local_epochs)
    releases: list[tuple[float, float, int]] = []
    model.train()
    for m in model.modules():   # the backbone is frozen, its BatchNorm statistics too (and batch statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):   # would mix samples: no per-sample gradients)
            m.eval()
    last = float("nan")
    q = min(1.0, cfg.batch_size / n)
    if cfg.privacy == "sample" and noise_seed is None:
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            raise ClientTimeout(f"local training passed its deadline after {step}/{steps} steps")
        if hook:
            hook(step, model)
        if cfg.privacy != "sample":
            epoch_step = step % max(1, math.ceil(n / cfg.batch_size))
            if epoch_step == 0:  # a fresh shuffle every pass over the data
                perm = torch.randperm(n, generator=gen)
            idx = perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            for p, g in zip(trained, torch.autograd.grad(loss, trained)):
                p.grad = g
            opt.step()
            last = float(loss.detach())
            continue
        # Poisson sampling: every record independently with probability q (what the accountant assumes)
        idx = (torch.rand(n, generator=gen) < q).nonzero().squeeze(1)
        key = NoiseKey(noise_seed, step, client)
        if len(idx) > 0:
            for l in layers:
                l.capture = True
            try:
                loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum")
                loss.backward()
            finally:
                for l in layers:
                    l.capture = False
            grads, sigma_eff = private_step(layers, phase, mech, cfg, q * n, metric, key)
            last = float(loss.detach()) / len(idx)
        else:
            # An empty Poisson batch releases noise alone (skipping the step would reveal that the
            # batch was empty); it is the same subsampled Gaussian release and is charged the same.
            grads, sigma_eff = private_step(layers, phase, mech, cfg, q * n, metric, key, captured=[])
        for l, gd in zip(layers, grads):
            for f, gf in gd.items():
                p = getattr(l, "lora_" + f)
                p.grad = gf.to(p.dtype)
        opt.step()
        releases.append((float(sigma_eff), q, 1))
    for p in trained:
        p.grad = None
    return ClientUpdate(get_lora_state(model), n, steps, last, _merge(releases))


def _merge(rel: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Consecutive releases with the same (sigma, q) as one (sigma, q, steps) entry."""
    return [(s, q, sum(k for *_, k in g)) for (s, q), g in itertools.groupby(rel, key=lambda t: t[:2])]
