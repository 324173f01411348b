"""The one private release of deer: per-sample gradients of the trained LoRA factors in, the noisy
clipped sum divided by the expected batch size out, with the multiplier the accountant must charge.

The drop-in `DPLoRAOptimizer`, the federated client's `private_step` and the audit all release
through `release()` (docs/design.md section 8):

    per_sample_tensors   per-sample gradients and squared norms of every trained factor, from the
                         (X, U, G) chunks the LoRA layers captured (deer.ops.per_sample_grad_norm)
    release              drop NaN/Inf samples, clip (flat or per layer), clipped sum + noise of every
                         tensor in one grouped call (deer.ops.clip_reduce_noise_grouped, Philox keys
                         (seed, step, layer, client)), check the result is finite

`FrozenMetric` holds, for every trained factor, K = frozen^T frozen + lam I and its Cholesky
factor: fixed while a phase lasts, so it is built when the phase is set and rebuilt only for a unit
whose frozen factor was changed in place since (load_state_dict, aggregation). The helpers at the
end (chunk_grads, clip_factors, the NaN/Inf masks, cholesky_upper) serve only this release.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import reference as ref
from ..nn.lora import Captured, unit_factors
from ..ops import per_sample_grad_norm
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
            for f in unit_factors(u, phase):
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
            for f in unit_factors(u, self.phase):
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
        grams = [e[2][torch.float64][0] for e in self._entries.values()]
        return self.mechanism.effective_multiplier(noise_multiplier, grams)


def per_sample_tensors(units: Sequence[tuple[str, object]], chunks: Sequence[Sequence], metric: FrozenMetric,
                       loss_reduction: str, backend: str | None) -> list[TensorGrads]:
    """TensorGrads of every trained factor of every unit, from each unit's captured chunks (one
    chunk per backward call; several = gradient accumulation over physical batches of one logical
    batch). loss_reduction: 'mean' (the loss averaged over each physical batch: undone, so g_i is
    sample i's own gradient) or 'sum'. backend='reference' runs the float64 oracle. Several uses of
    a layer on the same samples are summed per sample first (physical_batches)."""
    regulated_metric = metric.mechanism.metric == "regulated"
    out = []
    for li, ((name, u), cs) in enumerate(zip(units, chunks)):
        cs = physical_batches(u, cs)
        acc = release_dtype(u.lora_A, backend)
        if acc == torch.float64:
            cs = [Captured(*(None if t is None else t.double() for t in c), V=None if getattr(c, "V", None) is None else c.V.double())
                  for c in cs]
        for f in unit_factors(u, metric.phase):
            K, R = metric.get(li, f, acc)
            gs, ns = [], []
            for chunk in cs:
                g, n = chunk_grads(u, f, chunk, K if regulated_metric else None, loss_reduction, backend)
                gs.append(g)
                ns.append(n)
            g = n = None
            if gs:
                g, n = (gs[0], ns[0]) if len(gs) == 1 else (torch.cat(gs), torch.cat(ns))
            out.append(TensorGrads(f"{name}.lora_{f}", f, 2 * li + (0 if f == "A" else 1), u.factor(f), g, n, R, acc))
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
                         f"dim 0 of every LoRA layer's input as the sample dimension, so per-sample gradients "
                         f"cannot be attributed where a model folds tokens into the batch (x.view(-1, n)) or "
                         f"stacks two views of the batch along dim 0 (torch.cat([x1, x2])) before a LoRA layer, or calls it "
                             f"on an input the whole batch shares (position ids of shape (1, T) or (T,)): "
                         f"the layers whose count differs from the batch size are the ones to change (call "
                         f"them on (batch, ...) tensors, once per view).")
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
        cs, total_norm = clip_factors(tensors, mechanism.clipping, max_grad_norm, batch, bad)
    else:
        cs, total_norm = [None] * len(tensors), None
    std = float(noise_multiplier) * sens
    grads, clips = [], []
    for t, c in zip(tensors, cs):
        g = t.grads
        if g is None or g.shape[0] == 0:   # no samples reached this layer (an empty batch): pure noise
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


# --- per-sample gradients, clipping and finiteness, for the release above ---------------------

def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(b, n) -> (b, 1, n); (b, T, n) as is; (b, d1, d2, ..., n) -> (b, d1*d2*..., n)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    if t.dim() > 3:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    raise ValueError(f"a LoRA layer's input must have a batch dimension, got shape {tuple(t.shape)}")


def physical_batches(unit, chunks: Sequence[Captured]) -> list[Captured]:
    """One capture per physical batch of `unit`'s captures: the uses of the layer on the same samples
    (captures of one backward pass or of one forward call, Captured.task / .call) joined along the
    token axis. A sample's gradient of a factor is a sum over the rows (tokens) of its G and X / U, so
    joining its uses' rows makes its per-sample gradient the sum over all uses, and its norm and clip
    cover them together: one record still moves the clipped sum by at most C (docs/design.md
    section 2). Different backward passes over different forward calls stay separate batches
    (gradient accumulation)."""
    if len(chunks) <= 1:
        return list(chunks)
    root = list(range(len(chunks)))

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    first: dict[tuple[str, int], int] = {}
    for i, c in enumerate(chunks):
        for key in (("task", c.task), ("call", c.call)):
            j = first.setdefault(key, i)
            root[find(i)] = find(j)
    groups: dict[int, list[Captured]] = {}
    for i, c in enumerate(chunks):
        groups.setdefault(find(i), []).append(c)
    out = []
    for uses in groups.values():
        if len(uses) == 1:
            out.append(uses[0])
            continue
        sizes = sorted({c[2].shape[0] for c in uses})
        if len(sizes) > 1:
            raise ValueError(f"LoRA layer {unit.name!r} was used {len(uses)} times on the same samples with different "
                             f"leading sizes {sizes}, so deer cannot tell which rows belong to which sample. deer "
                             f"treats dim 0 of every use's input as the sample dimension: call the layer once per "
                             f"view on (batch, ...) tensors instead of folding tokens or views into dim 0.")

        def join(ts):
            return None if ts[0] is None else torch.cat([_tokens(t) for t in ts], dim=1)
        X, U, G = (join([c[k] for c in uses]) for k in range(3))
        out.append(Captured(X, U, G, V=join([c.V for c in uses]), task=uses[0].task, call=uses[0].call))
    return out


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


def clip_factors(tensors, clipping: str, max_grad_norm, batch: int, bad: torch.Tensor | None):
    """Per-tensor clip factors (list of (b,) tensors, 0 for the samples in `bad`) and the per-sample
    norms over all trained tensors. flat: c_i = min(1, C / (N_i + 1e-6)), N_i^2 = sum over all
    trained tensors of their squared norms. per_layer: tensor l gets its own bound C_l (a scalar C
    is split as C / sqrt(L)); the sensitivity is Mechanism.sensitivity's."""
    present = [t.sq_norms for t in tensors if t.sq_norms is not None]
    dev = present[0].device if present else tensors[0].param.device
    # fp32 norms from the kernels, fp64 when the model runs in fp64 (the reference tests)
    acc = torch.float64 if any(n.dtype == torch.float64 for n in present) else torch.float32
    zeros = torch.zeros(batch, dtype=acc, device=dev)
    norms = [t.sq_norms.to(acc) if t.sq_norms is not None else zeros for t in tensors]
    total = torch.stack(norms).sum(0)
    if clipping == "flat":
        cs = [ref.clip_factors(total, float(max_grad_norm))] * len(tensors)
    else:
        cs = [ref.clip_factors(n, Cl) for n, Cl in zip(norms, ref.per_layer_bounds(max_grad_norm, len(tensors)))]
    if bad is not None:
        cs = [zero_samples(c, bad) for c in cs]
    return cs, total.sqrt()
