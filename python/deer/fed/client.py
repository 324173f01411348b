"""One client's local training, the same code for every method, engine and privacy level.

The client starts from the global adapters, trains the factors of the current phase with plain SGD
(no optimizer state survives the round) and returns its new adapters. Under sample-level privacy
each step is a DP-SGD step: Poisson sampling of the client's records with rate q = b / n_k (each
record independently), per-sample clipping over all LoRA layers in the method's metric, Gaussian
noise (isotropic, or regulated through the frozen factor), and division by the *expected* batch size
q n_k. `private_step` is the one place that performs it, through deer's kernels:

    deer.ops.per_sample_grad_norm       per-sample gradients of every trained factor and their
                                        squared norms in the clipping metric (C++/OpenMP, CUDA or Triton)
    deer.ops.clip_reduce_noise_grouped  clipped sum + noise of every trained factor in one call (Philox
                                        stream keyed by (seed, step, layer, client)) / expected batch size

The backend comes from LocalTrainConfig.backend (config key `backend`): None picks one for the
tensors' device (or DEER_BACKEND), 'cpu' | 'cuda' | 'triton' force one, and 'reference' runs the
float64 oracle instead (deer.reference for the per-sample gradients, norms and clipping, the ops'
PyTorch reference for the clipped sum and noise). Every backend draws the same noise from the same
key, so the kernel path and the reference path agree to float32 rounding, noise included.
Each step releases one subsampled Gaussian with multiplier sigma (as the accountant is charged) and
rate q; a step whose Poisson batch is empty still releases noise alone and is charged the same.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference as ref
from ..nn.lora import LoRALinear
from ..ops import clip_reduce_noise_grouped, clip_reduce_noise_reference
from ..privacy.clipping import (cholesky_upper, chunk_grads, nonfinite_outputs, nonfinite_sample_mask,
                                zero_samples)
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
    backend: str | None = None      # DP-step backend: None (auto) | cpu | cuda | triton | reference


@dataclass
class ClientUpdate:
    adapters: AdapterState
    num_examples: int
    steps: int
    loss: float
    # sample-level accounting: what this client released, as (noise multiplier, sample rate, steps)
    releases: list[tuple[float, float, int]] = field(default_factory=list)


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


def private_step(layers: list[LoRALinear], phase: str, spec: MethodSpec, cfg: LocalTrainConfig,
                 expected_batch: float, frozen: AdapterState, key: NoiseKey,
                 captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None):
    """One DP-SGD step from the captured (X, U, G) of every LoRA layer (G of the summed loss, so G_i
    is sample i's own output gradient). Returns (per-layer {factor: private gradient}, the noise
    multiplier the accountant must charge).

    captured: one (X, U, G) per layer (default: popped from the layers' capture lists); an empty list
    means an empty Poisson batch, which releases noise alone. Clipping is flat over all trained tensors
    of all layers. The metric gram K of a factor always comes from the *other* factor's value at the
    start of the sub-round (`frozen`, the global adapters, public): in 'A'/'B' phases that is the frozen
    factor itself; in an 'AB' sub-round with the regulated metric (DEeR without the deviation
    eliminator) both factors train and each is measured and noised through the other's starting value.
    The whitening (g_A, g_B) -> (R_A g_A, g_B R_B^T) is then still a fixed bijection, so joint clipping
    to C plus noise of covariance K^{-1} is the Gaussian mechanism with sensitivity C."""
    if captured is None:
        captured = []
        for lyr in layers:
            cap = lyr.pop_captured()
            if len(cap) != 1:
                raise RuntimeError(f"LoRA layer {lyr.name} captured {len(cap)} batches, expected 1")
            captured.append(cap[0])
    empty = len(captured) == 0
    if not empty and len(captured) != len(layers):
        raise ValueError(f"captured holds {len(captured)} batches for {len(layers)} LoRA layers")
    reference = cfg.backend == "reference"
    backend = None if reference else cfg.backend
    need_gram = spec.metric == "regulated" or spec.noise == "regulated"
    C, sigma = float(cfg.max_grad_norm), float(cfg.noise_multiplier)

    # per trained tensor: (layer index, factor, per-sample grads (b, p, q), squared norms (b,), K)
    tensors = []
    for li, lyr in enumerate(layers):
        A, B = lyr.lora_A.detach(), lyr.lora_B.detach()
        acc = torch.float64 if (reference or A.dtype == torch.float64) else torch.float32
        start = frozen[lyr.name]
        for f in ref.trained_factors(phase):
            K = ref.metric_gram(start["A"].to(acc), start["B"].to(acc), f, cfg.lam) if need_gram else None
            gram = K if spec.metric == "regulated" else None
            if empty:
                shape = tuple((A if f == "A" else B).shape)
                tensors.append((li, f, torch.zeros((1,) + shape, dtype=acc, device=A.device), None, K))
                continue
            if reference:
                X, _U, G = captured[li]
                g = ref.per_sample_grads(X.to(acc), G.to(acc), A.to(acc), B.to(acc), lyr.scale, f)[f]
                n = ref.sq_norms(g, f, gram)
            else:   # the PrivacyEngine's per-chunk path; G is of the summed loss, so no mean undone
                g, n = chunk_grads(lyr, f, captured[li], gram, loss_reduction="sum", backend=backend)
            tensors.append((li, f, g, n, K))

    if empty:
        clip = None
    else:
        # A sample with a NaN/Inf gradient in any trained tensor is dropped from the sum (as the
        # PrivacyEngine does): zeroed gradient and norm, clip factor 0. Dropping a sample only removes
        # a term, so the sensitivity and the charge stay the same.
        bad = nonfinite_sample_mask([n for _, _, _, n, _ in tensors])
        if bad is not None:
            warnings.warn(f"deer: {int(bad.sum())} sample(s) of client {key.client} had NaN/Inf per-sample gradients "
                          f"at step {key.step} and were dropped from the private sum; check those records' inputs "
                          f"and loss.", RuntimeWarning, stacklevel=2)
            tensors = [(li, f, zero_samples(g, bad), zero_samples(n, bad), K) for li, f, g, n, K in tensors]
        total = torch.stack([n.to(torch.float64 if reference else n.dtype) for _, _, _, n, _ in tensors]).sum(0)
        clip = ref.clip_factors(total, C)
        if bad is not None:
            clip = zero_samples(clip, bad)

    out: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    clips, chols, sides, layer_ids = [], [], [], []
    chol_of = ref.cholesky_upper if reference else cholesky_upper
    for li, f, g, _, K in tensors:
        clips.append(torch.zeros(1, dtype=g.dtype, device=g.device) if clip is None else clip.to(g.dtype))
        sides.append(0 if f == "A" else 1)
        layer_ids.append(2 * li + sides[-1])
        chols.append(chol_of(K) if spec.noise == "regulated" else None)
    grads = [g for _, _, g, _, _ in tensors]
    if reference:
        res = [clip_reduce_noise_reference(g, c, sigma * C, float(expected_batch), ch, s, key.seed, key.step, lid,
                                           key.client)
               for g, c, ch, s, lid in zip(grads, clips, chols, sides, layer_ids)]
    else:   # every trained tensor's release in one grouped call (same keys as one call per tensor)
        res = clip_reduce_noise_grouped(grads, clips, sigma * C, float(expected_batch), chols, sides, key.seed,
                                        key.step, layer_ids, key.client, backend=backend)
    # One finiteness check for the whole release, before anything reaches the weights.
    bad_out = nonfinite_outputs(res)
    if bad_out:
        names = [f"{layers[tensors[k][0]].name}.lora_{tensors[k][1]}" for k in bad_out]
        raise FloatingPointError(f"deer: the private gradient of {', '.join(names)} is not finite although every "
                                 f"per-sample gradient was (client {key.client}, step {key.step}); refusing the step "
                                 f"(check lam and the frozen factor)")
    for (li, f, *_), r in zip(tensors, res):
        out[li][f] = r
    eff = ref.effective_multiplier(sigma, spec.metric, spec.noise, [K for *_, K in tensors]) if sigma > 0 else sigma
    return out, eff


def local_train(model: nn.Module, start: AdapterState, x: torch.Tensor, y: torch.Tensor, phase: str,
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
        if noise_seed is None:
            noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        for step in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                raise ClientTimeout(f"local training passed its deadline after {step}/{steps} steps")
            if hook:
                hook(step, model)
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
                grads, sigma_eff = private_step(layers, phase, spec, cfg, q * n, start, key)
                last = float(loss.detach()) / len(idx)
            else:
                # An empty Poisson batch releases noise alone (skipping the step would reveal that the
                # batch was empty); it is the same subsampled Gaussian release and is charged the same.
                grads, sigma_eff = private_step(layers, phase, spec, cfg, q * n, start, key, captured=[])
            with torch.no_grad():
                for l, gd in zip(layers, grads):
                    for f, gf in gd.items():
                        p = getattr(l, "lora_" + f)
                        p.sub_(cfg.lr * gf.to(p.dtype))
            for p in trained:
                p.grad = None
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
