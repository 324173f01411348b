"""per_sample_grad_norm (Triton): per-sample LoRA factor gradients and their squared norms, fused.

    g_i = scale * L_i^T R_i                 L: (b, T, p), R: (b, T, q)  ->  g: (b, p, q) fp32
    n_i = ||g_i||_F^2                       gram None
    n_i = tr(g_i K g_i^T)                   gram_side = 1, K: (q, q)   (B phase: L = G, R = U = X A^T)
    n_i = tr(g_i^T K g_i)                   gram_side = 0, K: (p, p)   (A phase: L = V = G B, R = X)

One program owns one (sample, tile) pair, streams the sample's T tokens once and writes its tile of
g_i and that tile's share of n_i; the shares are summed in a fixed order afterwards (deterministic,
no atomics). Inputs fp32 / bf16 / fp16; float64 is refused (use the 'cpu' or 'reference' backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config


@triton.jit
def _sample_lt_r(Li, Ri, T, P, Q, offs_p, offs_q, s_lt, s_lp, s_rt, s_rq,
                 COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """acc = L_i[:, offs_p]^T R_i[:, offs_q] = sum_t L[i, t, p] R[i, t, q] for one (BLOCK_P, BLOCK_Q) tile;
    Li, Ri point at sample i's first token.

    Accumulates in fp32 whatever the input dtype: bf16/fp16 products are exact in fp32, so the only
    error is the fp32 sum over T (relative ~ 1e-7 sqrt(T)), far under the inputs' own rounding.
    fp32 inputs use 3xTF32 on the tensor cores (~21-bit products, near-fp32 accuracy): plain TF32
    (10-bit mantissa, ~3e-4 relative) would be too coarse for clipping decisions near the bound.
    Padded tokens/features load as 0 and add nothing."""
    offs_t = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    l_base = Li + offs_p[None, :] * s_lp
    r_base = Ri + offs_q[None, :] * s_rq
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        mask_t = t < T
        l = tl.load(l_base + t[:, None].to(tl.int64) * s_lt, mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        r = tl.load(r_base + t[:, None].to(tl.int64) * s_rt, mask=mask_t[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(tl.trans(l.to(COMPUTE)), r.to(COMPUTE), acc, input_precision=DOT_PRECISION,
                     out_dtype=tl.float32)
    return acc


@triton.jit
def _per_sample_grad_norm_kernel(
        L, R, K, G, NP,
        T, P, Q, scale, n_tiles, n_tiles_q,
        s_lb, s_lt, s_lp, s_rb, s_rt, s_rq, s_k0, s_k1, s_gb, s_gp, s_gq,
        GRAM_SIDE: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Program pid = i * n_tiles + tile: g_i[tile] = scale * L_i^T R_i, NP[pid] = tile's share of n_i.

    Shares: Euclidean sum_{tile} g^2; gram_side 1 (tile holds all q): sum (g K) * g = tr(g K g^T) over
    the tile's rows; gram_side 0 (tile holds all p): sum (K g) * g = tr(g^T K g) over its columns.
    Consecutive programs are tiles of the same sample, so the sample's rows stay hot in L2."""
    pid = tl.program_id(0)
    i = pid // n_tiles
    tile = pid % n_tiles
    tp = tile // n_tiles_q
    tq = tile % n_tiles_q
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q

    i64 = i.to(tl.int64)
    g = _sample_lt_r(L + i64 * s_lb, R + i64 * s_rb, T, P, Q, offs_p, offs_q, s_lt, s_lp, s_rt, s_rq,
                     COMPUTE, DOT_PRECISION, BLOCK_T, BLOCK_P, BLOCK_Q) * scale
    mask = mask_p[:, None] & mask_q[None, :]
    tl.store(G + i64 * s_gb + offs_p[:, None] * s_gp + offs_q[None, :] * s_gq, g, mask=mask)

    # The quadratic form runs in full fp32 ("ieee"): K may be ill conditioned (ridge lambda small), and
    # a TF32 rounding of g or K would move the norm by ~1e-3 relative, enough to flip a clip decision.
    # Padded rows/columns of g and K are 0, so they contribute nothing.
    if GRAM_SIDE == 1:
        offs_k = tl.arange(0, BLOCK_Q)
        k = tl.load(K + offs_k[:, None] * s_k0 + offs_k[None, :] * s_k1,
                    mask=mask_q[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        part = tl.sum(tl.dot(g, k, input_precision="ieee") * g)
    elif GRAM_SIDE == 0:
        offs_k = tl.arange(0, BLOCK_P)
        k = tl.load(K + offs_k[:, None] * s_k0 + offs_k[None, :] * s_k1,
                    mask=mask_p[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        part = tl.sum(tl.dot(k, g, input_precision="ieee") * g)
    else:
        part = tl.sum(g * g)
    tl.store(NP + pid, part)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def as_tokens(t: torch.Tensor, name: str, op: str) -> torch.Tensor:
    """(b, features) -> (b, 1, features); (b, T, features) unchanged; anything else is an error."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be (b, features) or (b, T, features), got shape {tuple(t.shape)}")
    return t


def compute_dtype(left: torch.Tensor, right: torch.Tensor, op: str):
    """The dtype both operands are fed to tl.dot in, its dot precision, and the torch dtype."""
    for name, t in (("left", left), ("right", right)):
        if t.dtype not in _TL_DTYPE:
            hint = (" For float64 use backend='cpu' or 'reference' (the float64 oracle)."
                    if t.dtype == torch.float64 else "")
            raise TypeError(f"{op} (triton backend): {name} has dtype {t.dtype}; Triton kernels take "
                            f"float32, bfloat16 or float16.{hint}")
    common = torch.promote_types(left.dtype, right.dtype)  # bf16 with fp16 -> fp32
    if common == torch.bfloat16 and _config.interpreted(left.device):
        # The interpreter keeps bf16 as raw uint16 and its dot multiplies the bit patterns. Feeding the
        # dot fp32 instead gives the GPU's result exactly: bf16 -> fp32 is exact and a product of two
        # bf16 values (8-bit significands) is exact in fp32, as in the tensor cores' fp32 accumulation.
        return tl.float32, "ieee", common
    # input_precision only matters for fp32 operands; 16-bit operands always take the tensor cores'
    # exact-product path, so they get Triton's default ("tf32", ignored for them).
    return _TL_DTYPE[common], ("tf32x3" if common == torch.float32 else "tf32"), common


def check_pair(left: torch.Tensor, right: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = as_tokens(left, "left", op), as_tokens(right, "right", op)
    if left.shape[:2] != right.shape[:2]:
        raise ValueError(f"{op}: left {tuple(left.shape)} and right {tuple(right.shape)} must share "
                         "(batch, tokens)")
    if left.device != right.device:
        raise ValueError(f"{op}: left is on {left.device} but right is on {right.device}")
    _config.check_runnable(left.device, op, _per_sample_grad_norm_kernel)
    return left, right


def per_sample_grad_norm_launch(left: torch.Tensor, right: torch.Tensor, scale: float,
                                gram: torch.Tensor | None = None, gram_side: int = 1):
    """Run the kernel. Returns (grads (b, p, q) fp32, sq_norms (b,) fp32, config) where config holds
    the grid and the tile/warp/stage choices from deer_kernels._config."""
    op = "per_sample_grad_norm"
    left, right = check_pair(left, right, op)
    dot_dtype, precision, _ = compute_dtype(left, right, op)
    if gram_side not in (0, 1):
        raise ValueError(f"{op}: gram_side must be 0 (K is (p, p), A phase) or 1 (K is (q, q), B phase), "
                         f"got {gram_side!r}")
    b, T, p = left.shape
    q = right.shape[2]
    dev = left.device
    gram_axis = None
    if gram is not None:
        gdim = q if gram_side == 1 else p
        if gram.shape != (gdim, gdim):
            side = "(q, q) for gram_side=1" if gram_side == 1 else "(p, p) for gram_side=0"
            raise ValueError(f"{op}: gram must be {side}, i.e. ({gdim}, {gdim}); got {tuple(gram.shape)}")
        if gdim > _config.MAX_GRAM:
            raise ValueError(f"{op} (triton backend): the metric's K is {gdim} x {gdim}; the kernel keeps "
                             f"all of K's side in one tile and supports up to {_config.MAX_GRAM} (LoRA "
                             "ranks). Use backend='cuda' or 'reference' for larger K.")
        if gram.device != dev:
            raise ValueError(f"{op}: gram is on {gram.device} but the activations are on {dev}")
        if gram.dtype not in _TL_DTYPE:
            gram = gram.float()  # float64 K (it is r x r): rounded once to fp32
        gram_axis = gram_side
    cfg = _config.grad_tiles(p, q, T, max(left.element_size(), right.element_size()), gram_axis, dev)
    n_tiles_p = triton.cdiv(p, cfg["BLOCK_P"])
    n_tiles_q = triton.cdiv(q, cfg["BLOCK_Q"])
    n_tiles = n_tiles_p * n_tiles_q
    grads = torch.empty((b, p, q), dtype=torch.float32, device=dev)
    partial = torch.empty((b, n_tiles), dtype=torch.float32, device=dev)
    grid = (b * n_tiles,)
    config = dict(cfg, grid=grid, n_tiles=n_tiles, dot_precision=precision)
    if b == 0 or p == 0 or q == 0:
        return grads.zero_(), torch.zeros(b, dtype=torch.float32, device=dev), config
    k_arg = gram if gram is not None else grads  # unused pointer when GRAM_SIDE == -1
    _per_sample_grad_norm_kernel[grid](
        left, right, k_arg, grads, partial,
        T, p, q, float(scale), n_tiles, n_tiles_q,
        *left.stride(), *right.stride(),
        *(gram.stride() if gram is not None else (0, 0)), *grads.stride(),
        GRAM_SIDE=-1 if gram is None else gram_side, COMPUTE=dot_dtype, DOT_PRECISION=precision,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_P=cfg["BLOCK_P"], BLOCK_Q=cfg["BLOCK_Q"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # Fixed-order sum of the tiles' shares: deterministic, unlike atomics.
    sq_norms = partial.sum(1) if n_tiles > 1 else partial[:, 0].clone()
    return grads, sq_norms, config


def per_sample_grad_norm(left: torch.Tensor, right: torch.Tensor, scale: float,
                         gram: torch.Tensor | None = None, gram_side: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grads (b, p, q) fp32, sq_norms (b,) fp32). See the module docstring for the math."""
    grads, sq_norms, _ = per_sample_grad_norm_launch(left, right, scale, gram, gram_side)
    return grads, sq_norms
