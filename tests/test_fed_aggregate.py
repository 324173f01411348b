"""Server aggregation against a float64 hand computation: weighted FedAvg of the trained factor only,
client-level clipping of the whole update (Euclidean and regulated metric), and the noise's law."""
import math

import pytest
import torch

from deer.fed.aggregate import aggregate
from deer.fed.config import method_spec


def _state(gen, layers, r):
    """A flat LoRA state (deer.nn.get_lora_state names: '<layer>.lora_A' / '.lora_B')."""
    out = {}
    for n, (m, nn_) in layers.items():
        out[_k(n, "A")] = torch.randn(r, nn_, generator=gen, dtype=torch.float64)
        out[_k(n, "B")] = torch.randn(m, r, generator=gen, dtype=torch.float64)
    return out


def _k(layer, factor):
    return f"{layer}.lora_{factor}"


LAYERS = {"l0": (7, 5), "l1": (3, 11)}


def test_fedavg_weighted_mean_only_trained_factor(gen):
    g0 = _state(gen, LAYERS, 3)
    ups = [_state(gen, LAYERS, 3) for _ in range(4)]
    w = [3.0, 1.0, 5.0, 2.0]
    res = aggregate(g0, ups, w, "B", method_spec("deer").mechanism)
    for n in LAYERS:
        exp = sum(wk * u[_k(n, "B")] for wk, u in zip(w, ups)) / sum(w)
        torch.testing.assert_close(res.adapters[_k(n, "B")], exp)
        assert torch.equal(res.adapters[_k(n, "A")], g0[_k(n, "A")])       # frozen factor untouched
    assert set(res.adapters) == set(g0)


@pytest.mark.parametrize("method,phase", [("fedavg", "AB"), ("deer", "B"), ("deer", "A")])
def test_client_level_clipping_whole_update(gen, method, phase):
    spec = method_spec(method)
    lam, C = 0.3, 1.7
    g0 = _state(gen, LAYERS, 3)
    ups = []
    for k in range(5):  # updates of very different sizes: some clipped, some not
        u = {key: t + (0.05 * 4 ** k) * torch.randn(t.shape, generator=gen, dtype=torch.float64)
             for key, t in g0.items()}
        ups.append(u)
    res = aggregate(g0, ups, [1.0] * 5, phase, spec.mechanism.replace(lam=lam), privacy="client", noise_multiplier=0.0,
                    max_grad_norm=C)
    factors = ("A", "B") if phase == "AB" else (phase,)
    # hand computation: the norm of the whole update in the metric, all layers together
    norms = []
    for u in ups:
        tot = 0.0
        for n in LAYERS:
            for f in factors:
                d = u[_k(n, f)] - g0[_k(n, f)]
                if spec.mechanism.metric == "regulated":
                    if f == "B":   # ||dB A||^2 + lam ||dB||^2
                        tot += float((d @ g0[_k(n, "A")]).pow(2).sum() + lam * d.pow(2).sum())
                    else:          # ||B dA||^2 + lam ||dA||^2
                        tot += float((g0[_k(n, "B")] @ d).pow(2).sum() + lam * d.pow(2).sum())
                else:
                    tot += float(d.pow(2).sum())
        norms.append(math.sqrt(tot))
    c = [min(1.0, C / (nk + 1e-6)) for nk in norms]
    assert min(c) < 1 and max(c) == 1, (gen.initial_seed(), norms)
    for n in LAYERS:
        for f in factors:
            exp = g0[_k(n, f)] + sum(ck * (u[_k(n, f)] - g0[_k(n, f)]) for ck, u in zip(c, ups)) / 5
            torch.testing.assert_close(res.adapters[_k(n, f)], exp, msg=f"seed {gen.initial_seed()}")
    assert res.noise_multiplier == 0.0


@pytest.mark.parametrize("noise_method", ["deer", "deer_no_nr"])
def test_client_level_noise_law(gen, noise_method):
    """With all-zero updates the output is global + sigma C xi / m. DEeR's B-phase noise rows have
    covariance (sigma C / m)^2 K^{-1}, K = A A^T + lam I; isotropic noise has (sigma C / m)^2 I.
    A 5-sigma bound on every covariance entry; the other law must fail it (the test can fail)."""
    torch.manual_seed(gen.initial_seed())
    m_cli, sigma, C, lam, r = 3, 2.0, 0.5, 0.2, 3
    layers = {"l": (400, 6)}
    g0 = _state(gen, layers, r)
    spec = method_spec(noise_method)
    draws = []
    for t in range(10):
        res = aggregate(g0, [g0] * m_cli, [1.0] * m_cli, "B", spec.mechanism.replace(lam=lam), privacy="client",
                        noise_multiplier=sigma, max_grad_norm=C, generator=torch.Generator().manual_seed(gen.initial_seed() + t))
        draws.append((res.adapters["l.lora_B"] - g0["l.lora_B"]) / (sigma * C / m_cli))   # rows ~ N(0, Sigma)
    X = torch.cat(draws)                                                              # 4000 x r rows
    emp = X.T @ X / X.shape[0]
    A = g0["l.lora_A"]
    K_inv = torch.linalg.inv(A @ A.T + lam * torch.eye(r, dtype=torch.float64))
    expected, other = (K_inv, torch.eye(r, dtype=torch.float64)) if noise_method == "deer" else \
        (torch.eye(r, dtype=torch.float64), K_inv)
    # Var of an entry of the empirical covariance of Gaussian rows: (S_ii S_jj + S_ij^2) / N
    se = ((torch.diag(expected)[:, None] * torch.diag(expected)[None, :] + expected ** 2) / X.shape[0]).sqrt()
    assert ((emp - expected).abs() <= 5 * se).all(), (gen.initial_seed(), emp, expected)
    assert ((emp - other).abs() > 5 * se).any(), "the test cannot tell the two noise laws apart"


@pytest.mark.parametrize("method", ["deer", "fedavg"])
def test_client_level_fixed_denominator_and_empty_sum(gen, method):
    """With a denominator D (the engines pass q N) the release is global + (clipped sum + sigma C xi) / D,
    whatever the number of updates; no update at all releases global + sigma C xi / D (noise alone)."""
    spec = method_spec(method)
    phase = "B"
    C, sigma, D = 0.7, 1.5, 2.5
    g0 = _state(gen, LAYERS, 3)
    ups = [{k: t + torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in g0.items()}
           for _ in range(4)]
    seed = gen.initial_seed()
    mech = spec.mechanism.replace(lam=0.2)
    got = aggregate(g0, ups, [1.0] * 4, phase, mech, privacy="client", noise_multiplier=sigma, max_grad_norm=C,
                    generator=torch.Generator().manual_seed(seed), denominator=D)
    noise_only = aggregate(g0, [], [], phase, mech, privacy="client", noise_multiplier=sigma, max_grad_norm=C,
                           generator=torch.Generator().manual_seed(seed), denominator=D)
    clean = aggregate(g0, ups, [1.0] * 4, phase, mech, privacy="client", noise_multiplier=0.0, max_grad_norm=C,
                      denominator=D)
    ref_mean = aggregate(g0, ups, [1.0] * 4, phase, mech, privacy="client", noise_multiplier=0.0,
                         max_grad_norm=C)                                  # no denominator: the realised 4
    assert noise_only.noise_multiplier == got.noise_multiplier == sigma and noise_only.clip_fraction is None
    for n in LAYERS:
        k = _k(n, phase)
        clipped_sum = (ref_mean.adapters[k] - g0[k]) * 4
        torch.testing.assert_close(clean.adapters[k], g0[k] + clipped_sum / D)
        noise = noise_only.adapters[k] - g0[k]
        assert noise.abs().max() > 0
        torch.testing.assert_close(got.adapters[k], g0[k] + clipped_sum / D + noise)
        assert torch.equal(noise_only.adapters[_k(n, "A")], g0[_k(n, "A")])
    with pytest.raises(ValueError, match="at least one client update"):
        aggregate(g0, [], [], phase, spec.mechanism, privacy="client", noise_multiplier=sigma, max_grad_norm=C)


@pytest.mark.parametrize("method", ["fedavg", "deer"])
def test_client_level_huge_finite_update_is_clipped_not_nan(gen, method):
    """A float64 update of magnitude 1e300 squares to inf: the norm is taken on the update scaled by
    its largest entry, so it is clipped to C like any other (the same as the update scaled to 1e10)."""
    g0 = _state(gen, LAYERS, 3)
    phase = "B" if method == "deer" else "AB"
    d = _state(gen, LAYERS, 3)
    honest = {k: g0[k] + 0.01 * d[k] for k in g0}
    mech = method_spec(method).mechanism
    out = {}
    for scale in (1e300, 1e10):
        big = {k: g0[k] + scale * d[k] for k in g0}
        out[scale] = aggregate(g0, [honest, big], [1.0, 1.0], phase, mech, privacy="client",
                               noise_multiplier=0.0, max_grad_norm=0.5, denominator=2.0)
        assert all(torch.isfinite(t).all() for t in out[scale].adapters.values())
        assert out[scale].clip_fraction == 0.5
    for k in g0:
        torch.testing.assert_close(out[1e300].adapters[k], out[1e10].adapters[k], rtol=1e-12, atol=1e-14)
    # the clipped contribution has norm C (Euclidean metric) / is not lost
    moved = sum(float(((out[1e300].adapters[k] - g0[k]) * 2 - 0.01 * d[k]).pow(2).sum())
                for k in g0 if k.endswith("_B") or phase == "AB")
    if mech.metric == "euclidean":
        assert math.sqrt(moved) == pytest.approx(0.5, rel=1e-9)
    else:
        assert moved > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(gen, bad):
    g0 = _state(gen, LAYERS, 3)
    with pytest.raises(ValueError, match="finite"):
        aggregate(g0, [_state(gen, LAYERS, 3), _state(gen, LAYERS, 3)], [bad, 1.0], "B",
                  method_spec("deer").mechanism)
