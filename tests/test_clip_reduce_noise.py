"""clip_reduce_noise / clip_reduce_noise_fused on every available backend against the float64
reference (fresh random inputs, odd sizes), plus statistical tests of the noise: mean 0, covariance
identity (isotropic) or sigma^2 C^2 K^{-1} (regulated) within 5-sigma bounds that a 1.2x-wrong
covariance fails (checked by planting that error), determinism per key and independence across keys."""
import importlib.util
import math
import os

import pytest
import torch

from deer.ops import (BackendUnavailable, clip_reduce_noise, clip_reduce_noise_fused, clip_reduce_noise_grouped,
                      clip_reduce_noise_reference,
                      clip_reduce_noise_fused_reference, philox_normal_reference, unavailable_reason)

OP = "clip_reduce_noise"
# Backends that draw the documented Philox layout of csrc/clip_reduce_noise/philox.h (deer_kernels too), which the
# reference reproduces in PyTorch ops: their noisy output must match the reference exactly.
SAME_STREAM = ("cpu", "cuda", "triton", "reference")


def _backends():
    out = ["reference"]
    if unavailable_reason("cpu", "cpu", OP) is None:
        out.append("cpu")
    if importlib.util.find_spec(f"deer_kernels.{OP}") is not None and (
            torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    out.append(pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]))
    return out


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_if_unavailable(backend):
    why = unavailable_reason(backend, _device(backend), OP)
    if why:
        pytest.skip(why)


def _rel(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _chol(r, gen):
    A = torch.randn(r, r, generator=gen, dtype=torch.float64)
    K = A @ A.T + 0.3 * torch.eye(r, dtype=torch.float64)
    return K, torch.linalg.cholesky(K).mT.contiguous()


def _key(gen):
    return dict(seed=int(torch.randint(0, 2**62, (1,), generator=gen)), step=int(torch.randint(0, 2**31, (1,), generator=gen)),
                layer=int(torch.randint(0, 100, (1,), generator=gen)), client=int(torch.randint(0, 2**31, (1,), generator=gen)))


# (b, p, q): batch 1 and 33, ranks 1/4/8/64 on the side the regulated noise acts on.
SHAPES = [(1, 5, 1), (33, 17, 4), (33, 8, 97), (2, 2304, 8), (3, 64, 65), (1, 1, 768)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    b, p, q = shape
    g = torch.randn(b, p, q, generator=gen, dtype=torch.float64)
    clip = torch.rand(b, generator=gen, dtype=torch.float64)
    key = _key(gen)
    msg = f"seed {gen.initial_seed()} shape {shape} key {key}"
    cases = [(None, 1)]
    if q <= 64:
        cases.append((_chol(q, gen)[1], 1))
    if p <= 64:
        cases.append((_chol(p, gen)[1], 0))
    # Noise-free: exactly the clipped mean on every backend.
    want0 = clip_reduce_noise_reference(g, clip, 0.0, 5.5)
    got0 = clip_reduce_noise(g.float().to(dev), clip.float().to(dev), 0.0, 5.5, backend=backend)
    assert got0.shape == (p, q) and got0.dtype == torch.float32
    assert _rel(got0, want0) <= 1e-5, msg
    if backend not in SAME_STREAM:
        return
    for chol, side in cases:
        want = clip_reduce_noise_reference(g, clip, 0.9, 5.5, chol, side, **key)
        got = clip_reduce_noise(g.float().to(dev), clip.float().to(dev), 0.9, 5.5,
                                None if chol is None else chol.float().to(dev), side, backend=backend, **key)
        assert _rel(got, want) <= 1e-5, f"{msg} side {side} regulated {chol is not None}"
        if backend not in ("reference", "triton"):  # Triton kernels take fp32/fp16/bf16 only
            got64 = clip_reduce_noise(g.to(dev), clip.to(dev), 0.9, 5.5, None if chol is None else chol.to(dev),
                                      side, backend=backend, **key)
            assert got64.dtype == torch.float64 and _rel(got64, want) <= 1e-10, msg


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", [(1, 1, 5, 1), (33, 97, 17, 4), (3, 97, 8, 64), (2, 3, 2304, 8), (2, 5, 8, 768)])
def test_fused_matches_reference(backend, shape, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    b, T, p, q = shape
    L = torch.randn(b, T, p, generator=gen, dtype=torch.float64)
    R = torch.randn(b, T, q, generator=gen, dtype=torch.float64)
    clip = torch.rand(b, generator=gen, dtype=torch.float64)
    key = _key(gen)
    msg = f"seed {gen.initial_seed()} shape {shape}"
    want0 = clip_reduce_noise_fused_reference(L, R, 0.6, clip, 0.0, 3.0)
    got0 = clip_reduce_noise_fused(L.float().to(dev), R.float().to(dev), 0.6, clip.float().to(dev), 0.0, 3.0,
                                   backend=backend)
    assert _rel(got0, want0) <= 1e-5, msg
    if backend in SAME_STREAM:
        side = 1 if q <= p else 0
        chol = _chol(min(p, q), gen)[1]
        want = clip_reduce_noise_fused_reference(L, R, 0.6, clip, 2.0, 3.0, chol, side, **key)
        got = clip_reduce_noise_fused(L.float().to(dev), R.float().to(dev), 0.6, clip.float().to(dev), 2.0, 3.0,
                                      chol.float().to(dev), side, backend=backend, **key)
        assert _rel(got, want) <= 1e-5, msg


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(backend, dtype, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    g = torch.randn(33, 17, 9, generator=gen).to(dtype)
    clip = torch.rand(33, generator=gen).to(dtype)
    want = clip_reduce_noise_reference(g.double(), clip.double(), 0.0, 4.0)
    ref_lp = torch.einsum("b,bpq->pq", clip, g) / 4.0                  # the same math in `dtype`
    got = clip_reduce_noise(g.to(dev), clip.to(dev), 0.0, 4.0, backend=backend)
    assert _rel(got, want) <= 2 * _rel(ref_lp, want), f"seed {gen.initial_seed()} {dtype}"


# ------------------------------------------------------------------------------------------------
# Noise statistics. xi_hat = (noisy - clean) * ebs / noise_std is the backend's xi.
# ------------------------------------------------------------------------------------------------

def _xi(backend, dev, g, clip, std, ebs, chol, side, key):
    noisy = clip_reduce_noise(g.to(dev), clip.to(dev), std, ebs, None if chol is None else chol.float().to(dev),
                              side, backend=backend, **key)
    clean = clip_reduce_noise(g.to(dev), clip.to(dev), 0.0, ebs, backend=backend)
    return ((noisy - clean).double().cpu() * ebs / std)


def _iid_standard_normal_ok(z):
    """Mean 0 and variance 1 within 5 sigma, Box-Muller pairs and neighbours uncorrelated."""
    z = z.flatten()
    n = z.numel()
    ok_mean = abs(z.mean().item()) < 5 / math.sqrt(n)
    ok_var = abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    even, odd = z[: n // 2 * 2 : 2], z[1: n // 2 * 2 : 2]
    ok_pair = abs((even * odd).mean().item()) < 5 / math.sqrt(n // 2)
    ok_lag = abs((z[:-3] * z[3:]).mean().item()) < 5 / math.sqrt(n)
    return ok_mean and ok_var and ok_pair and ok_lag


def _whitened_cov_ok(W, axis_samples):
    """W: whitened noise, samples along `axis_samples`; its r x r covariance must be I (5 sigma per entry)."""
    W = W if axis_samples == 1 else W.T                      # (r, n)
    r, n = W.shape
    C = W @ W.T / n
    return (C - torch.eye(r, dtype=C.dtype)).abs().max().item() < 5 * math.sqrt(2 / n), C


@pytest.mark.parametrize("backend", _backends())
def test_isotropic_noise_is_standard_normal(backend, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    p, q = 257, 255                                           # 65535 draws, odd sizes
    g = torch.randn(2, p, q, generator=gen)
    clip = torch.rand(2, generator=gen)
    xi = _xi(backend, dev, g, clip, 1.7, 3.0, None, 1, _key(gen))
    assert _iid_standard_normal_ok(xi), f"seed {gen.initial_seed()}: mean {xi.mean():.4f} var {xi.var():.4f}"
    assert not _iid_standard_normal_ok(xi * math.sqrt(1.2)), "the bound must reject a 1.2x covariance"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("side", [0, 1])
def test_regulated_noise_covariance_is_K_inverse(backend, side, gen):
    """Every column (side 0) / row (side 1) of xi has covariance K^{-1}: whitened by R it is N(0, I)."""
    _skip_if_unavailable(backend)
    dev = _device(backend)
    r, n = 4, 12001
    K, R = _chol(r, gen)
    p, q = (r, n) if side == 0 else (n, r)
    g = torch.randn(1, p, q, generator=gen)
    clip = torch.rand(1, generator=gen)
    xi = _xi(backend, dev, g, clip, 0.8, 2.0, R, side, _key(gen))
    W = R @ xi if side == 0 else xi @ R.mT                   # whitening: covariance K^{-1} -> I
    ok, C = _whitened_cov_ok(W, 1 if side == 0 else 0)
    assert ok, f"seed {gen.initial_seed()}: whitened covariance\n{C}"
    assert not _whitened_cov_ok(W * math.sqrt(1.2), 1 if side == 0 else 0)[0], "must reject a 1.2x covariance"
    # Isotropic noise whitened by R has covariance K, not I: the test tells the two apart.
    Z = torch.randn(p, q, generator=gen, dtype=torch.float64)
    assert not _whitened_cov_ok(R @ Z if side == 0 else Z @ R.mT, 1 if side == 0 else 0)[0]


@pytest.mark.parametrize("backend", _backends())
def test_same_key_same_noise_distinct_keys_independent(backend, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    p, q = 129, 130
    g = torch.randn(3, p, q, generator=gen)
    clip = torch.rand(3, generator=gen)
    key = _key(gen)
    a = clip_reduce_noise(g.to(dev), clip.to(dev), 1.0, 1.0, backend=backend, **key)
    b = clip_reduce_noise(g.to(dev), clip.to(dev), 1.0, 1.0, backend=backend, **key)
    assert torch.equal(a, b), "the same (seed, step, layer, client) must reproduce the output exactly"
    clean = clip_reduce_noise(g.to(dev), clip.to(dev), 0.0, 1.0, backend=backend)
    za = (a - clean).double().flatten()
    for field in ("seed", "step", "layer", "client"):
        other = dict(key, **{field: key[field] + 1})
        zb = (clip_reduce_noise(g.to(dev), clip.to(dev), 1.0, 1.0, backend=backend, **other) - clean).double().flatten()
        assert not torch.equal(za, zb), f"changing {field} must change the noise"
        corr = (za * zb).mean() / (za.pow(2).mean() * zb.pow(2).mean()).sqrt()
        assert abs(corr.item()) < 5 / math.sqrt(p * q), f"seed {gen.initial_seed()}: {field} corr {corr:.4f}"


def test_reference_stream_is_the_documented_philox():
    """Z[0] and Z[1] for key 0, counter (0, 0, 0, 0): Box-Muller of the Random123 known-answer words."""
    words = [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    a = (words[1] << 32) | words[0]
    b = (words[3] << 32) | words[2]
    u1 = ((a >> 11) + 1) * 2.0 ** -53
    u2 = (b >> 11) * 2.0 ** -53
    rad = math.sqrt(-2 * math.log(u1))
    z = philox_normal_reference((2,), 0, 0, 0, 0)
    assert z[0].item() == pytest.approx(rad * math.cos(2 * math.pi * u2), rel=1e-15)
    assert z[1].item() == pytest.approx(rad * math.sin(2 * math.pi * u2), rel=1e-15)


def test_bad_input_says_what_is_wrong():
    g, clip = torch.randn(3, 4, 5), torch.rand(3)
    with pytest.raises(ValueError, match=r"clip must be \(b,\)"):
        clip_reduce_noise(g, torch.rand(2), 1.0, 1.0)
    with pytest.raises(ValueError, match="upper Cholesky factor"):
        clip_reduce_noise(g, clip, 1.0, 1.0, chol=torch.eye(4), noise_side=1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        clip_reduce_noise(g, clip, 1.0, 0.0)
    with pytest.raises(ValueError, match="noise_std"):
        clip_reduce_noise(g, clip, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\^32\)"):
        clip_reduce_noise(g, clip, 1.0, 1.0, step=2**32)
    if unavailable_reason("cpu", "cpu", OP) is None:
        with pytest.raises((ValueError, RuntimeError), match="positive definite"):
            clip_reduce_noise(g, clip, 1.0, 1.0, chol=torch.zeros(5, 5), noise_side=1, backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            clip_reduce_noise(g, clip, 1.0, 1.0, backend="cuda")


@pytest.mark.parametrize("backend", _backends())
def test_grouped_equals_one_call_per_layer(backend, gen):
    """clip_reduce_noise_grouped: every layer's output equals that layer's own clip_reduce_noise call
    (same keys: same noise) and the float64 reference; mixed shapes, sides, isotropic and regulated
    layers, and on CUDA enough elements in total for the single grouped launch."""
    _skip_if_unavailable(backend)
    dev = _device(backend)
    big = dev == "cuda"
    shapes = [(3, 2304 if big else 96, 8, 1, True), (2, 8, 3072 if big else 40, 0, True), (4, 17, 4, 1, False),
              (3, 2304 if big else 96, 8, 1, False), (2, 5, 1, 1, True)] * (4 if big else 1)
    grads, clips, chols, sides = [], [], [], []
    for b, p, q, side, regulated in shapes:
        grads.append(torch.randn(b, p, q, generator=gen).to(dev))
        clips.append(torch.rand(b, generator=gen).to(dev))
        chols.append(_chol(p if side == 0 else q, gen)[1].float().to(dev) if regulated else None)
        sides.append(side)
    layers = [7 * k + 2 for k in range(len(shapes))]
    key = _key(gen)
    outs = clip_reduce_noise_grouped(grads, clips, 0.8, 6.0, chols, sides, key["seed"], key["step"], layers,
                                     key["client"], backend=backend)
    assert len(outs) == len(shapes)
    for k, (g, c, ch, s, lid) in enumerate(zip(grads, clips, chols, sides, layers)):
        one = clip_reduce_noise(g, c, 0.8, 6.0, ch, s, key["seed"], key["step"], lid, key["client"], backend=backend)
        want = clip_reduce_noise_reference(g.double().cpu(), c.double().cpu(), 0.8, 6.0,
                                           None if ch is None else ch.double().cpu(), s, key["seed"], key["step"], lid,
                                           key["client"])
        msg = f"seed {gen.initial_seed()} layer {k}"
        assert outs[k].shape == one.shape and outs[k].dtype == torch.float32, msg
        assert _rel(outs[k], want) <= 1e-5, msg
        assert _rel(outs[k], one.double().cpu()) <= 1e-6, msg


def test_grouped_rejects_bad_lists(gen):
    g = [torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)]
    c = [torch.rand(2, generator=gen), torch.rand(2, generator=gen)]
    with pytest.raises(ValueError, match="one entry per layer"):
        clip_reduce_noise_grouped(g, c[:1], 1.0, 2.0)
    with pytest.raises(ValueError, match=r"layer 1\).*clip must be \(b,\)"):
        clip_reduce_noise_grouped(g, [c[0], torch.rand(3)], 1.0, 2.0)
    with pytest.raises(ValueError, match=r"grads\[0\] must be \(b, p, q\)"):
        clip_reduce_noise_grouped([g[0][0]] + g[1:], c, 1.0, 2.0)
    assert clip_reduce_noise_grouped([], [], 1.0, 2.0) == []
