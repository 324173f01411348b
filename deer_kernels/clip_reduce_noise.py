"""clip_reduce_noise (Triton): the noisy clipped mean of per-sample gradients, DP-SGD's release.

    out = (sum_i c_i g_i + noise_std * xi) / expected_batch_size             (p, q) fp32

    xi = Z                  isotropic (chol None)
    xi = R^{-1} Z           regulated, noise_side 0 (p = r): every column ~ N(0, K^{-1}), K = R^T R
    xi = Z R^{-T}           regulated, noise_side 1 (q = r): every row    ~ N(0, K^{-1})

with Z (p, q) i.i.d. N(0, 1). `clip_reduce_noise_fused` takes the factors instead of g_i and never
writes per-sample gradients: sum_i c_i g_i = scale * sum_i c_i L_i^T R_i, one weighted reduction.

Two passes, both deterministic (fixed summation order, no atomics):
1. reduce: program (tile, split) sums c_i g_i over its split's samples into partial[split, tile]
   (splits only exist to fill the GPU when the (p, q) tiles alone are too few);
2. finish: program (tile) sums the splits in order, adds noise_std * xi and divides by the expected
   batch size. Regulated noise mixes all r rows (or columns), so a finishing tile holds all of r.

Random stream: the one all deer backends share (csrc/clip_reduce_noise/philox.h, and its PyTorch
twin deer.ops.clip_reduce_noise.philox_normal_reference), drawn here with Triton's Philox4x32-10
(tl.philox, Random123's constants and round function). Element e = row * q + col of Z uses
    key     = seed mod 2^64                    (k0 = low 32 bits, k1 = high 32 bits)
    counter = (e // 2, layer, step, client)    (four 32-bit words)
One call gives four words = two 64-bit words a, b; their top 53 bits make u1 in (0, 1] and u2 in
[0, 1), and Box-Muller in float64 gives Z_{2j} = rad cos(theta), Z_{2j+1} = rad sin(theta)
(rounded once to fp32). float64 keeps the tail honest: no clamp of u1 (tl.randn's 1e-7 clamp cuts
|Z| at 5.7); here |Z| reaches 8.6. For a fixed key Philox is a bijection of the 128-bit counter,
so two draws share random bits only if (seed, step, layer, client, e // 2) are all equal: streams
of different steps, layers or clients never overlap, by construction rather than by a hash that
could collide. Requires 0 <= step, layer, client < 2^32 and p * q <= 2^33. The same key gives the
same Z on every backend and device up to an ulp of float64 sin/log before the fp32 rounding; a
deployment must never reuse a key (secure mode draws the seed from OS entropy). Each element runs
its pair's Philox call itself (twice the minimal Philox work): the noise pass touches p * q
elements once per step, next to b * p * q for the reduction, so simplicity wins.

Fused optimizer step (clip_reduce_noise only): with update_tensors = (param, buf1, buf2) and the 12
update_hyper scalars of the C++ backends (csrc/clip_reduce_noise/fused_update.h: kind 0 none, 1 SGD,
2 Adam, 3 AdamW; lr, weight_decay, momentum, dampening, nesterov, first, beta1, beta2, eps,
step_size = lr / (1 - beta1^t), bias2_sqrt = sqrt(1 - beta2^t)), the finishing pass also applies
torch.optim's single-tensor step (maximize=False, amsgrad=False) to each element it writes, in fp32
(the only output dtype here, so the parameter and its state must be fp32 (p, q) contiguous tensors).
An element whose gradient is not finite keeps its parameter and state. The gradient is still returned.
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from . import _config
from .per_sample_grad_norm import _sample_lt_r, check_pair, compute_dtype


@triton.jit
def _gauss(key, step, layer, client, idx):
    """Z at row-major element `idx` (int64 block, < 2^33) of the stream (key; step, layer, client), fp32."""
    c0 = (idx // 2).to(tl.uint32)
    zero = c0 * 0  # counters as full blocks: Philox's rounds mix all four lanes elementwise
    c1 = zero + layer.to(tl.uint32)
    c2 = zero + step.to(tl.uint32)
    c3 = zero + client.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(key, c0, c1, c2, c3)
    a = (r1.to(tl.uint64) << 32) | r0.to(tl.uint64)
    b = (r3.to(tl.uint64) << 32) | r2.to(tl.uint64)
    # Top 53 bits are exact in float64; +1 keeps u1 off 0 so log is finite.
    u1 = ((a >> 11).to(tl.float64) + 1.0) * 1.1102230246251565e-16  # 2^-53
    u2 = (b >> 11).to(tl.float64) * 1.1102230246251565e-16
    rad = tl.sqrt(-2.0 * tl.log(u1))
    theta = 6.283185307179586 * u2
    z = tl.where((idx % 2) == 0, rad * tl.cos(theta), rad * tl.sin(theta))
    return z.to(tl.float32)


@triton.jit
def _clip_reduce_kernel(Gr, C, Part, B, P, Q, PQ, per_split, n_tiles_q,
                        s_gb, s_gp, s_gq, s_c,
                        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, STAGES: tl.constexpr):
    """Part[split, tile] = sum_{i in split} c_i * g_i[tile], fp32 (16-bit grads are upcast on load)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tp = pid // n_tiles_q
    tq = pid % n_tiles_q
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    ptrs = Gr + offs_p[:, None].to(tl.int64) * s_gp + offs_q[None, :] * s_gq
    i0 = split * per_split
    n = tl.minimum(i0 + per_split, B) - i0
    ptrs += i0.to(tl.int64) * s_gb
    c_ptr = C + i0.to(tl.int64) * s_c
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    # A pure stream (no dot), so Triton pipelines it only when asked: STAGES tiles in flight via cp.async.
    for _ in tl.range(n, num_stages=STAGES):
        c = tl.load(c_ptr).to(tl.float32)
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += c * g
        ptrs += s_gb
        c_ptr += s_c
    flat = offs_p[:, None].to(tl.int64) * Q + offs_q[None, :]
    tl.store(Part + split.to(tl.int64) * PQ + flat, acc, mask=mask)


@triton.jit
def _clip_reduce_fused_kernel(L, R, C, Part, B, T, P, Q, PQ, scale, per_split, n_tiles_q,
                              s_lb, s_lt, s_lp, s_rb, s_rt, s_rq, s_c,
                              COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Part[split, tile] = scale * sum_{i in split} c_i * (L_i^T R_i)[tile].

    Each sample's product is finished in fp32 before it is weighted: weighting the inputs instead
    (c_i * L_i, then one long dot over all b*T rows) would round c_i * L_i back to bf16/fp16 and add
    an error of the inputs' own size; this way the weights cost one fp32 FMA per tile element per
    sample and no precision."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tp = pid // n_tiles_q
    tq = pid % n_tiles_q
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    i0 = split * per_split
    n = tl.minimum(i0 + per_split, B) - i0
    l_ptr = L + i0.to(tl.int64) * s_lb
    r_ptr = R + i0.to(tl.int64) * s_rb
    c_ptr = C + i0.to(tl.int64) * s_c
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for _ in range(n):
        c = tl.load(c_ptr).to(tl.float32)
        acc += c * _sample_lt_r(l_ptr, r_ptr, T, P, Q, offs_p, offs_q, s_lt, s_lp, s_rt, s_rq,
                                COMPUTE, DOT_PRECISION, BLOCK_T, BLOCK_P, BLOCK_Q)
        l_ptr += s_lb
        r_ptr += s_rb
        c_ptr += s_c
    flat = offs_p[:, None].to(tl.int64) * Q + offs_q[None, :]
    tl.store(Part + split.to(tl.int64) * PQ + flat, acc * scale, mask=mask)


@triton.jit
def _optimizer_step(g, flat, mask, Param, Buf1, Buf2, lr, wd, momentum, damp_c, beta1_c, beta2, beta2_c, eps,
                    step_size, bias2_sqrt, decay,
                    UPDATE: tl.constexpr, DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                    FIRST: tl.constexpr):
    """torch.optim's single-tensor step (UPDATE 1 SGD, 2 Adam, 3 AdamW) of the tile's elements with
    gradient g, in fp32 with the scalars rounded to fp32 once (damp_c = 1 - dampening, beta1_c = 1 - beta1,
    beta2_c = 1 - beta2, decay = 1 - lr wd, formed in float64 on the host as torch forms them in Python).
    Elements whose g is inf or NaN keep their parameter and state. The branches torch takes on
    weight_decay != 0, momentum != 0, nesterov and an empty momentum buffer are constexprs: a step
    pays for no load, store or multiply it does not use (p + 0 * p would also turn an inf p into NaN)."""
    ok = mask & (tl.abs(g) < float("inf"))  # false for +-inf and NaN
    g = tl.where(ok, g, 0.0)  # skipped lanes compute on zeros, not inf - inf
    p = tl.load(Param + flat, mask=ok, other=0.0)
    if UPDATE == 1:
        d = g
        if DECAY:
            d += wd * p
        if MOMENTUM:
            if FIRST:
                buf = d  # torch's buffer starts as a copy of the first step's d: the old one is never read
            else:
                buf = momentum * tl.load(Buf1 + flat, mask=ok, other=0.0) + damp_c * d
            tl.store(Buf1 + flat, buf, mask=ok)
            if NESTEROV:
                d += momentum * buf
            else:
                d = buf
        p -= lr * d
    else:
        if DECAY:
            if UPDATE == 3:
                p *= decay  # AdamW: decoupled decay, before the Adam step reads p
            else:
                g += wd * p  # Adam: L2 decay through the gradient
        m = tl.load(Buf1 + flat, mask=ok, other=0.0)
        m += beta1_c * (g - m)  # torch's lerp form for weight 1 - beta1 < 0.5
        v = beta2 * tl.load(Buf2 + flat, mask=ok, other=0.0) + beta2_c * g * g
        tl.store(Buf1 + flat, m, mask=ok)
        tl.store(Buf2 + flat, v, mask=ok)
        # Correctly rounded sqrt and divisions, as torch's: Triton's default GPU sqrt / div are approximate.
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p -= step_size * tl.div_rn(m, denom)
    tl.store(Param + flat, p, mask=ok)


@triton.jit(do_not_specialize=["key", "step", "layer", "client"])
def _finish_kernel(Part, Out, Rinv, n_splits, P, Q, PQ, noise_std, expected_batch_size,
                   key, step, layer, client, s_r0, s_r1, n_tiles_q,
                   Param, Buf1, Buf2, lr, wd, momentum, damp_c, beta1_c, beta2, beta2_c, eps, step_size,
                   bias2_sqrt, decay,
                   NOISE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                   UPDATE: tl.constexpr, DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                   FIRST: tl.constexpr):
    """Out[tile] = (sum_s Part[s, tile] + noise_std * xi[tile]) / expected_batch_size.

    NOISE: 0 none (noise_std == 0: the exact clipped mean), 1 xi = Z, 2 xi = R^{-1} Z (tile holds all
    P = r rows), 3 xi = Z R^{-T} (tile holds all Q = r columns).

    The triangular solve is a product with R^{-1}, precomputed once in float64 and rounded to fp32
    (r x r, O(r^3), negligible): a tile's solve becomes one small dot instead of r dependent
    substitution steps, which Triton cannot express on register tiles. Error: in whitened
    coordinates R xi = (I + E) Z with |E| ~ cond(R) * r * 2^-24 (the fp32 rounding of R^{-1} and of
    the product), so the noise covariance is off by ~1e-4 relative even for cond(K) = 1e6. That is
    why this dot runs in full fp32 ("ieee"): TF32 (2^-11) would make E ~ cond(R) * 5e-4, i.e. a
    visibly wrong noise covariance for ill-conditioned frozen factors.

    UPDATE != 0: the fused optimizer step of each written element (_optimizer_step) with g = the
    stored fp32 value, so the parameter moves by exactly the gradient the caller gets back."""
    pid = tl.program_id(0)
    tp = pid // n_tiles_q
    tq = pid % n_tiles_q
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    mask = mask_p[:, None] & mask_q[None, :]
    flat = offs_p[:, None].to(tl.int64) * Q + offs_q[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    ptrs = Part + flat
    for _ in range(n_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += PQ
    if NOISE != 0:
        z = tl.where(mask, _gauss(key, step, layer, client, flat), 0.0)
        if NOISE == 2:
            offs_a = tl.arange(0, BLOCK_P)
            rinv = tl.load(Rinv + offs_a[:, None] * s_r0 + offs_a[None, :] * s_r1,
                           mask=mask_p[:, None] & mask_p[None, :], other=0.0)
            z = tl.dot(rinv, z, input_precision="ieee")
        elif NOISE == 3:
            offs_a = tl.arange(0, BLOCK_Q)
            # rinv_t[a, c] = R^{-1}[c, a]
            rinv_t = tl.load(Rinv + offs_a[:, None] * s_r1 + offs_a[None, :] * s_r0,
                             mask=mask_q[:, None] & mask_q[None, :], other=0.0)
            z = tl.dot(z, rinv_t, input_precision="ieee")
        acc += noise_std * z
    g = acc / expected_batch_size
    tl.store(Out + flat, g, mask=mask)
    if UPDATE != 0:
        _optimizer_step(g, flat, mask, Param, Buf1, Buf2, lr, wd, momentum, damp_c, beta1_c, beta2, beta2_c, eps,
                        step_size, bias2_sqrt, decay, UPDATE, DECAY, MOMENTUM, NESTEROV, FIRST)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_OP = "clip_reduce_noise"


def _check_key(seed, step, layer, client) -> tuple[int, int, int, int]:
    out = []
    for name, v in (("seed", seed), ("step", step), ("layer", layer), ("client", client)):
        if isinstance(v, bool):
            raise TypeError(f"{_OP}: {name} must be an integer, got {v!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{_OP}: {name} must be an integer, got {type(v).__name__}") from None
        if name == "seed":
            v &= (1 << 64) - 1  # the Philox key is the seed's 64-bit pattern, as on every backend
        elif not 0 <= v < 2 ** 32:
            raise ValueError(f"{_OP}: {name} must be in [0, 2^32) (it is a Philox counter word), got {v}")
        out.append(v)
    return tuple(out)


def _check_common(p, q, clip, b, noise_std, expected_batch_size, chol, noise_side, device):
    if clip.shape != (b,):
        raise ValueError(f"{_OP}: clip must hold one factor per sample, shape ({b},); got {tuple(clip.shape)}")
    if clip.device != device:
        raise ValueError(f"{_OP}: clip is on {clip.device} but the gradients are on {device}")
    if not (float(noise_std) >= 0.0 and float(noise_std) < float("inf")):
        raise ValueError(f"{_OP}: noise_std must be finite and >= 0, got {noise_std}")
    if not (float(expected_batch_size) > 0.0 and float(expected_batch_size) < float("inf")):
        raise ValueError(f"{_OP}: expected_batch_size must be finite and > 0, got {expected_batch_size}")
    if noise_side not in (0, 1):
        raise ValueError(f"{_OP}: noise_side must be 0 (xi = R^-1 Z, A phase, p = r) or 1 "
                         f"(xi = Z R^-T, B phase, q = r), got {noise_side!r}")
    if p * q > 2 ** 33:
        raise ValueError(f"{_OP}: {p} x {q} output has more than 2^33 elements, the Philox counter's range "
                         "(one 32-bit counter word per pair of elements)")
    if chol is None:
        return None
    r = p if noise_side == 0 else q
    if chol.dim() != 2 or chol.shape[0] != chol.shape[1] or chol.shape[0] != r:
        what = "rows p" if noise_side == 0 else "columns q"
        raise ValueError(f"{_OP}: chol must be the (r, r) upper Cholesky factor with r = the gradient's "
                         f"{what} = {r} for noise_side={noise_side}; got {tuple(chol.shape)}")
    if r > _config.MAX_GRAM:
        raise ValueError(f"{_OP} (triton backend): regulated noise keeps all of r in one tile and supports "
                         f"r <= {_config.MAX_GRAM}; got r = {r}. Use backend='cuda' or 'reference'.")
    if chol.device != device:
        raise ValueError(f"{_OP}: chol is on {chol.device} but the gradients are on {device}")
    return _inverse_of_chol(chol)


def _inverse_of_chol(chol: torch.Tensor) -> torch.Tensor:
    """R^{-1} (fp32) from chol, formed and validated in float64 on every call (r x r, r <= MAX_GRAM)."""
    r = chol.shape[0]
    R = chol.to(torch.float64)
    rinv = torch.linalg.solve_triangular(R, torch.eye(r, dtype=torch.float64, device=R.device), upper=True)
    # One host sync, r x r: a non-triangular or singular R would silently give the wrong covariance.
    code = int(((R.tril(-1) != 0).any().to(torch.int64)
                + 2 * (R.diagonal() <= 0).any().to(torch.int64)
                + 4 * (~torch.isfinite(rinv)).any().to(torch.int64)).item())
    if code & 1:
        raise ValueError(f"{_OP}: chol must be upper triangular (K = R^T R, e.g. from "
                         "deer.reference.cholesky_upper); it has entries below the diagonal")
    if code & 6:
        raise ValueError(f"{_OP}: chol must have a positive, finite diagonal and a finite inverse (K positive "
                         "definite); K = frozen^T frozen + lambda I needs a ridge lambda > 0 when the frozen "
                         "factor is rank deficient")
    return rinv.to(torch.float32)


# update_hyper's layout, shared with the C++ backends (fused_update.h, enum UpdateHyper).
_HYPER = ("kind", "lr", "weight_decay", "momentum", "dampening", "nesterov", "first", "beta1", "beta2", "eps",
          "step_size", "bias2_sqrt")
_KINDS = ("none", "SGD", "Adam", "AdamW")


def _check_update(update_tensors, update_hyper, p, q, device):
    """The fused optimizer step's kernel arguments, or None for no step. Checks everything the kernel
    would otherwise read or write out of bounds, or silently get wrong, before any launch."""
    if isinstance(update_tensors, torch.Tensor) or isinstance(update_hyper, torch.Tensor):
        raise TypeError(f"{_OP}: update_tensors and update_hyper are lists ([param, buf1, buf2] and "
                        f"{len(_HYPER)} floats), not tensors")
    tensors, hyper = list(update_tensors), list(update_hyper)
    if not tensors and not hyper:
        return None
    if len(tensors) != 3 or len(hyper) != len(_HYPER):
        raise ValueError(f"{_OP}: a fused update needs update_tensors = [param, buf1, buf2] (3 tensors; a "
                         f"0-element tensor for a buffer the optimizer does not use) and {len(_HYPER)} update_hyper "
                         f"scalars {_HYPER}; got {len(tensors)} tensors and {len(hyper)} scalars. Pass two empty "
                         "lists for no update.")
    try:
        h = dict(zip(_HYPER, (float(x) for x in hyper)))
    except (TypeError, ValueError):
        raise TypeError(f"{_OP}: update_hyper must hold {len(_HYPER)} real numbers {_HYPER}, got {hyper!r}") from None
    bad = [n for n, x in h.items() if not math.isfinite(x)]
    if bad:
        raise ValueError(f"{_OP}: fused update scalars {bad} are not finite: {[h[n] for n in bad]}")
    if h["kind"] not in (0.0, 1.0, 2.0, 3.0):
        raise ValueError(f"{_OP}: fused update kind must be 0 (none), 1 (SGD), 2 (Adam) or 3 (AdamW), got {h['kind']}")
    kind = int(h["kind"])
    if kind == 0:
        return None
    sgd = kind == 1
    momentum = sgd and h["momentum"] != 0.0
    names = ("param", "momentum_buffer" if sgd else "exp_avg", "exp_avg_sq")
    used = (True, momentum or not sgd, not sgd)
    for name, t, use in zip(names, tensors, used):
        if not use:
            continue
        what = f"{_OP} (triton backend): fused {_KINDS[kind]} update's {name}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{what} is {t.dtype}, but the Triton backend's private gradient, and so the fused step, "
                            "is float32. Keep the trained parameter and its optimizer state in float32, or step "
                            "without fusion (update_tensors=[], update_hyper=[]) and let torch.optim cast.")
        if tuple(t.shape) != (p, q):
            raise ValueError(f"{what} must be ({p}, {q}) like the gradient, got {tuple(t.shape)}"
                             + (" (a buffer this optimizer uses cannot be empty)" if t.numel() == 0 else ""))
        if t.device != device:
            raise ValueError(f"{what} is on {t.device} but the gradients are on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous (the kernel indexes it as row-major (p, q)); "
                             "pass .contiguous() and copy the result back, or step without fusion")
    if not sgd and not h["bias2_sqrt"] > 0.0:
        raise ValueError(f"{_OP}: fused {_KINDS[kind]} update needs bias2_sqrt = sqrt(1 - beta2^t) > 0 (step t >= 1, "
                         f"beta2 < 1), got {h['bias2_sqrt']}")
    pointers = [t if use else tensors[0] for t, use in zip(tensors, used)]  # unused ones are never dereferenced
    # Scalars as torch forms them (in float64, from Python floats); the kernel rounds each to fp32 once.
    scalars = (h["lr"], h["weight_decay"], h["momentum"], 1.0 - h["dampening"], 1.0 - h["beta1"], h["beta2"],
               1.0 - h["beta2"], h["eps"], h["step_size"], h["bias2_sqrt"], 1.0 - h["lr"] * h["weight_decay"])
    flags = dict(UPDATE=kind, DECAY=h["weight_decay"] != 0.0, MOMENTUM=momentum,
                 NESTEROV=momentum and h["nesterov"] != 0.0, FIRST=momentum and h["first"] != 0.0)
    return pointers, scalars, flags


_NO_UPDATE_SCALARS = (0.0,) * 11
_NO_UPDATE_FLAGS = dict(UPDATE=0, DECAY=False, MOMENTUM=False, NESTEROV=False, FIRST=False)


def _finish(partial, splits, p, q, noise_std, expected_batch_size, rinv, noise_side, key, device, config,
            update=None):
    seed, step, layer, client = key
    out = torch.empty((p, q), dtype=torch.float32, device=device)
    if noise_std == 0.0:
        noise, side = 0, None
    elif rinv is None:
        noise, side = 1, None
    else:
        noise, side = 2 + noise_side, noise_side
    fc = _config.noise_tiles(p, q, side, device)
    n_tiles_q = triton.cdiv(q, fc["BLOCK_Q"])
    grid = (triton.cdiv(p, fc["BLOCK_P"]) * n_tiles_q,)
    r_arg = rinv if rinv is not None else partial  # unused pointer unless NOISE is 2 or 3
    pointers, scalars, flags = update if update is not None else ((out,) * 3, _NO_UPDATE_SCALARS, _NO_UPDATE_FLAGS)
    _finish_kernel[grid](
        partial, out, r_arg, splits, p, q, p * q, float(noise_std), float(expected_batch_size),
        seed, step, layer, client, *(rinv.stride() if rinv is not None else (0, 0)), n_tiles_q,
        *pointers, *scalars,
        NOISE=noise, BLOCK_P=fc["BLOCK_P"], BLOCK_Q=fc["BLOCK_Q"], **flags,
        num_warps=fc["num_warps"], num_stages=fc["num_stages"])
    config["finish"] = dict(fc, grid=grid, noise=("none", "isotropic", "regulated rows", "regulated cols")[noise],
                            update=_KINDS[flags["UPDATE"]])
    return out


def clip_reduce_noise_launch(grads, clip, noise_std, expected_batch_size, chol, noise_side,
                             seed, step, layer, client, *, splits: int | None = None,
                             update_tensors=(), update_hyper=()):
    """Run reduce + finish. Returns (out (p, q) fp32, config) with both passes' grids and tiles.
    `splits` forces the number of batch splits (default: _config.batch_splits decides).
    update_tensors / update_hyper: the fused optimizer step (module docstring); empty: none."""
    if grads.dim() != 3:
        raise ValueError(f"{_OP}: grads must be (b, p, q) per-sample gradients, got shape {tuple(grads.shape)}")
    if grads.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        hint = " For float64 use backend='cpu' or 'reference'." if grads.dtype == torch.float64 else ""
        raise TypeError(f"{_OP} (triton backend): grads have dtype {grads.dtype}; Triton kernels take "
                        f"float32, bfloat16 or float16.{hint}")
    _config.check_runnable(grads.device, _OP, _clip_reduce_kernel)
    b, p, q = grads.shape
    dev = grads.device
    key = _check_key(seed, step, layer, client)
    rinv = _check_common(p, q, clip, b, noise_std, expected_batch_size, chol, noise_side, dev)
    update = _check_update(update_tensors, update_hyper, p, q, dev)
    rc = _config.reduce_tiles(p, q, dev)
    n_tiles_q = triton.cdiv(q, rc["BLOCK_Q"])
    n_tiles = triton.cdiv(p, rc["BLOCK_P"]) * n_tiles_q
    splits, per_split = _config.batch_splits(n_tiles, b, dev, splits)
    partial = torch.empty((splits, p, q), dtype=torch.float32, device=dev)
    config = dict(reduce=dict(rc, grid=(n_tiles, splits), samples_per_split=per_split))
    if p == 0 or q == 0:
        return torch.zeros((p, q), dtype=torch.float32, device=dev), config
    if b == 0:
        partial.zero_()
    else:
        _clip_reduce_kernel[(n_tiles, splits)](
            grads, clip, partial, b, p, q, p * q, per_split, n_tiles_q, *grads.stride(), clip.stride(0),
            BLOCK_P=rc["BLOCK_P"], BLOCK_Q=rc["BLOCK_Q"], STAGES=rc["num_stages"],
            num_warps=rc["num_warps"], num_stages=rc["num_stages"])
    out = _finish(partial, splits, p, q, float(noise_std), expected_batch_size, rinv, noise_side, key, dev, config,
                  update)
    return out, config


def clip_reduce_noise_fused_launch(left, right, scale, clip, noise_std, expected_batch_size, chol,
                                   noise_side, seed, step, layer, client, *, splits: int | None = None):
    """Run fused reduce (from the factors) + finish. Returns (out (p, q) fp32, config)."""
    left, right = check_pair(left, right, _OP + "_fused")
    dot_dtype, precision, _ = compute_dtype(left, right, _OP + "_fused")
    b, T, p = left.shape
    q = right.shape[2]
    dev = left.device
    key = _check_key(seed, step, layer, client)
    rinv = _check_common(p, q, clip, b, noise_std, expected_batch_size, chol, noise_side, dev)
    gc = _config.grad_tiles(p, q, T, max(left.element_size(), right.element_size()), None, dev)
    n_tiles_q = triton.cdiv(q, gc["BLOCK_Q"])
    n_tiles = triton.cdiv(p, gc["BLOCK_P"]) * n_tiles_q
    splits, per_split = _config.batch_splits(n_tiles, b, dev, splits)
    partial = torch.empty((splits, p, q), dtype=torch.float32, device=dev)
    config = dict(reduce=dict(gc, grid=(n_tiles, splits), samples_per_split=per_split, dot_precision=precision))
    if p == 0 or q == 0:
        return torch.zeros((p, q), dtype=torch.float32, device=dev), config
    if b == 0:
        partial.zero_()
    else:
        _clip_reduce_fused_kernel[(n_tiles, splits)](
            left, right, clip, partial, b, T, p, q, p * q, float(scale), per_split, n_tiles_q,
            *left.stride(), *right.stride(), clip.stride(0),
            COMPUTE=dot_dtype, DOT_PRECISION=precision,
            BLOCK_T=gc["BLOCK_T"], BLOCK_P=gc["BLOCK_P"], BLOCK_Q=gc["BLOCK_Q"],
            num_warps=gc["num_warps"], num_stages=gc["num_stages"])
    out = _finish(partial, splits, p, q, float(noise_std), expected_batch_size, rinv, noise_side, key, dev, config)
    return out, config


def clip_reduce_noise(grads: torch.Tensor, clip: torch.Tensor, noise_std: float, expected_batch_size: float,
                      chol: torch.Tensor | None, noise_side: int, seed: int, step: int, layer: int,
                      client: int, *, update_tensors=(), update_hyper=()) -> torch.Tensor:
    """(sum_i clip_i grads_i + noise_std * xi) / expected_batch_size, (p, q) fp32, optionally with the fused
    optimizer step of update_tensors' parameter. See the module docstring."""
    out, _ = clip_reduce_noise_launch(grads, clip, noise_std, expected_batch_size, chol, noise_side,
                                      seed, step, layer, client, update_tensors=update_tensors,
                                      update_hyper=update_hyper)
    return out


def clip_reduce_noise_fused(left: torch.Tensor, right: torch.Tensor, scale: float, clip: torch.Tensor,
                            noise_std: float, expected_batch_size: float, chol: torch.Tensor | None,
                            noise_side: int, seed: int, step: int, layer: int, client: int) -> torch.Tensor:
    """As clip_reduce_noise with grads_i = scale * left_i^T right_i, never materialised. The same key
    gives the same noise as the unfused op."""
    out, _ = clip_reduce_noise_fused_launch(left, right, scale, clip, noise_std, expected_batch_size, chol,
                                            noise_side, seed, step, layer, client)
    return out
