"""The one private release of deer: per-sample gradients of the trained LoRA factors in, the noisy
clipped sum divided by the expected batch size out, with the multiplier the accountant must charge.

The drop-in `DPLoRAOptimizer`, the federated client's `private_step` and the audit all release
through `release()` (docs/design.md section 8):

    per_sample_tensors   per-sample gradients and squared norms of every trained factor, from the
                         (X, U, G) chunks the LoRA layers captured (deer.ops.per_sample_grad_norm)
    release              drop NaN/Inf samples, clip (flat or per layer), clipped sum + noise of every
                         tensor in one grouped call (deer.ops.clip_reduce_noise_grouped, Philox keys
                         (seed, step, layer, client)), check the result is finite

`FrozenMetric` holds, for every trained factor, K = frozen^T frozen + lam I and its Cholesky factor:
fixed while a phase lasts, so it is built when the phase is set and rebuilt only for a unit whose
frozen factor was changed in place since (load_state_dict, aggregation).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import reference as ref
from .clipping import (chunk_grads, cholesky_upper, clip_factors, nonfinite_outputs, nonfinite_sample_mask,
                       zero_samples)
from ..nn.lora import Captured
from .mechanism import Mechanism


@dataclass
class TensorGrads:
    """Per-sample gradients of one trained factor of one LoRA unit."""
    name: str                       # '<unit name>.lora_A' / '.lora_B'
    factor: str                     # 'A' or 'B'
    layer_id: int                   # noise key component: 2 * unit index + (0 for A, 1 for B)
    param: torch.nn.Parameter
    grads: torch.Tensor | None      # (b, p, q), or None when the unit saw no samples this step
    sq_norms: torch.Tensor | None   # (b,) in the clipping metric
    gram: torch.Tensor | None       # K (r x r) when the mechanism needs it
    chol: torch.Tensor | None       # R with K = R^T R when the noise is regulated
    dtype: torch.dtype              # the release's accumulation dtype

    @property
    def noise_side(self) -> int:
        return 0 if self.factor == "A" else 1


def release_dtype(param: torch.Tensor, backend: str | None) -> torch.dtype:
    """float64 for the reference backend (the float64 oracle) and float64 models, else float32 (the
    kernels accumulate in fp32 for fp32, bf16 and fp16 inputs)."""
    return torch.float64 if (backend == "reference" or param.dtype == torch.float64) else torch.float32


class FrozenMetric:
    """K and R (K = R^T R) of every trained factor of `units` in `phase`, built in float64 from the
    other factor's value now (the start of the phase / federated sub-round). Entries are None where
    the mechanism needs no gram."""

    def __init__(self, units: Sequence[tuple[str, object]], phase: str, mechanism: Mechanism):
        self.phase, self.mechanism = phase, mechanism
        self.factors = ref.trained_factors(phase)
        self._entries: dict[tuple[int, str], tuple] = {}
        self._units = list(units)
        for li, (_, u) in enumerate(self._units):
            for f in self.factors:
                self._build(li, u, f)

    def _build(self, li: int, unit, f: str) -> None:
        src = unit.lora_A if f == "B" else unit.lora_B
        K = R = None
        if self.mechanism.needs_gram:
            A, B = unit.lora_A.detach().double(), unit.lora_B.detach().double()
            K = ref.metric_gram(A, B, f, self.mechanism.lam)
            if self.mechanism.noise == "regulated":
                R = cholesky_upper(K, where=f"{unit.name}.lora_{f}")
        self._entries[(li, f)] = (src._version, src.data_ptr(), {torch.float64: (K, R)})

    def refresh(self) -> None:
        """Rebuild the entries whose frozen factor changed in place since they were built (the
        version counter moves on every in-place write). In phase 'AB' both factors train and K stays
        the one of the phase's start: there the federated sub-round's fixed K is the point."""
        if not self.mechanism.needs_gram or self.phase == "AB":
            return
        for li, (_, u) in enumerate(self._units):
            for f in self.factors:
                src = u.lora_A if f == "B" else u.lora_B
                ver, ptr, _ = self._entries[(li, f)]
                if ver != src._version or ptr != src.data_ptr():
                    self._build(li, u, f)

    def get(self, li: int, f: str, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, R) of factor f of unit li in `dtype` (cast once from float64, then kept)."""
        by_dtype = self._entries[(li, f)][2]
        if dtype not in by_dtype:
            K, R = by_dtype[torch.float64]
            by_dtype[dtype] = tuple(None if t is None else t.to(dtype) for t in (K, R))
        return by_dtype[dtype]

    def effective_multiplier(self, noise_multiplier: float) -> float:
        grams = [self._entries[(li, f)][2][torch.float64][0] for li in range(len(self._units)) for f in self.factors]
        return self.mechanism.effective_multiplier(noise_multiplier, grams)


def per_sample_tensors(units: Sequence[tuple[str, object]], chunks: Sequence[Sequence], metric: FrozenMetric,
                       loss_reduction: str, backend: str | None) -> list[TensorGrads]:
    """TensorGrads of every trained factor of every unit, from each unit's captured chunks (one
    chunk per backward call; several = gradient accumulation over physical batches of one logical
    batch). loss_reduction: 'mean' (the loss averaged over each physical batch: undone, so g_i is
    sample i's own gradient) or 'sum'. backend='reference' runs the float64 oracle."""
    regulated_metric = metric.mechanism.metric == "regulated"
    out = []
    for li, ((name, u), cs) in enumerate(zip(units, chunks)):
        acc = release_dtype(u.lora_A, backend)
        if acc == torch.float64:
            cs = [Captured(*(None if t is None else t.double() for t in c), V=None if getattr(c, "V", None) is None
                           else c.V.double()) for c in cs]
        for f in metric.factors:
            K, R = metric.get(li, f, acc)
            gs, ns = [], []
            for chunk in cs:
                g, n = chunk_grads(u, f, chunk, K if regulated_metric else None, loss_reduction, backend)
                gs.append(g)
                ns.append(n)
            g = n = None
            if gs:
                g, n = (gs[0], ns[0]) if len(gs) == 1 else (torch.cat(gs), torch.cat(ns))
            out.append(TensorGrads(f"{name}.lora_{f}", f, 2 * li + (0 if f == "A" else 1), u.factor(f), g, n, K, R,
                                   acc))
    return out


@dataclass
class Release:
    grads: list[torch.Tensor]            # the private gradient of every tensor (the fused step: its output)
    noise_multiplier: float              # what the accountant must charge for this release
    sensitivity: float
    noise_std: float
    batch_size: int
    dropped_nonfinite: int
    clip: list[torch.Tensor | None]      # per-tensor clip factors (b,), None for an empty batch
    per_sample_norms: torch.Tensor | None


class NonFiniteRelease(FloatingPointError):
    """The release is not finite although every per-sample gradient was (lam, the frozen factor)."""


def release(tensors: list[TensorGrads], mechanism: Mechanism, *, noise_multiplier: float, max_grad_norm,
            expected_batch_size: float, seed: int, step: int, client: int, backend: str | None,
            effective_multiplier: float, updates=None, where: str = "") -> Release:
    """The private release of `tensors` (see the module docstring). `effective_multiplier` is the
    FrozenMetric's for `noise_multiplier` (the caller has checked the budget with it before).
    updates: a FusedUpdate or None per tensor (the optimizer steps inside the kernel). A unit that saw
    no sample (an empty Poisson batch) releases noise alone. Raises NonFiniteRelease before returning
    anything when the result is not finite."""
    sizes = {t.name: t.grads.shape[0] for t in tensors if t.grads is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"LoRA layers saw different numbers of samples in this step: {sizes}. deer treats "
                         f"dim 0 of every LoRA layer's input as the sample dimension; a model that folds "
                         f"tokens into the batch (x.view(-1, n)) before a LoRA layer is not supported.")
    batch = next(iter(sizes.values()), 0)

    # A sample with a NaN/Inf gradient in any trained tensor is dropped from the sum: zeroed gradient
    # and norm, clip factor 0. Dropping a sample only removes a term: sensitivity and charge stay.
    bad = nonfinite_sample_mask([t.sq_norms for t in tensors])
    nbad = int(bad.sum()) if bad is not None else 0
    if nbad:
        for t in tensors:
            if t.sq_norms is not None:
                t.sq_norms, t.grads = zero_samples(t.sq_norms, bad), zero_samples(t.grads, bad)
        warnings.warn(f"deer: {nbad} sample(s){where} had NaN/Inf per-sample gradients and were dropped from the "
                      f"private sum; check the loss and inputs of those samples.", RuntimeWarning, stacklevel=3)

    sens = mechanism.sensitivity(max_grad_norm, len(tensors))
    if batch > 0:
        cs, _, total_norm = clip_factors(tensors, mechanism.clipping, max_grad_norm, batch, bad)
    else:
        cs, total_norm = [None] * len(tensors), None
    std = float(noise_multiplier) * sens
    grads, clips = [], []
    for t, c in zip(tensors, cs):
        g = t.grads
        if g is None:   # no samples reached this layer: the release is pure noise
            g, c = torch.zeros((1,) + tuple(t.param.shape), dtype=t.dtype, device=t.param.device), None
        grads.append(g)
        clips.append(torch.zeros(1, dtype=g.dtype, device=g.device) if c is None else c.to(g.dtype))

    from .. import ops
    updates = [None] * len(tensors) if updates is None else list(updates)
    chols, sides, lids = [t.chol for t in tensors], [t.noise_side for t in tensors], [t.layer_id for t in tensors]
    if len({g.device for g in grads}) <= 1:   # one parallel region / one launch for all tensors
        outs = ops.clip_reduce_noise_grouped(grads, clips, std, float(expected_batch_size), chols, sides, seed, step,
                                             lids, client, backend=backend, updates=updates)
    else:   # a model split over devices: the same keys, one call per tensor
        outs = [ops.clip_reduce_noise(g, c, std, float(expected_batch_size), ch, s, seed, step, lid, client,
                                      backend=backend, update=u)
                for g, c, ch, s, lid, u in zip(grads, clips, chols, sides, lids, updates)]
    # One finiteness check for all tensors (one host sync on a GPU), before anything reaches a .grad.
    bad_out = nonfinite_outputs(outs)
    if bad_out:
        raise NonFiniteRelease(f"deer: the private gradient of {', '.join(tensors[k].name for k in bad_out)} is not "
                               f"finite although every per-sample gradient was{where}; refusing the step (check "
                               f"lam and the frozen factor).")
    return Release(outs, float(effective_multiplier), sens, std, batch, nbad, cs, total_norm)
