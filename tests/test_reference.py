"""The float64 reference (docs/design.md sections 1-6) against independent formulations."""
import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from deer import reference as ref

D = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=D)


def _vmap_grads(x, W, bias, A, B, scale, target):
    """Per-sample gradients of a per-sample loss through torch.func (vmap of grad)."""
    def loss(A_, B_, xi, ti):
        y = ref.lora_forward(xi.unsqueeze(0), W, bias, A_, B_, scale)
        return (y * ti.unsqueeze(0)).sum() + 0.5 * (y ** 2).sum()
    gA, gB = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(A, B, x, target)
    return gA, gB


@pytest.mark.parametrize("b,T,n,m,r", [(5, None, 7, 11, 1), (4, 1, 9, 6, 3), (3, 97, 12, 5, 4),
                                       (6, 13, 16, 24, 8), (1, 2, 5, 5, 5)])
def test_per_sample_grads_match_torch_func(gen, b, T, n, m, r):
    shape_x = (b, n) if T is None else (b, T, n)
    x = _rand(gen, *shape_x)
    W, bias = _rand(gen, m, n), _rand(gen, m)
    A, B = _rand(gen, r, n), _rand(gen, m, r)  # B non-zero so that dL/dA is non-trivial
    scale = 1.7
    target = _rand(gen, *shape_x[:-1], m)
    gA, gB = _vmap_grads(x, W, bias, A, B, scale, target)
    # grad_out of the summed loss: dL/dy = target + y
    y = ref.lora_forward(x, W, bias, A, B, scale)
    G = target + y
    got = ref.per_sample_grads(x, G, A, B, scale, "AB")
    assert got["A"].shape == (b, r, n) and got["B"].shape == (b, m, r)
    assert _rel(got["A"], gA) < 1e-10, f"seed {gen.initial_seed()}"
    assert _rel(got["B"], gB) < 1e-10, f"seed {gen.initial_seed()}"
    # Phase selection returns only the trained factor.
    assert set(ref.per_sample_grads(x, G, A, B, scale, "A")) == {"A"}
    assert set(ref.per_sample_grads(x, G, A, B, scale, "B")) == {"B"}


def test_regulated_norm_is_weight_space_norm(gen):
    b, m, n, r = 7, 9, 13, 3
    A, B = _rand(gen, r, n), _rand(gen, m, r)
    gB, gA = _rand(gen, b, m, r), _rand(gen, b, r, n)
    # B trained: ||g A||_F^2 ; A trained: ||B g||_F^2 (lambda = 0)
    assert torch.allclose(ref.sq_norms(gB, "B", ref.metric_gram(A, B, "B")), (gB @ A).flatten(1).pow(2).sum(1))
    assert torch.allclose(ref.sq_norms(gA, "A", ref.metric_gram(A, B, "A")), (B @ gA).flatten(1).pow(2).sum(1))
    # ridge adds lambda ||g||^2
    lam = 0.3
    assert torch.allclose(ref.sq_norms(gA, "A", ref.metric_gram(A, B, "A", lam)),
                          (B @ gA).flatten(1).pow(2).sum(1) + lam * gA.flatten(1).pow(2).sum(1))


# ------------------------------------------------------------------------------------------------
# Regulated noise: the two forms have the same covariance K^{-1}
# ------------------------------------------------------------------------------------------------

def _whitened_cov_error(samples, R):
    """samples: (N, r) rows ~ N(0, Sigma). Returns max |R Sigma_hat R^T - I|: 0 when Sigma = K^{-1}."""
    S = samples.T @ samples / samples.shape[0]
    return (R @ S @ R.T - torch.eye(R.shape[0], dtype=D)).abs().max().item()


N_DRAWS = 40000
# Entry-wise sd of the whitened sample covariance is <= sqrt(2 / N) = 0.0071; 0.05 is 7 sd, so a
# correct form fails with negligible probability while a covariance off by a factor 1.2 (error 0.2
# on the diagonal) always fails.
BOUND = 0.05


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_regulated_noise_forms_share_covariance(gen, factor, lam):
    m, n, r = 6, 5, 3
    A, B = _rand(gen, r, n) * 2.0, _rand(gen, m, r) * 0.5
    K = ref.metric_gram(A, B, factor, lam)
    R = ref.cholesky_upper(K)
    other = N_DRAWS  # columns (A) or rows (B) are iid draws of the r-dimensional noise vector
    if factor == "A":
        chol = ref.regulated_noise_cholesky(K, "A", other, gen).T                # (N, r)
        Abig = _rand(gen, r, other)
        pinv = ref.regulated_noise_pinv(Abig, B, "A", lam, gen).T                 # (N, r)
    else:
        chol = ref.regulated_noise_cholesky(K, "B", other, gen)                   # (N, r)
        Bbig = _rand(gen, other, r)
        pinv = ref.regulated_noise_pinv(A, Bbig, "B", lam, gen)                   # (N, r)
    assert _whitened_cov_error(chol, R) < BOUND, f"seed {gen.initial_seed()}"
    assert _whitened_cov_error(pinv, R) < BOUND, f"seed {gen.initial_seed()}"
    # the check has power: either form scaled so its covariance is off by 1.2 fails it
    assert _whitened_cov_error(chol * math.sqrt(1.2), R) > BOUND
    assert _whitened_cov_error(pinv * math.sqrt(1 / 1.2), R) > BOUND
    # and the two forms agree with each other directly
    Sc, Sp = chol.T @ chol / other, pinv.T @ pinv / other
    assert (R @ (Sc - Sp) @ R.T).abs().max().item() < 2 * BOUND


def test_regulated_noise_does_not_grow_with_frozen_scale(gen):
    """In weight space, B xi (A trained) and xi A (B trained): regulated noise is a projection of an
    isotropic draw, independent of the frozen factor's scale; isotropic noise grows with it."""
    m, n, r, reps = 20, 16, 4, 200
    A0, B0 = _rand(gen, r, n), _rand(gen, m, r)

    def mean_sq(fn):
        return sum(fn().pow(2).sum().item() for _ in range(reps)) / reps

    for factor in ("A", "B"):
        res = {}
        for s in (1.0, 10.0):
            A, B = (A0, B0 * s) if factor == "A" else (A0 * s, B0)
            K = ref.metric_gram(A, B, factor, 0.0)
            if factor == "A":
                reg = lambda: B @ ref.regulated_noise_cholesky(K, "A", n, gen)
                iso = lambda: B @ ref.isotropic_noise((r, n), gen)
            else:
                reg = lambda: ref.regulated_noise_cholesky(K, "B", m, gen) @ A
                iso = lambda: ref.isotropic_noise((m, r), gen) @ A
            res[s] = (mean_sq(reg), mean_sq(iso))
        # E||P N||^2 = r * (n or m) for the projection of an m x n standard Gaussian
        expected = r * (n if factor == "A" else m)
        for s in (1.0, 10.0):
            assert abs(res[s][0] / expected - 1) < 0.15, (factor, s, res, gen.initial_seed())
        assert 0.8 < res[10.0][0] / res[1.0][0] < 1.25
        assert res[10.0][1] / res[1.0][1] > 50  # isotropic: grows with scale^2 = 100


# ------------------------------------------------------------------------------------------------
# Whitened sensitivity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", ["A", "B"])
def test_metric_clipping_bounds_whitened_sensitivity(gen, factor):
    b, m, n, r, C = 64, 12, 10, 4, 0.8
    A, B = _rand(gen, r, n) * 3.0, _rand(gen, m, r) * 3.0   # frozen factor with sigma_max well above 1
    K = ref.metric_gram(A, B, factor, 1e-3)
    R = ref.cholesky_upper(K)
    g = _rand(gen, b, r, n) if factor == "A" else _rand(gen, b, m, r)
    g = g * torch.logspace(-2, 2, b, dtype=D).view(b, 1, 1)   # small and large samples
    c = ref.clip_factors(ref.sq_norms(g, factor, K), C)
    phi = ref.whiten(g * c.view(b, 1, 1), R, factor).flatten(1).norm(dim=1)
    assert (phi <= C * (1 + 1e-9)).all()
    assert (phi > 0.99 * C).any()  # large samples sit on the bound
    # ||Phi(g)|| equals the metric norm
    assert torch.allclose(ref.whiten(g, R, factor).flatten(1).pow(2).sum(1), ref.sq_norms(g, factor, K))

    # Euclidean clipping: whitened norm exceeds C, up to C * sigma_max(K^{1/2})
    ce = ref.clip_factors(ref.sq_norms(g, factor, None), C)
    phi_e = ref.whiten(g * ce.view(b, 1, 1), R, factor).flatten(1).norm(dim=1)
    smax = torch.linalg.eigvalsh(K).max().sqrt().item()
    assert smax > 2
    assert (phi_e <= C * smax * (1 + 1e-9)).all()
    assert (phi_e > C * 1.5).any()
    # the worst case is attained by a sample along the top eigenvector of K
    w, V = torch.linalg.eigh(K)
    top = V[:, -1]
    g_worst = (top[:, None] * torch.ones(1, n, dtype=D) if factor == "A" else torch.ones(m, 1, dtype=D) * top[None, :])
    g_worst = (g_worst / g_worst.norm() * 5).unsqueeze(0)
    cw = ref.clip_factors(ref.sq_norms(g_worst, factor, None), C)
    phiw = ref.whiten(g_worst * cw.view(1, 1, 1), R, factor).norm().item()
    assert abs(phiw / (C * smax) - 1) < 1e-5


# ------------------------------------------------------------------------------------------------
# Full reference DP step
# ------------------------------------------------------------------------------------------------

def _layers(gen, specs, T=5, b=9):
    out = []
    for m, n, r in specs:
        out.append(ref.LayerBatch(x=_rand(gen, b, T, n), grad_out=_rand(gen, b, T, m),
                                  A=_rand(gen, r, n), B=_rand(gen, m, r), scale=2.0))
    return out


@pytest.mark.parametrize("phase", ["A", "B", "AB"])
def test_dp_step_noise_free_is_clipped_mean(gen, phase):
    layers = _layers(gen, [(8, 6, 2), (5, 7, 3)])
    C, bexp = 0.5, 12.0
    res = ref.dp_step(layers, phase, C, 0.0, bexp)
    # independent recomputation: flatten every trained tensor of every sample
    flats, shapes = [], []
    for lb in layers:
        g = ref.per_sample_grads(lb.x, lb.grad_out, lb.A, lb.B, lb.scale, phase)
        for f in ref.trained_factors(phase):
            flats.append(g[f].flatten(1))
            shapes.append(g[f].shape[1:])
    flat = torch.cat(flats, 1)
    c = torch.clamp(C / (flat.norm(dim=1) + 1e-6), max=1.0)
    mean = (c[:, None] * flat).sum(0) / bexp
    got = torch.cat([res.grads[i][f].flatten() for i in range(len(layers)) for f in ref.trained_factors(phase)])
    assert torch.allclose(got, mean, rtol=1e-12, atol=1e-14)
    # clipped per-sample total norm is at most C
    assert ((c[:, None] * flat).norm(dim=1) <= C * (1 + 1e-9)).all()


def test_dp_step_per_layer_clipping_and_noise_scale(gen):
    layers = _layers(gen, [(8, 6, 2), (5, 7, 3)], b=4)
    C, sigma = 1.0, 2.0
    res = ref.dp_step(layers, "B", C, 0.0, 4.0, clipping="per_layer")
    assert res.clip.shape == (2, 4)
    assert math.isclose(res.info["sensitivity"], C)
    for k, lb in enumerate(layers):
        g = ref.per_sample_grads(lb.x, lb.grad_out, lb.A, lb.B, lb.scale, "B")["B"]
        ck = ref.clip_factors(g.flatten(1).pow(2).sum(1), C / math.sqrt(2))
        assert torch.allclose(res.grads[k]["B"], torch.einsum("b,bij->ij", ck, g) / 4.0)
    # noise std is sigma * C per entry: estimate from many noisy steps of a zero-gradient batch
    zero = [ref.LayerBatch(x=torch.zeros(2, 1, 30, dtype=D), grad_out=torch.zeros(2, 1, 40, dtype=D),
                           A=_rand(gen, 3, 30), B=_rand(gen, 40, 3), scale=1.0)]
    draws = torch.cat([ref.dp_step(zero, "B", C, sigma, 1.0, generator=gen).grads[0]["B"].flatten()
                       for _ in range(50)])
    assert abs(draws.std().item() / (sigma * C) - 1) < 0.05


def test_dp_step_effective_multiplier_paper_mode(gen):
    layers = _layers(gen, [(8, 6, 2)])
    layers[0].A.mul_(4.0)
    sigma = 1.0
    res = ref.dp_step(layers, "B", 1.0, sigma, 8.0, metric="euclidean", noise="regulated", generator=gen)
    smax = torch.linalg.eigvalsh(ref.metric_gram(layers[0].A, layers[0].B, "B")).max().sqrt().item()
    assert math.isclose(res.noise_multiplier_effective, sigma / smax, rel_tol=1e-9)
    assert res.noise_multiplier_effective < sigma
    ok = ref.dp_step(layers, "B", 1.0, sigma, 8.0, metric="regulated", noise="regulated", generator=gen)
    assert ok.noise_multiplier_effective == sigma


def test_dp_step_effective_multiplier_metric_clipping_isotropic_noise(gen):
    """Metric clipping with isotropic noise: Euclidean sensitivity C / sqrt(lambda_min(K)) of the worst
    tensor, so the charged multiplier is sigma * min_l sqrt(lambda_min(K_l)) (two layers of different
    scale: taking the max, or one layer only, gives another number)."""
    layers = _layers(gen, [(8, 6, 2), (7, 5, 3)])
    layers[0].A.mul_(0.3)
    layers[1].A.mul_(5.0)
    sigma, lam = 1.3, 1e-2
    res = ref.dp_step(layers, "B", 1.0, sigma, 8.0, metric="regulated", noise="isotropic", lam=lam, generator=gen)
    smins = [torch.linalg.eigvalsh(ref.metric_gram(lb.A, lb.B, "B", lam)).min().sqrt().item() for lb in layers]
    assert smins[0] != pytest.approx(smins[1], rel=0.1)
    assert math.isclose(res.noise_multiplier_effective, sigma * min(smins), rel_tol=1e-9)


def test_dp_step_bad_input():
    with pytest.raises(ValueError, match="phase must be one of"):
        ref.dp_step([], "C", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one LoRA layer"):
        ref.dp_step([], "A", 1.0, 1.0, 1.0)
    lb = ref.LayerBatch(torch.randn(2, 3, dtype=D), torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D),
                        torch.zeros(4, 2, dtype=D), 1.0)
    with pytest.raises(ValueError, match="frozen factor"):
        ref.dp_step([lb], "AB", 1.0, 1.0, 2.0, noise="regulated")
    # B = 0 (LoRA init) makes the A-phase metric singular without a ridge: clear error
    with pytest.raises(ValueError, match="ridge lambda"):
        ref.dp_step([lb], "A", 1.0, 1.0, 2.0, metric="regulated", noise="regulated")
    ref.dp_step([lb], "A", 1.0, 1.0, 2.0, metric="regulated", noise="regulated", lam=1e-3)
