"""clip_reduce_noise: the clipped, noised mean gradient of one trained LoRA factor.

    out = (sum_i clip_i * g_i + noise_std * xi) / expected_batch_size           g: (b, p, q) -> (p, q)

    xi = Z                  chol None: isotropic noise
    xi = R^{-1} Z           chol = R (r x r upper, K = R^T R), noise_side = 0, p = r  (A phase)
    xi = Z R^{-T}           noise_side = 1, q = r                                     (B phase)

Regulated xi has covariance K^{-1} per column (side 0) or per row (side 1): the low-cost form of
DEeR's noise regulator (DESIGN.md section 2). Z ~ N(0, I) comes from a counter-based Philox4x32-10
stream keyed by (seed, step, layer, client): the same key reproduces the output, distinct keys give
independent streams. Counter layout (csrc/clip_reduce_noise/philox.h): key = seed (64 bit), counter =
(j, layer, step, client) with j = e // 2 the pair index of row-major element e; Box-Muller turns one
Philox call into the normals of elements 2j and 2j + 1. Valid for step, layer, client < 2^32 and
p * q <= 2^33. noise_std = 0 gives exactly the clipped sum / expected_batch_size.

clip_reduce_noise_fused gives the same result from the factors (left (b, T, p), right (b, T, q),
g_i = scale * L_i^T R_i) as one weighted GEMM, never materialising per-sample gradients.
Output: fp32, or fp64 for fp64 inputs.
"""
from __future__ import annotations

import math

import torch

from . import resolve_backend

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
    Z = philox_normal_reference(tuple(S.shape), seed, step, layer, client, device=S.device)
    if chol is not None:
        R = chol.to(torch.float64).triu()
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
    acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
    S = torch.einsum("b,bpq->pq", clip.to(acc), grads.to(acc))
    return _noise_reference(S, noise_std, chol, noise_side, seed, step, layer, client) / expected_batch_size


def clip_reduce_noise_fused_reference(left, right, scale, clip, noise_std, expected_batch_size, chol=None,
                                      noise_side=1, seed=0, step=0, layer=0, client=0):
    acc = torch.float64 if left.dtype == torch.float64 else torch.float32
    g = scale * torch.einsum("btp,btq->bpq", left.to(acc), right.to(acc))
    return clip_reduce_noise_reference(g, clip, noise_std, expected_batch_size, chol, noise_side, seed, step,
                                       layer, client)


def clip_reduce_noise(grads: torch.Tensor, clip: torch.Tensor, noise_std: float, expected_batch_size: float,
                      chol: torch.Tensor | None = None, noise_side: int = 1, seed: int = 0, step: int = 0,
                      layer: int = 0, client: int = 0, backend: str | None = None) -> torch.Tensor:
    """(sum_i clip_i grads_i + noise_std * xi) / expected_batch_size, see the module docstring."""
    if grads.dim() != 3:
        raise ValueError(f"clip_reduce_noise: grads must be (b, p, q) per-sample gradients, got {tuple(grads.shape)}")
    _check(tuple(grads.shape), clip, float(noise_std), float(expected_batch_size), chol, noise_side, step, layer,
           client, "clip_reduce_noise")
    bk = resolve_backend(grads.device, backend, op="clip_reduce_noise", dtype=grads.dtype)
    if bk == "reference":
        return clip_reduce_noise_reference(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed,
                                           step, layer, client)
    if bk == "triton":
        from deer_kernels.clip_reduce_noise import clip_reduce_noise as triton_op
        return triton_op(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed, step, layer, client)
    return torch.ops.deer.clip_reduce_noise(grads, clip, float(noise_std), float(expected_batch_size), chol,
                                            int(noise_side), _seed_i64(seed), int(step), int(layer), int(client))


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
        import deer_kernels.clip_reduce_noise as tk
        if hasattr(tk, "clip_reduce_noise_fused"):
            return tk.clip_reduce_noise_fused(left, right, scale, clip, noise_std, expected_batch_size, chol,
                                              noise_side, seed, step, layer, client)
        # No fused Triton kernel: weighted GEMM in torch, noise from the Triton kernel with b = 1.
        acc = torch.float64 if left.dtype == torch.float64 else torch.float32
        w = (clip.to(acc) * scale).view(-1, 1, 1)
        S = torch.einsum("btp,btq->pq", left.to(acc) * w, right.to(acc))
        return tk.clip_reduce_noise(S.unsqueeze(0), torch.ones(1, dtype=acc, device=S.device), noise_std,
                                    expected_batch_size, chol, noise_side, seed, step, layer, client)
    return torch.ops.deer.clip_reduce_noise_fused(left, right, float(scale), clip, float(noise_std),
                                                  float(expected_batch_size), chol, int(noise_side), _seed_i64(seed),
                                                  int(step), int(layer), int(client))


def clip_reduce_noise_grouped(grads, clips, noise_std: float, expected_batch_size: float, chols=None,
                              noise_sides=1, seed: int = 0, step: int = 0, layers=None, client: int = 0,
                              backend: str | None = None) -> list[torch.Tensor]:
    """clip_reduce_noise for every trained factor of a model in one call:

        out[k] = clip_reduce_noise(grads[k], clips[k], noise_std, expected_batch_size, chols[k],
                                   noise_sides[k], seed, step, layers[k], client)

    with the same Philox keys, hence the same noise, as one call per layer. `chols` (default: all None)
    and `noise_sides` / `layers` (an int for all, or one per layer; layers default 0..L-1) follow the
    per-layer op. The cpu backend runs one parallel region over the layers, cuda one launch over all
    layers (when they share a dtype and have enough elements to fill the GPU; else per-layer
    launches); triton and the reference run per layer."""
    grads, clips = list(grads), list(clips)
    L = len(grads)
    chols = [None] * L if chols is None else list(chols)
    sides = [int(noise_sides)] * L if isinstance(noise_sides, int) else [int(s) for s in noise_sides]
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    if not len(clips) == len(chols) == len(sides) == len(layers) == L:
        raise ValueError(f"clip_reduce_noise_grouped: grads, clips, chols, noise_sides and layers need one entry per "
                         f"layer; got {L}, {len(clips)}, {len(chols)}, {len(sides)} and {len(layers)}")
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
    if bk in ("reference", "triton") or not hasattr(torch.ops.deer, "clip_reduce_noise_grouped"):
        return [clip_reduce_noise(g, c, noise_std, expected_batch_size, ch, s, seed, step, lid, client, backend=bk)
                for g, c, ch, s, lid in zip(grads, clips, chols, sides, layers)]
    return list(torch.ops.deer.clip_reduce_noise_grouped(grads, clips, float(noise_std), float(expected_batch_size),
                                                         chols, sides, _seed_i64(seed), int(step), layers,
                                                         int(client)))
