"""Gaussian noise for the DP step, isotropic or regulated, from counter-based keys.

Every noise draw has its own key (seed, step, layer, client): the same key always gives the same
noise (reproducible runs, tests), two different keys never share a stream (noise never repeats
across steps, layers or clients). The key is hashed into a 64-bit generator seed with numpy's
SeedSequence (a maintained, well-mixed hash of integer tuples); the Gaussian numbers come from
torch's generator on the tensor's device. In `secure_mode` the engine draws `seed` from OS entropy
at every step, so the noise cannot be regenerated from anything stored.

Regulated noise (DESIGN.md section 2, low-cost form): with K = R^T R,
    noise_side 0 (A phase, trained A: (r, n)):  xi = R^{-1} Z          every column ~ N(0, K^{-1})
    noise_side 1 (B phase, trained B: (m, r)):  xi = Z R^{-T}          every row    ~ N(0, K^{-1})
noise_side uses the same convention as `gram_side` of per_sample_grad_norm.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def noise_key(seed: int, step: int, layer: int, client: int = 0) -> int:
    """A 63-bit generator seed unique to (seed, step, layer, client)."""
    for name, v in (("seed", seed), ("step", step), ("layer", layer), ("client", client)):
        if int(v) < 0:
            raise ValueError(f"noise key component {name} must be >= 0, got {v}")
    words = np.random.SeedSequence([int(seed), int(step), int(layer), int(client)]).generate_state(2, np.uint64)
    return int(words[0]) & _MASK63


def keyed_generator(seed: int, step: int, layer: int, client: int = 0, device=None) -> torch.Generator:
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(noise_key(seed, step, layer, client))
    return g


def regulate(Z: torch.Tensor, chol: torch.Tensor, noise_side: int) -> torch.Tensor:
    """Map standard normal Z to covariance K^{-1} per column (side 0: R^{-1} Z) or per row
    (side 1: Z R^{-T}), K = R^T R with R = chol upper-triangular."""
    R = chol.to(Z.dtype)
    if noise_side == 0:
        return torch.linalg.solve_triangular(R, Z, upper=True)
    if noise_side == 1:
        return torch.linalg.solve_triangular(R.mT, Z, upper=False, left=False)
    raise ValueError(f"noise_side must be 0 (A phase: columns) or 1 (B phase: rows), got {noise_side}")


def gaussian_noise(shape, *, seed: int, step: int, layer: int, client: int = 0,
                   chol: torch.Tensor | None = None, noise_side: int = 0,
                   dtype=torch.float32, device=None) -> torch.Tensor:
    """xi ~ N(0, I) (chol None) or regulated xi with covariance K^{-1} (rows or columns)."""
    gen = keyed_generator(seed, step, layer, client, device)
    Z = torch.randn(*shape, generator=gen, dtype=dtype, device=device)
    return Z if chol is None else regulate(Z, chol, noise_side)


def clip_reduce_noise_reference(grads: torch.Tensor, clip: torch.Tensor, noise_std: float,
                                expected_batch_size: float, chol: torch.Tensor | None, noise_side: int,
                                seed: int, step: int, layer: int, client: int = 0) -> torch.Tensor:
    """(sum_i clip_i grads_i + noise_std * xi) / expected_batch_size, accumulated in fp32 (fp64 for
    fp64 input). grads: (b, p, q) per-sample gradients, clip: (b,). The pure-PyTorch path the
    engine uses when deer.ops has no clip_reduce_noise kernel."""
    acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
    S = torch.einsum("b,bpq->pq", clip.to(acc), grads.to(acc))
    if noise_std > 0:
        xi = gaussian_noise(S.shape, seed=seed, step=step, layer=layer, client=client, chol=chol,
                            noise_side=noise_side, dtype=acc, device=S.device)
        S = S + noise_std * xi
    return S / expected_batch_size
