"""clip_reduce_noise: the clipped, noised mean gradient of one trained LoRA factor.

    out = (sum_i clip_i * g_i + noise_std * xi) / expected_batch_size           g: (b, p, q) -> (p, q)

    xi = Z                  chol None: isotropic noise
    xi = R^{-1} Z           chol = R (r x r upper, K = R^T R), noise_side = 0, p = r  (A phase)
    xi = Z R^{-T}           noise_side = 1, q = r                                     (B phase)

Regulated xi has covariance K^{-1} per column (side 0) or per row (side 1): the low-cost form of
DEeR's noise regulator (docs/design.md section 5). Z ~ N(0, I) comes from a counter-based
Philox4x32-10 stream keyed by (seed, step, layer, client) (docs/design.md section 7): the same key
reproduces the output, distinct keys give independent streams. Counter layout
(csrc/clip_reduce_noise/philox.h): key = seed (64 bit), counter = (j, layer, step, client) with
j = e // 2 the pair index of row-major element e; Box-Muller turns one Philox call into the normals
of elements 2j and 2j + 1. Valid for step, layer, client < 2^32 and p * q <= 2^33. noise_std = 0
gives exactly the clipped sum / expected_batch_size.

clip_reduce_noise_fused gives the same result from the factors (left (b, T, p), right (b, T, q),
g_i = scale * L_i^T R_i) as one weighted GEMM, never materialising per-sample gradients.
Output: fp32, or fp64 for fp64 inputs.

Fused optimizer step: clip_reduce_noise(..., update=FusedUpdate(...)) and clip_reduce_noise_grouped(...,
updates=[...]) also apply torch.optim's SGD / Adam / AdamW step to the factor where the kernel writes
each element of the private gradient (csrc/clip_reduce_noise/fused_update.h), so the gradient never
goes through .grad and a second optimizer pass. The optimizer state lives in the optimizer's own
state dict under torch's names, so fused and unfused steps can be mixed and checkpoints load either
way. An element whose private gradient is not finite is not stepped; the returned gradient shows it.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import acc_dtype, resolve_backend

_MASK32 = 0xFFFFFFFF
_U32 = 1 << 32


def _seed_i64(seed: int) -> int:
    """The seed's 64-bit pattern as a signed int64 (the op schema's int)."""
    seed = int(seed) & ((1 << 64) - 1)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _check_key(step, layer, client):
    for name, v in (("step", step), ("layer", layer), ("client", client)):
        if not 0 <= int(v) < _U32:
            raise ValueError(f"clip_reduce_noise: {name} must lie in [0, 2^32) (a 32-bit Philox counter word), got {v}")


def philox_normal_reference(shape, seed: int, step: int, layer: int, client: int,
                            device=None) -> torch.Tensor:
    """Z (float64) exactly as the kernels draw it: Philox4x32-10 in int64 arithmetic (uint32 words
    kept in the low bits, products wrap mod 2^64 exactly as unsigned ones), then Box-Muller."""
    _check_key(step, layer, client)
    numel = math.prod(shape)
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, seed >> 32
    j = torch.arange((numel + 1) // 2, dtype=torch.int64, device=device)
    c = [j, torch.full_like(j, int(layer)), torch.full_like(j, int(step)), torch.full_like(j, int(client))]
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    for _ in range(10):
        p0, p1 = c[0] * M0, c[2] * M1                     # exact low 64 bits of the 64-bit products
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + W0) & _MASK32, (k1 + W1) & _MASK32
    a = (c[1] << 32) | c[0]                                # 64-bit words (sign bit may be set)
    b = (c[3] << 32) | c[2]
    # Top 53 bits as non-negative integers: logical shift of the int64 pattern.
    a53 = (a >> 11) & ((1 << 53) - 1)
    b53 = (b >> 11) & ((1 << 53) - 1)
    u1 = (a53.to(torch.float64) + 1.0) * 2.0 ** -53       # (0, 1]
    u2 = b53.to(torch.float64) * 2.0 ** -53               # [0, 1)
    rad = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.stack([rad * torch.cos(theta), rad * torch.sin(theta)], dim=1).reshape(-1)[:numel]
    return z.reshape(shape)


_UPDATE_KINDS = {"sgd": 1, "adam": 2, "adamw": 3}
_NO_UPDATE_HYPER = [0.0] * 12   # kUpdateHyperWidth in csrc/clip_reduce_noise/fused_update.h


@dataclasses.dataclass
class FusedUpdate:
    """One trained factor's optimizer step, fused into clip_reduce_noise.

    param: the factor (fp32, or fp64 with fp64 gradients), stepped in place. state: that optimizer's
    state dict for the factor (optimizer.state[param]); buffers are created and advanced exactly as
    torch.optim does. kind: 'sgd' (momentum, dampening, nesterov, weight_decay), 'adam' (L2
    weight_decay) or 'adamw' (decoupled weight_decay); betas and eps for the Adam kinds.
    `FusedUpdate.from_optimizer(opt, param)` reads all of it from a torch.optim SGD / Adam / AdamW."""
    param: torch.Tensor
    state: dict
    kind: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict | None = None
                       ) -> "FusedUpdate":
        """`group`: param's group when the caller knows it (a per-step loop over many factors), else
        looked up."""
        if group is None:
            group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
        if group is None:
            raise ValueError("FusedUpdate.from_optimizer: the parameter is not in any of the optimizer's param groups")
        name = type(optimizer).__name__

        def refuse(option):
            raise ValueError(f"fused optimizer step: {name}({option}=True) is not supported (deer fuses plain "
                             f"SGD / Adam / AdamW steps); construct the optimizer without it, or step unfused "
                             f"(fused_update=False)")
        for option in ("maximize", "differentiable"):
            if group.get(option):
                refuse(option)
        f = float
        if isinstance(optimizer, torch.optim.SGD):
            return cls(param, optimizer.state[param], "sgd", f(group["lr"]), f(group["weight_decay"]),
                       f(group["momentum"]), f(group["dampening"]), bool(group["nesterov"]))
        if isinstance(optimizer, torch.optim.Adam):   # AdamW is an Adam with decoupled weight decay
            for option in ("amsgrad", "capturable", "fused"):   # (capturable/fused keep `step` on the device)
                if group.get(option):
                    refuse(option)
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            b1, b2 = group["betas"]
            return cls(param, optimizer.state[param], "adamw" if decoupled else "adam", f(group["lr"]),
                       f(group["weight_decay"]), betas=(f(b1), f(b2)), eps=f(group["eps"]))
        raise TypeError(f"fused optimizer step: supports torch.optim.SGD, Adam and AdamW, got {name}; step "
                        f"unfused (fused_update=False) for other optimizers")

    def pack(self, out_dtype: torch.dtype, shape, device):
        """(update_tensors, update_hyper, commit) for the kernels; commit() advances the state dict
        after the op succeeded (a refused call leaves the optimizer state as it was)."""
        kind = _UPDATE_KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"FusedUpdate.kind must be one of {sorted(_UPDATE_KINDS)}, got {self.kind!r}")
        p = self.param
        if p.dtype != out_dtype or tuple(p.shape) != tuple(shape) or p.device != torch.device(device):
            raise ValueError(f"fused optimizer step: the parameter must match the private gradient: {tuple(shape)} "
                             f"{out_dtype} on {device} (fp32, or fp64 for fp64 gradients); got {tuple(p.shape)} "
                             f"{p.dtype} on {p.device}. Keep LoRA factors in fp32 or step unfused.")
        if not p.is_contiguous():
            raise ValueError("fused optimizer step: the parameter must be contiguous")
        st, empty = self.state, p.new_empty(0)
        first, step_size, bias2_sqrt, new = False, 0.0, 1.0, {}
        b1 = b2 = empty
        if kind == 1:
            if self.momentum != 0:
                b1 = st.get("momentum_buffer")
                first = b1 is None
                if first:       # torch clones d on the first step; the kernel writes every finite element
                    b1 = torch.zeros_like(p)
                new["momentum_buffer"] = b1
        else:
            if "step" not in st:   # torch's lazy init (Adam._init_group, capturable/fused off)
                from torch.optim.optimizer import _get_scalar_dtype
                new["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                new["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                new["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_t = new.get("step", st.get("step"))
            b1, b2 = new.get("exp_avg", st.get("exp_avg")), new.get("exp_avg_sq", st.get("exp_avg_sq"))
            t = float(step_t) + 1.0
            beta1, beta2 = self.betas
            step_size = self.lr / (1.0 - beta1 ** t)
            bias2_sqrt = (1.0 - beta2 ** t) ** 0.5
        hyper = [float(kind), self.lr, self.weight_decay, self.momentum, self.dampening, float(self.nesterov),
                 float(first), float(self.betas[0]), float(self.betas[1]), self.eps, step_size, bias2_sqrt]

        def commit():
            st.update(new)
            if kind != 1:
                st["step"] += 1      # in place, as torch advances its step tensor
            torch.autograd.graph.increment_version([p, b1, b2])
        return [p, b1, b2], hyper, commit


def _apply_update_reference(g, tensors, hyper):
    """The fused step in PyTorch ops: torch.optim's own tensor ops (add with alpha, lerp, addcmul,
    addcdiv: fused_update.h's formulas and roundings), in the parameter's dtype."""
    kind = int(hyper[0])
    if kind == 0:
        return
    param, b1, b2 = tensors
    _, lr, wd, mom, damp, nesterov, first, beta1, beta2, eps, step_size, bias2_sqrt = hyper
    g = g.to(param.dtype)
    ok = torch.isfinite(g)
    g = torch.where(ok, g, 0.0)
    p = param.clone()
    if kind == 1:
        d = g.add(p, alpha=wd) if wd != 0 else g
        if mom != 0:
            buf = d.clone() if first else b1.mul(mom).add(d, alpha=1.0 - damp)
            b1.copy_(torch.where(ok, buf, b1))
            d = d.add(buf, alpha=mom) if nesterov else buf
        new = p.add(d, alpha=-lr)
    else:
        if wd != 0:
            if kind == 3:
                p = p.mul(1.0 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m = b1.lerp(g, 1.0 - beta1)
        v = b2.mul(beta2).addcmul(g, g, value=1.0 - beta2)
        new = p.addcdiv(m, (v.sqrt() / bias2_sqrt).add(eps), value=-step_size)
        b1.copy_(torch.where(ok, m, b1))
        b2.copy_(torch.where(ok, v, b2))
    param.copy_(torch.where(ok, new, param))


def _check(grads_shape, clip, noise_std, expected_batch_size, chol, noise_side, step, layer, client, what):
    b, p, q = grads_shape
    if clip.dim() != 1 or clip.shape[0] != b:
        raise ValueError(f"{what}: clip must be (b,) = ({b},) with one factor per sample, got {tuple(clip.shape)}")
    if not noise_std >= 0 or not math.isfinite(noise_std):
        raise ValueError(f"{what}: noise_std must be finite and >= 0, got {noise_std}")
    if not expected_batch_size > 0:
        raise ValueError(f"{what}: expected_batch_size must be > 0, got {expected_batch_size}")
    _check_key(step, layer, client)
    if chol is not None:
        if noise_side not in (0, 1):
            raise ValueError(f"{what}: noise_side must be 0 (A phase, xi = R^-1 Z) or 1 (B phase, xi = Z R^-T), "
                             f"got {noise_side}")
        r = p if noise_side == 0 else q
        if tuple(chol.shape) != (r, r):
            raise ValueError(f"{what}: chol must be the ({r}, {r}) upper Cholesky factor of K for noise_side="
                             f"{noise_side} and gradients ({p}, {q}), got {tuple(chol.shape)}")


def _noise_reference(S, noise_std, chol, noise_side, seed, step, layer, client):
    if noise_std == 0:
        return S
    if chol is not None:   # the kernels' rule: a positive, finite diagonal and a finite upper triangle
        R = chol.to(torch.float64).triu()
        if not bool((R.diagonal() > 0).all() and torch.isfinite(R).all()):
            raise ValueError(f"clip_reduce_noise: chol must be the upper Cholesky factor of a positive definite K "
                             f"(finite, positive diagonal); got diagonal {R.diagonal().cpu()}. Use a ridge lambda > 0 "
                             f"when the frozen factor is rank deficient (B = 0 at initialisation).")
    Z = philox_normal_reference(tuple(S.shape), seed, step, layer, client, device=S.device)
    if chol is not None:
        if noise_side == 0:
            Z = torch.linalg.solve_triangular(R, Z, upper=True)
        else:
            Z = torch.linalg.solve_triangular(R.mT, Z, upper=False, left=False)
    return S + noise_std * Z.to(S.dtype)


def clip_reduce_noise_reference(grads, clip, noise_std, expected_batch_size, chol=None, noise_side=1,
                                seed=0, step=0, layer=0, client=0):
    """PyTorch-ops twin of clip_reduce_noise (same Philox stream); float64 in -> float64 out."""
    _check(tuple(grads.shape), clip, noise_std, expected_batch_size, chol, noise_side, step, layer, client,
           "clip_reduce_noise")
    acc = acc_dtype(grads.dtype)
    S = torch.einsum("b,bpq->pq", clip.to(acc), grads.to(acc))
    return _noise_reference(S, noise_std, chol, noise_side, seed, step, layer, client) / expected_batch_size


def clip_reduce_noise_fused_reference(left, right, scale, clip, noise_std, expected_batch_size, chol=None,
                                      noise_side=1, seed=0, step=0, layer=0, client=0):
    acc = acc_dtype(left.dtype)
    g = scale * torch.einsum("btp,btq->bpq", left.to(acc), right.to(acc))
    return clip_reduce_noise_reference(g, clip, noise_std, expected_batch_size, chol, noise_side, seed, step,
                                       layer, client)


@torch.no_grad()
def clip_reduce_noise(grads: torch.Tensor, clip: torch.Tensor, noise_std: float, expected_batch_size: float,
                      chol: torch.Tensor | None = None, noise_side: int = 1, seed: int = 0, step: int = 0,
                      layer: int = 0, client: int = 0, backend: str | None = None,
                      update: FusedUpdate | None = None) -> torch.Tensor:
    """(sum_i clip_i grads_i + noise_std * xi) / expected_batch_size, see the module docstring.
    With `update`, also steps update.param in place (the fused optimizer step)."""
    if grads.dim() != 3:
        raise ValueError(f"clip_reduce_noise: grads must be (b, p, q) per-sample gradients, got {tuple(grads.shape)}")
    _check(tuple(grads.shape), clip, float(noise_std), float(expected_batch_size), chol, noise_side, step, layer,
           client, "clip_reduce_noise")
    bk = resolve_backend(grads.device, backend, op="clip_reduce_noise", dtype=grads.dtype)
    ut, uh, commit = [], [], None
    if update is not None:
        ut, uh, commit = update.pack(acc_dtype(grads.dtype), grads.shape[1:], grads.device)
    if bk == "reference":
        out = clip_reduce_noise_reference(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed,
                                          step, layer, client)
        if update is not None:
            _apply_update_reference(out, ut, uh)
    elif bk == "triton":
        from deer_kernels.clip_reduce_noise import clip_reduce_noise as triton_op
        out = triton_op(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed, step, layer, client,
                        update_tensors=ut, update_hyper=uh)
    else:
        out = torch.ops.deer.clip_reduce_noise(grads, clip, float(noise_std), float(expected_batch_size), chol,
                                               int(noise_side), _seed_i64(seed), int(step), int(layer), int(client),
                                               ut, uh)
    if commit is not None:
        commit()
    return out


def clip_reduce_noise_fused(left: torch.Tensor, right: torch.Tensor, scale: float, clip: torch.Tensor,
                            noise_std: float, expected_batch_size: float, chol: torch.Tensor | None = None,
                            noise_side: int = 1, seed: int = 0, step: int = 0, layer: int = 0, client: int = 0,
                            backend: str | None = None) -> torch.Tensor:
    """clip_reduce_noise of g_i = scale * L_i^T R_i, computed as one clip-weighted GEMM over all tokens."""
    if left.dim() == 2:
        left = left.unsqueeze(1)
    if right.dim() == 2:
        right = right.unsqueeze(1)
    if left.dim() != 3 or right.dim() != 3 or left.shape[:2] != right.shape[:2]:
        raise ValueError(f"clip_reduce_noise_fused: left (b, T, p) and right (b, T, q) must share b and T, got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    _check((left.shape[0], left.shape[2], right.shape[2]), clip, float(noise_std), float(expected_batch_size), chol,
           noise_side, step, layer, client, "clip_reduce_noise_fused")
    bk = resolve_backend(left.device, backend, op="clip_reduce_noise", dtype=left.dtype)
    if bk == "reference":
        return clip_reduce_noise_fused_reference(left, right, scale, clip, noise_std, expected_batch_size, chol,
                                                 noise_side, seed, step, layer, client)
    if bk == "triton":
        from deer_kernels.clip_reduce_noise import clip_reduce_noise_fused as triton_fused
        return triton_fused(left, right, scale, clip, noise_std, expected_batch_size, chol, noise_side, seed, step,
                            layer, client)
    return torch.ops.deer.clip_reduce_noise_fused(left, right, float(scale), clip, float(noise_std),
                                                  float(expected_batch_size), chol, int(noise_side), _seed_i64(seed),
                                                  int(step), int(layer), int(client))


@torch.no_grad()
def clip_reduce_noise_grouped(grads, clips, noise_std: float, expected_batch_size: float, chols=None,
                              noise_sides=1, seed: int = 0, step: int = 0, layers=None, client: int = 0,
                              backend: str | None = None, updates=None) -> list[torch.Tensor]:
    """clip_reduce_noise for every trained factor of a model in one call:

        out[k] = clip_reduce_noise(grads[k], clips[k], noise_std, expected_batch_size, chols[k],
                                   noise_sides[k], seed, step, layers[k], client)

    with the same Philox keys, hence the same noise, as one call per layer. `chols` (default: all None)
    and `noise_sides` / `layers` (an int for all, or one per layer; layers default 0..L-1) follow the
    per-layer op; `updates` (default none) holds one FusedUpdate or None per layer. The cpu backend
    runs one parallel region over the layers, cuda one launch over all layers (when they share a
    dtype and have enough elements to fill the GPU; else per-layer launches); triton and the
    reference run per layer."""
    grads, clips = list(grads), list(clips)
    L = len(grads)
    chols = [None] * L if chols is None else list(chols)
    sides = [int(noise_sides)] * L if isinstance(noise_sides, int) else [int(s) for s in noise_sides]
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    updates = [None] * L if updates is None else list(updates)
    if not len(clips) == len(chols) == len(sides) == len(layers) == len(updates) == L:
        raise ValueError(f"clip_reduce_noise_grouped: grads, clips, chols, noise_sides, layers and updates need one "
                         f"entry per layer; got {L}, {len(clips)}, {len(chols)}, {len(sides)}, {len(layers)} and "
                         f"{len(updates)}")
    if L == 0:
        return []
    for k, g in enumerate(grads):
        if g.dim() != 3:
            raise ValueError(f"clip_reduce_noise_grouped: grads[{k}] must be (b, p, q) per-sample gradients, got "
                             f"{tuple(g.shape)}")
        if g.device != grads[0].device:
            raise ValueError(f"clip_reduce_noise_grouped: every layer must be on one device; grads[{k}] is on "
                             f"{g.device}, grads[0] on {grads[0].device}")
        _check(tuple(g.shape), clips[k], float(noise_std), float(expected_batch_size), chols[k], sides[k], step,
               layers[k], client, f"clip_reduce_noise_grouped (layer {k})")
    bk = resolve_backend(grads[0].device, backend, op="clip_reduce_noise", dtype=grads[0].dtype)
    if bk in ("reference", "triton"):
        return [clip_reduce_noise(g, c, noise_std, expected_batch_size, ch, s, seed, step, lid, client, backend=bk,
                                  update=u)
                for g, c, ch, s, lid, u in zip(grads, clips, chols, sides, layers, updates)]
    ut, uh, commits = [], [], []
    if any(u is not None for u in updates):
        for g, u in zip(grads, updates):
            if u is None:
                empty = g.new_empty(0)
                ut += [empty, empty, empty]
                uh += _NO_UPDATE_HYPER
            else:
                t, h, commit = u.pack(acc_dtype(g.dtype), g.shape[1:], g.device)
                ut += t
                uh += h
                commits.append(commit)
    out = list(torch.ops.deer.clip_reduce_noise_grouped(grads, clips, float(noise_std), float(expected_batch_size),
                                                        chols, sides, _seed_i64(seed), int(step), layers, int(client),
                                                        ut, uh))
    for commit in commits:
        commit()
    return out
