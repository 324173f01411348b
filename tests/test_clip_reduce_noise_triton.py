"""Triton clip_reduce_noise / clip_reduce_noise_fused: exact clipped mean against float64, and the
noise's determinism, stream separation and distribution (isotropic and regulated) with statistical
bounds that a 1.2x-wrong covariance fails.

Runs on a GPU, or on the CPU through TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)."""
import math
import os

import pytest
import torch


def _why_not() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device and TRITON_INTERPRET != 1: Triton kernels cannot run here"
    return None


pytestmark = [pytest.mark.triton, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
Z5 = 5.0  # 5-sigma bounds: a correct kernel fails one with probability ~6e-7


@pytest.fixture(scope="module")
def kern():
    from deer_kernels import clip_reduce_noise as k
    return k


def _chol(r, gen):
    """Upper R with K = R^T R for a random, well-conditioned K (float64). The all-ones term keeps K
    far from diagonal, so a solve on the wrong side (R^-T instead of R^-1) is always detectable."""
    M = torch.randn(r, r + 2, generator=gen, dtype=torch.float64)
    K = M @ M.T / (r + 2) + 0.3 * torch.eye(r, dtype=torch.float64) + 2.0 * torch.ones(r, r, dtype=torch.float64)
    return torch.linalg.cholesky(K).mT.contiguous()


def _clipped_mean64(grads, clip, ebs):
    return (clip.double().cpu()[:, None, None] * grads.double().cpu()).sum(0) / ebs


def _rel(x, ref):
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


KEY = dict(seed=1234, step=3, layer=5, client=7)


# ---------------------------------------------------------------------------------------------
# Exact part (noise_std = 0)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,p,q,side,splits", [(1, 7, 5, None, None), (5, 13, 4, 1, None),
                                               (5, 1, 9, 0, None), (5, 8, 11, 0, 2), (3, 300, 5, None, 3)])
def test_noise_free_is_exact_clipped_mean(kern, gen, b, p, q, side, splits):
    seed = gen.initial_seed()
    grads = torch.randn(b, p, q, generator=gen).to(DEV)
    clip = torch.rand(b, generator=gen).to(DEV)
    chol = None if side is None else _chol(p if side == 0 else q, gen).float().to(DEV)
    out, cfg = kern.clip_reduce_noise_launch(grads, clip, 0.0, 2.5, chol, side or 0, **KEY, splits=splits)
    ref = _clipped_mean64(grads, clip, 2.5)
    assert out.dtype == torch.float32 and out.shape == (p, q)
    assert _rel(out, ref) <= 1e-5, f"rel err {_rel(out, ref):.2e} (seed {seed})"
    assert cfg["finish"]["noise"] == "none"
    if splits is not None:
        assert cfg["reduce"]["grid"][1] == min(splits, b)


@pytest.mark.parametrize("b,T,p,q,splits", [(1, 1, 13, 6, None), (5, 97, 6, 3, None), (5, 1, 9, 4, 2),
                                            (5, 4, 300, 3, 3)])
def test_fused_noise_free_matches_float64(kern, gen, b, T, p, q, splits):
    seed = gen.initial_seed()
    L = torch.randn(b, T, p, generator=gen).to(DEV)
    R = torch.randn(b, T, q, generator=gen).to(DEV)
    clip = torch.rand(b, generator=gen).to(DEV)
    out, _ = kern.clip_reduce_noise_fused_launch(L, R, 0.37, clip, 0.0, 3.0, None, 0, **KEY, splits=splits)
    g = 0.37 * torch.einsum("btp,btq->bpq", L.double().cpu(), R.double().cpu())
    ref = _clipped_mean64(g, clip, 3.0)
    assert _rel(out, ref) <= 1e-5, f"rel err {_rel(out, ref):.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(kern, gen, dtype):
    seed = gen.initial_seed()
    b, T, p, q = 5, 97, 6, 3
    L = torch.randn(b, T, p, generator=gen).to(dtype)
    R = torch.randn(b, T, q, generator=gen).to(dtype)
    clip = torch.rand(b, generator=gen)
    s = 0.37
    # torch, same math in `dtype`: per-sample grads, weighted sum, mean, all rounded to dtype.
    g_t = torch.einsum("btp,btq->bpq", L, R) * torch.tensor(s, dtype=dtype)
    out_t = (clip.to(dtype)[:, None, None] * g_t).sum(0) / torch.tensor(2.0, dtype=dtype)
    ref = _clipped_mean64(s * torch.einsum("btp,btq->bpq", L.double(), R.double()), clip, 2.0)
    t_err = _rel(out_t, ref)
    fused = kern.clip_reduce_noise_fused(L.to(DEV), R.to(DEV), s, clip.to(DEV), 0.0, 2.0, None, 0, **KEY)
    assert _rel(fused, ref) <= 2 * t_err + 1e-6, f"fused {_rel(fused, ref):.2e} vs torch {t_err:.2e} (seed {seed})"
    # Unfused with low-precision per-sample grads: torch's error for the reduction alone.
    g_lp = g_t.to(DEV)
    ref2 = _clipped_mean64(g_lp, clip, 2.0)
    t_err2 = _rel((clip.to(dtype)[:, None, None] * g_t).sum(0) / torch.tensor(2.0, dtype=dtype), ref2)
    out = kern.clip_reduce_noise(g_lp, clip.to(DEV), 0.0, 2.0, None, 0, **KEY)
    assert _rel(out, ref2) <= 2 * t_err2 + 1e-6, f"unfused {_rel(out, ref2):.2e} vs torch {t_err2:.2e} (seed {seed})"


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------

def _noise(kern, grads, clip, std, ebs, chol, side, key):
    """xi recovered from the output: (out * ebs - sum_i c_i g_i) / std, in float64."""
    out = kern.clip_reduce_noise(grads, clip, std, ebs, chol, side, **key)
    return (out.double().cpu() * ebs - _clipped_mean64(grads, clip, 1.0)) / std


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def _pairs(z):
    """Consecutive pairs of a stream's values: two streams sharing a stretch (even shifted) share pairs,
    while independent fp32 streams of this length share one with probability ~ N^2 2^-48."""
    v = z.flatten().float().tolist()
    return set(zip(v[:-1], v[1:]))


def test_same_key_same_noise_and_fused_equals_unfused(kern, gen):
    seed = gen.initial_seed()
    b, T, p, q = 3, 5, 4, 37
    L = torch.randn(b, T, p, generator=gen).to(DEV)
    R = torch.randn(b, T, q, generator=gen).to(DEV)
    clip = torch.rand(b, generator=gen).to(DEV)
    chol = _chol(p, gen).float().to(DEV)
    a = kern.clip_reduce_noise_fused(L, R, 0.5, clip, 0.8, 3.0, chol, 0, **KEY)
    bb = kern.clip_reduce_noise_fused(L, R, 0.5, clip, 0.8, 3.0, chol, 0, **KEY)
    assert torch.equal(a, bb), f"same key, different output (seed {seed})"
    grads = 0.5 * torch.einsum("btp,btq->bpq", L, R)
    u = kern.clip_reduce_noise(grads, clip, 0.8, 3.0, chol, 0, **KEY)
    assert _rel(u, a.double().cpu()) <= 1e-5, f"fused and unfused draw different noise (seed {seed})"


@pytest.mark.parametrize("side", [None, 0, 1])
def test_noise_is_the_shared_stream(kern, gen, side):
    """Same key -> same output as the float64 PyTorch twin, whose Philox stream the CPU and CUDA
    kernels share: all backends release the same noise (fused and unfused alike)."""
    from deer.ops.clip_reduce_noise import clip_reduce_noise_reference
    seed = gen.initial_seed()
    b, T, p, q = 3, 4, 5, 37
    if side == 1:
        p, q = q, p
    L = torch.randn(b, T, p, generator=gen).to(DEV)
    Rt = torch.randn(b, T, q, generator=gen).to(DEV)
    clip = torch.rand(b, generator=gen).to(DEV)
    chol = None if side is None else _chol(p if side == 0 else q, gen)
    key = dict(seed=(int(torch.randint(0, 2 ** 62, (1,), generator=gen)) << 2) | 3, step=11, layer=2 ** 32 - 1,
               client=9)
    grads = 0.5 * torch.einsum("btp,btq->bpq", L, Rt)
    ref = clip_reduce_noise_reference(grads.double().cpu(), clip.double().cpu(), 0.8, 3.0, chol, side or 0, **key)
    c32 = None if chol is None else chol.float().to(DEV)
    out = kern.clip_reduce_noise(grads, clip, 0.8, 3.0, c32, side or 0, **key)
    fused = kern.clip_reduce_noise_fused(L, Rt, 0.5, clip, 0.8, 3.0, c32, side or 0, **key)
    assert _rel(out, ref) <= 1e-5, f"unfused {_rel(out, ref):.2e} (seed {seed}, key {key})"
    assert _rel(fused, ref) <= 1e-5, f"fused {_rel(fused, ref):.2e} (seed {seed}, key {key})"
    # The key is the seed's 64-bit pattern, as on every backend.
    again = kern.clip_reduce_noise(grads, clip, 0.8, 3.0, c32, side or 0, **dict(key, seed=key["seed"] + 2 ** 64))
    assert torch.equal(out, again)


def test_streams_distinct_and_uncorrelated(kern, gen):
    seed = gen.initial_seed()
    p, q = 64, 128
    N = p * q
    grads = torch.randn(2, p, q, generator=gen).to(DEV)
    clip = torch.rand(2, generator=gen).to(DEV)
    base = dict(seed=int(torch.randint(0, 2 ** 62, (1,), generator=gen)), step=3, layer=5, client=7)
    z0 = _noise(kern, grads, clip, 1.0, 1.0, None, 0, base)
    variants = [dict(base, seed=base["seed"] + 1), dict(base, step=4), dict(base, layer=6), dict(base, client=8),
                dict(base, step=5, layer=3),                       # additive key schemes collide here
                dict(base, seed=base["seed"] + 2 ** 63)]           # the key's high 32 bits count
    bound = Z5 / math.sqrt(N)
    pairs0 = _pairs(z0)
    for key in variants:
        z = _noise(kern, grads, clip, 1.0, 1.0, None, 0, key)
        assert not torch.allclose(z, z0), f"{key} repeats the base stream (seed {seed})"
        assert abs(_corr(z, z0)) < bound, f"{key}: corr {_corr(z, z0):.3f} >= {bound:.3f} (seed {seed})"
        assert not (pairs0 & _pairs(z)), f"{key} shares a stretch of the base stream (seed {seed})"
    # The checks have teeth: a shifted copy of the stream shares pairs; a correlated one fails the bound.
    assert pairs0 & _pairs(z0.flatten()[1:])
    assert abs(_corr(z0, 0.3 * z0 + torch.randn(z0.shape, generator=gen, dtype=torch.float64))) > bound


def _iso_stats(z):
    N = z.numel()
    return dict(mean=abs(z.mean().item()) * math.sqrt(N),                      # ~ |N(0,1)|
                var=abs(z.var().item() - 1.0) / math.sqrt(2.0 / N),           # ~ |N(0,1)|
                lag_col=abs(_corr(z[:, 1:], z[:, :-1])) * math.sqrt(N),       # neighbours along rows
                lag_row=abs(_corr(z[1:, :], z[:-1, :])) * math.sqrt(N))       # and along columns


def test_isotropic_noise_distribution(kern, gen):
    from scipy import stats
    seed = gen.initial_seed()
    p, q = 96, 250
    grads = torch.randn(3, p, q, generator=gen).to(DEV)
    clip = torch.rand(3, generator=gen).to(DEV)
    key = dict(KEY, seed=int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    # noise_std and expected_batch_size enter as (S + std xi) / E: recovering xi with them checks both.
    z = _noise(kern, grads, clip, 0.37, 2.5, None, 0, key)
    for name, s in _iso_stats(z).items():
        assert s < Z5, f"{name} statistic {s:.2f} sigma (seed {seed}, key {key})"
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-6, f"not N(0, 1) (seed {seed})"
    # A 1.2x-wrong covariance fails the variance bound.
    assert _iso_stats(math.sqrt(1.2) * z)["var"] > Z5 and _iso_stats(z / math.sqrt(1.2))["var"] > Z5


def _whitened_stats(W):
    """W (r, n): columns should be i.i.d. N(0, I_r). Returns the largest standardised deviation of the
    empirical covariance's entries from I (Bonferroni over r^2 entries at Z5 is still ~1e-4 false
    alarm), the trace statistic, and the mean statistic."""
    r, n = W.shape
    C = W @ W.T / n
    sd = torch.full((r, r), 1.0 / math.sqrt(n), dtype=torch.float64)
    sd.diagonal().fill_(math.sqrt(2.0 / n))
    entry = ((C - torch.eye(r, dtype=torch.float64)).abs() / sd).max().item()
    trace = abs(C.trace().item() / r - 1.0) / math.sqrt(2.0 / (n * r))
    mean = W.mean(1).abs().max().item() * math.sqrt(n)
    return entry, trace, mean


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_regulated_noise_has_covariance_K_inverse(kern, gen, side, r):
    seed = gen.initial_seed()
    # r * n >= 12000 draws: a 1.2x covariance then moves the trace statistic by >= 15 sigma, so the
    # teeth checks below cannot miss by chance; r = 1 needs more columns than r = 8.
    n = max(4000, 12000 // r)
    p, q = (r, n) if side == 0 else (n, r)
    R = _chol(r, gen)
    grads = torch.randn(2, p, q, generator=gen).to(DEV)
    clip = torch.rand(2, generator=gen).to(DEV)
    key = dict(KEY, seed=int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    xi = _noise(kern, grads, clip, 1.0, 1.0, R.float().to(DEV), side, key)
    # side 0: columns ~ N(0, K^-1), so R xi has N(0, I) columns; side 1: rows, so (xi R^T)^T does.
    W = R @ xi if side == 0 else (xi @ R.T).T
    entry, trace, mean = _whitened_stats(W)
    msg = f"(r {r}, side {side}, seed {seed}, key {key})"
    assert entry < Z5 + 1.0 and trace < Z5 and mean < Z5 + 1.0, f"entry {entry:.2f} trace {trace:.2f} mean {mean:.2f} {msg}"
    # Teeth: a 1.2x-wrong covariance fails, and so does isotropic noise (the regulator left out)
    # or the solve on the wrong side (R^-T Z: covariance (R^T R)^-1 read as R^-T R^-1).
    assert _whitened_stats(math.sqrt(1.2) * W)[1] > Z5
    if r > 1:
        Z = torch.randn(r, n, generator=gen, dtype=torch.float64)
        assert _whitened_stats(R @ Z)[0] > Z5 + 1.0
        wrong = torch.linalg.solve_triangular(R.T, Z, upper=False)
        assert _whitened_stats(R @ wrong)[0] > Z5 + 1.0


# ---------------------------------------------------------------------------------------------
# Errors and config
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_say_what_is_wrong(kern, gen):
    g = torch.randn(3, 4, 6, generator=gen).to(DEV)
    c = torch.rand(3, generator=gen).to(DEV)
    R = _chol(4, gen).float().to(DEV)
    ok = dict(noise_std=1.0, expected_batch_size=3.0, chol=R, noise_side=0, **KEY)
    with pytest.raises(TypeError, match="float64"):
        kern.clip_reduce_noise(g.double(), c, **ok)
    with pytest.raises(ValueError, match="one factor per sample"):
        kern.clip_reduce_noise(g, c[:2], **ok)
    with pytest.raises(ValueError, match=r"\(r, r\)"):
        kern.clip_reduce_noise(g, c, **dict(ok, noise_side=1))  # q = 6 != r = 4
    with pytest.raises(ValueError, match="upper triangular"):
        kern.clip_reduce_noise(g, c, **dict(ok, chol=R.T.contiguous()))
    bad = R.clone()
    bad[2, 2] = 0.0
    with pytest.raises(ValueError, match="positive"):
        kern.clip_reduce_noise(g, c, **dict(ok, chol=bad))
    for k, v in (("noise_std", -1.0), ("noise_std", float("nan")), ("expected_batch_size", 0.0),
                 ("noise_side", 2)):
        with pytest.raises(ValueError, match=k):
            kern.clip_reduce_noise(g, c, **dict(ok, **{k: v}))
    for k, v in (("step", -1), ("layer", 2 ** 32), ("client", -5)):
        with pytest.raises(ValueError, match=k):
            kern.clip_reduce_noise(g, c, **dict(ok, **{k: v}))
    with pytest.raises(TypeError, match="seed"):
        kern.clip_reduce_noise(g, c, **dict(ok, seed=1.5))
    L = torch.randn(3, 2, 4, generator=gen).to(DEV)
    with pytest.raises(TypeError, match="float64"):
        kern.clip_reduce_noise_fused(L.double(), L.double(), 1.0, c, **ok)



def test_inverse_follows_in_place_changes(kern, gen):
    """R^-1 comes from chol on every call; changing chol in place must never reuse a stale inverse."""
    seed = gen.initial_seed()
    p, q = 4, 300
    g = torch.randn(2, p, q, generator=gen).to(DEV)
    c = torch.rand(2, generator=gen).to(DEV)
    chol = _chol(p, gen).float().to(DEV)
    a = kern.clip_reduce_noise(g, c, 1.0, 1.0, chol, 0, **KEY)
    assert torch.equal(a, kern.clip_reduce_noise(g, c, 1.0, 1.0, chol, 0, **KEY))
    chol.mul_(2.0)  # R -> 2R: xi -> xi / 2 for the same Z
    b = kern.clip_reduce_noise(g, c, 1.0, 1.0, chol, 0, **KEY)
    S = _clipped_mean64(g, c, 1.0)
    ratio = (b.double().cpu() - S).norm() / (a.double().cpu() - S).norm()
    assert abs(ratio.item() - 0.5) < 1e-4, f"stale R^-1 after an in-place change (seed {seed})"
    chol.copy_(chol.T.clone())  # same tensor, now lower triangular: validated again on this call
    with pytest.raises(ValueError, match="upper triangular"):
        kern.clip_reduce_noise(g, c, 1.0, 1.0, chol, 0, **KEY)


# ---------------------------------------------------------------------------------------------
# Fused optimizer step
# ---------------------------------------------------------------------------------------------

_KIND = {"SGD": 1, "Adam": 2, "AdamW": 3}


def _hyper(kind, t, lr, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, betas=(0.9, 0.999),
           eps=1e-8):
    """update_hyper for step t (1-based) of torch.optim.<kind>(lr=lr, ...): the step-dependent scalars
    (first, step_size, bias2_sqrt) formed as torch forms them."""
    b1, b2 = betas
    return [_KIND[kind], lr, weight_decay, momentum, dampening, float(nesterov), float(t == 1), b1, b2, eps,
            lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)]


def _state_names(kind, hp):
    if kind != "SGD":
        return ["exp_avg", "exp_avg_sq"]
    return ["momentum_buffer"] if hp.get("momentum", 0.0) != 0.0 else []


def _fused_steps_match_torch(kern, gen, kind, hp, steps, side, p, q, poison=False):
    """`steps` fused steps of a (p, q) parameter against torch.optim.<kind>(foreach=False) stepping a
    clone with .grad = the op's output without update for the same key. poison: the last step's
    per-sample gradients get an inf and a NaN, whose output elements must leave param and state as
    they were. Returns the last private gradient."""
    seed = gen.initial_seed()
    b = 3
    chol = None if side is None else _chol(p if side == 0 else q, gen).float().to(DEV)
    # Parameter ~0.1 and steps ~lr * O(1): a 1e-3 relative error in a step exceeds the param tolerance.
    param = 0.1 * torch.randn(p, q, generator=gen)
    ref = param.clone().requires_grad_(True)
    opt = getattr(torch.optim, kind)([ref], foreach=False, **hp)
    names = _state_names(kind, hp)
    empty = torch.empty(0, device=DEV)
    # The SGD buffer starts as NaN: with first = 1 the kernel must overwrite it without reading it.
    bufs = [torch.full((p, q), float("nan" if kind == "SGD" else 0.0), device=DEV) for _ in names]
    fused = [param.to(DEV)] + bufs + [empty] * (2 - len(bufs))
    for t in range(1, steps + 1):
        grads = torch.randn(b, p, q, generator=gen)
        if poison and t == steps:
            grads[1, 2, 3] = float("inf")
            grads[0, p - 1, q - 1] = float("nan")
        grads, clip = grads.to(DEV), torch.rand(b, generator=gen).to(DEV)
        key = dict(KEY, step=t)
        g = kern.clip_reduce_noise(grads, clip, 0.7, 2.5, chol, side or 0, **key)
        before = [x.clone() for x in fused]
        out, cfg = kern.clip_reduce_noise_launch(grads, clip, 0.7, 2.5, chol, side or 0, **key,
                                                 update_tensors=fused, update_hyper=_hyper(kind, t, **hp))
        torch.testing.assert_close(out, g, rtol=0, atol=0, equal_nan=True)  # the update leaves the gradient alone
        assert cfg["finish"]["update"] == kind
        ref.grad = g.cpu().clone()
        opt.step()
    ok = torch.isfinite(g.cpu())
    assert int((~ok).sum()) == (2 if poison else 0)
    expected = [ref.detach()] + [opt.state[ref][n] for n in names]
    for name, x, e, x0 in zip(["param"] + names, fused, expected, before):
        msg = f"{kind} {hp} side {side}: {name} (seed {seed})"
        x = x.cpu()
        torch.testing.assert_close(x[ok], e[ok], rtol=1e-5, atol=1e-7, msg=lambda m: f"{msg}\n{m}")
        assert torch.equal(x[~ok], x0.cpu()[~ok]), f"{msg}: changed where the gradient is not finite"
    return g


UPDATE_CASES = [("SGD", dict(lr=0.1), 1),
                ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05), 3),
                # torch.optim.SGD refuses nesterov with dampening != 0, so nesterov runs undamped.
                ("SGD", dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05), 3),
                # Distinct betas and an eps near sqrt(v): swapped or misplaced scalars fail visibly.
                ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1), 3),
                ("AdamW", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1), 3)]


@pytest.mark.parametrize("side,p,q", [(None, 5, 7), (0, 5, 300), (1, 300, 7)])  # 300: two finishing tiles
@pytest.mark.parametrize("kind,hp,steps", UPDATE_CASES,
                         ids=["sgd", "sgd-momentum-dampening-wd", "sgd-nesterov-wd", "adam-wd", "adamw-wd"])
def test_fused_update_matches_torch_optim(kern, gen, kind, hp, steps, side, p, q):
    _fused_steps_match_torch(kern, gen, kind, hp, steps, side, p, q)


@pytest.mark.parametrize("kind,hp,steps", [UPDATE_CASES[1], UPDATE_CASES[3]], ids=["sgd-momentum", "adam"])
def test_fused_update_skips_non_finite_gradient(kern, gen, kind, hp, steps):
    _fused_steps_match_torch(kern, gen, kind, hp, steps, None, 5, 7, poison=True)


def test_fused_update_bad_inputs_say_what_is_wrong(kern, gen):
    p, q = 4, 6
    g = torch.randn(3, p, q, generator=gen).to(DEV)
    c = torch.rand(3, generator=gen).to(DEV)
    param, m, v = (torch.randn(p, q, generator=gen).to(DEV) for _ in range(3))
    adam = _hyper("Adam", 1, lr=0.01)
    keep = [x.clone() for x in (param, m, v)]

    def call(tensors, hyper):
        return kern.clip_reduce_noise(g, c, 1.0, 3.0, None, 0, **KEY, update_tensors=tensors, update_hyper=hyper)

    cases = [
        (ValueError, r"\(4, 6\) like the gradient", [param[:, :5], m, v], adam),
        (ValueError, r"exp_avg_sq .*cannot be empty", [param, m, torch.empty(0, device=DEV)], adam),
        (ValueError, "momentum_buffer", [param, torch.empty(0, device=DEV), v], _hyper("SGD", 1, 0.1, momentum=0.9)),
        (TypeError, "float32", [param.double(), m, v], adam),
        (TypeError, "float32", [param, m.half(), v], adam),
        (ValueError, "contiguous", [torch.randn(q, p, generator=gen).to(DEV).T, m, v], adam),
        (ValueError, "3 tensors", [param, m], adam),
        (ValueError, "12 update_hyper", [param, m, v], adam[:-1]),
        (ValueError, "not finite", [param, m, v], [2, float("nan")] + adam[2:]),
        (ValueError, "kind", [param, m, v], [4] + adam[1:]),
        (ValueError, "bias2_sqrt", [param, m, v], adam[:-1] + [0.0]),
    ]
    for exc, match, tensors, hyper in cases:
        with pytest.raises(exc, match=match):
            call(tensors, hyper)
    for x, x0 in zip((param, m, v), keep):
        assert torch.equal(x, x0), "a rejected update touched its tensors"
    # kind 0 is no update; plain SGD never touches its (empty) buffers.
    out = call([param, m, v], [0] + adam[1:])
    assert torch.equal(param, keep[0]) and torch.equal(out, call([], []))
    call([param, torch.empty(0, device=DEV), torch.empty(0, device=DEV)], _hyper("SGD", 1, 0.1))
    assert torch.allclose(param, keep[0] - 0.1 * out)
