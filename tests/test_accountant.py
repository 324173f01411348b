"""DeerAccountant: composition, persistence, budget checks, calibration and the paper mode's multiplier.
Independent-implementation cross-checks live in test_accountant_crosscheck.py."""
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

from deer.privacy.accountant import (RDP_ORDERS, DeerAccountant, noise_multiplier_for,
                                     paper_mode_multiplier)


def _rng(gen):
    return random.Random(gen.initial_seed())


def _opacus_rdp_epsilon(history, delta):
    """Opacus' own RDPAccountant on the same history and orders (the object deer wraps)."""
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    acc.history = [(s, q, n) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return max(0.0, acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def _random_history(rng, entries, rates=(1e-3, 0.01, 0.037, 0.2, 1.0), max_steps=300):
    return [(rng.uniform(0.8, 3.0), rng.choice(rates), rng.randint(1, max_steps)) for _ in range(entries)]


def test_heterogeneous_history_matches_opacus_and_is_order_free(gen):
    rng = _rng(gen)
    hist = _random_history(rng, 4)
    delta = rng.choice([1e-5, 1e-6, 3e-7])
    acc = DeerAccountant("rdp")
    for s, q, n in hist:
        acc.step(s, q, n)
    eps = acc.get_epsilon(delta)
    ref = _opacus_rdp_epsilon(hist, delta)
    assert eps == pytest.approx(ref, rel=1e-10), f"seed {gen.initial_seed()}"
    # RDP composes additively: the order of releases does not matter
    perm = hist[:]
    rng.shuffle(perm)
    acc2 = DeerAccountant("rdp")
    for s, q, n in perm:
        acc2.step(s, q, n)
    assert acc2.get_epsilon(delta) == pytest.approx(eps, rel=1e-12)
    # and every entry costs something: dropping one lowers epsilon
    acc3 = DeerAccountant("rdp")
    for s, q, n in hist[1:]:
        acc3.step(s, q, n)
    assert acc3.get_epsilon(delta) < eps


def test_steps_merge_and_count(gen):
    rng = _rng(gen)
    s, q = rng.uniform(0.8, 2), rng.uniform(0.01, 0.3)
    a, b = DeerAccountant(), DeerAccountant()
    a.step(s, q, 7)
    for _ in range(7):
        b.step(s, q)
    assert a.history == b.history == [(s, q, 7)]
    assert len(a) == 7
    assert a.get_epsilon(1e-5) == pytest.approx(b.get_epsilon(1e-5), rel=1e-12)
    b.step(s * 1.5, q, 3)                      # a different multiplier is a new entry
    assert b.history[-1] == (s * 1.5, q, 3) and len(b) == 10
    b.step(s, q, 0)                            # zero steps: a no-op
    assert len(b) == 10


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    acc = DeerAccountant()
    assert acc.get_epsilon(1e-5) == 0.0        # nothing released yet
    eps = []
    for _ in range(4):
        acc.step(1.0, 0.05, 50)
        eps.append(acc.get_epsilon(1e-5))
    assert all(b > a for a, b in zip(eps, eps[1:]))
    quiet = DeerAccountant()
    quiet.step(2.0, 0.05, 200)
    assert quiet.get_epsilon(1e-5) < eps[-1]


def test_infinite_multiplier_costs_nothing():
    acc = DeerAccountant()
    acc.step(1.0, 0.1, 10)
    e = acc.get_epsilon(1e-5)
    acc.step(math.inf, 0.1, 5)
    assert acc.get_epsilon(1e-5) == e
    assert len(acc) == 15


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_state_dict_json_round_trip(gen, mechanism):
    rng = _rng(gen)
    acc = DeerAccountant(mechanism)
    # moderate epsilon: PRV's discretisation domain (and cost) grows with epsilon
    for s, q, n in _random_history(rng, 2, rates=(0.005, 0.02, 0.05), max_steps=100):
        acc.step(s, q, n)
    acc.step(math.inf, 0.5, 2)
    blob = json.dumps(acc.state_dict(), allow_nan=False)      # strict JSON
    resumed = DeerAccountant(mechanism)
    resumed.load_state_dict(json.loads(blob))
    assert resumed.history == acc.history
    assert resumed.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    # a resumed run keeps spending on top of what was spent
    acc.step(1.0, 0.1, 5)
    resumed.step(1.0, 0.1, 5)
    assert resumed.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


def test_state_dict_can_switch_mechanism_and_rejects_garbage():
    a = DeerAccountant("rdp")
    a.step(1.2, 0.05, 100)
    p = DeerAccountant("prv")
    p.load_state_dict(a.state_dict())
    assert p.history == a.history and p.mechanism == "prv"
    assert p.get_epsilon(1e-5) <= a.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="history"):
        DeerAccountant().load_state_dict({"mechanism": "rdp"})
    with pytest.raises(ValueError, match="noise_multiplier"):
        DeerAccountant().load_state_dict({"history": [[0.0, 0.1, 3]]})
    with pytest.raises(ValueError, match="sample_rate"):
        DeerAccountant().load_state_dict({"history": [[1.0, 1.5, 3]]})
    with pytest.raises(ValueError, match="version"):
        DeerAccountant().load_state_dict({"version": 99, "history": []})


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_would_exceed_agrees_with_stepping_and_does_not_spend(gen, mechanism):
    rng = _rng(gen)
    acc = DeerAccountant(mechanism)
    acc.step(1.1, 0.02, 200)
    before = (list(acc.history), acc.get_epsilon(1e-5))
    s, q, n = rng.uniform(0.8, 1.5), 0.02, rng.randint(50, 400)
    trial = DeerAccountant(mechanism)
    trial.load_state_dict(acc.state_dict())
    trial.step(s, q, n)
    after = trial.get_epsilon(1e-5)
    # a target just below / above the epsilon the step would reach
    assert acc.would_exceed(after * 0.99, 1e-5, s, q, n) is True
    assert acc.would_exceed(after * 1.01, 1e-5, s, q, n) is False
    assert acc.would_exceed(100.0, 1e-5, 0.0, q, 1) is True        # no noise: infinite epsilon
    assert (list(acc.history), acc.get_epsilon(1e-5)) == before    # nothing was spent


@pytest.mark.parametrize("bad, match", [
    (dict(noise_multiplier=0.0, sample_rate=0.1), "infinite"),
    (dict(noise_multiplier=-1.0, sample_rate=0.1), ">= 0"),
    (dict(noise_multiplier=float("nan"), sample_rate=0.1), "NaN"),
    (dict(noise_multiplier=1.0, sample_rate=0.0), r"\(0, 1\]"),
    (dict(noise_multiplier=1.0, sample_rate=1.2), r"\(0, 1\]"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=-2), ">= 0"),
])
def test_step_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        DeerAccountant().step(**bad)


def test_other_bad_input():
    with pytest.raises(TypeError, match="whole number"):
        DeerAccountant().step(1.0, 0.1, 2.5)
    with pytest.raises(ValueError, match="mechanism"):
        DeerAccountant("gdp")
    acc = DeerAccountant()
    acc.step(1.0, 0.1)
    for d in (0.0, 1.0, -1e-5, 2.0):
        with pytest.raises(ValueError, match="delta"):
            acc.get_epsilon(d)
    with pytest.raises(ValueError, match="target_epsilon"):
        acc.would_exceed(0.0, 1e-5, 1.0, 0.1)
    with pytest.raises(ValueError, match="get_rdp needs"):
        DeerAccountant("prv").get_rdp()


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_multiplier_for_reaches_the_target_tightly(gen, mechanism):
    rng = _rng(gen)
    target = rng.uniform(1.0, 6.0)
    q = rng.choice([0.004, 0.01, 0.05])
    steps = rng.randint(100, 600)
    sigma = noise_multiplier_for(target, 1e-5, q, steps, mechanism=mechanism)
    acc = DeerAccountant(mechanism)
    acc.step(sigma, q, steps)
    eps = acc.get_epsilon(1e-5)
    assert eps <= target, f"seed {gen.initial_seed()}: sigma {sigma} gives {eps} > {target}"
    # Opacus' search stops within 0.01 of the target; PRV's own error adds up to 2 * 0.01
    assert eps >= target - (0.01 if mechanism == "rdp" else 0.04), f"seed {gen.initial_seed()}"
    less = DeerAccountant(mechanism)
    less.step(sigma * 0.95, q, steps)
    assert less.get_epsilon(1e-5) > eps


def test_noise_multiplier_for_bad_budget():
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(-1.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="delta"):
        noise_multiplier_for(1.0, 0.0, 0.01, 100)
    with pytest.raises(ValueError, match="steps"):
        noise_multiplier_for(1.0, 1e-5, 0.01, 0)


def test_paper_mode_multiplier_is_sigma_over_largest_singular_value(gen):
    shapes = [(97, 3), (5, 33), (1, 17), (8, 8)]      # frozen B (out x r) and frozen A (r x in), odd sizes
    factors = [torch.randn(*s, generator=gen, dtype=torch.float64) * (0.3 + 3 * torch.rand(1, generator=gen).item())
               for s in shapes]
    sigma = 0.5 + torch.rand(1, generator=gen).item()
    smax = max(float(torch.linalg.svdvals(F).max()) for F in factors)
    assert paper_mode_multiplier(sigma, factors) == pytest.approx(sigma / smax, rel=1e-10)
    one = factors[0]
    assert paper_mode_multiplier(sigma, one) == pytest.approx(sigma / float(torch.linalg.svdvals(one).max()), rel=1e-10)
    assert paper_mode_multiplier(sigma, one.float()) == pytest.approx(paper_mode_multiplier(sigma, one), rel=1e-5)
    lam = 0.7
    s1 = float(torch.linalg.svdvals(one).max())
    assert paper_mode_multiplier(sigma, one, lam=lam) == pytest.approx(sigma / math.sqrt(s1 ** 2 + lam), rel=1e-10)
    # scaling the frozen factor up makes the paper mechanism less private, one for one
    assert paper_mode_multiplier(sigma, 4 * one) == pytest.approx(paper_mode_multiplier(sigma, one) / 4, rel=1e-10)


def test_paper_mode_multiplier_bad_input():
    with pytest.raises(ValueError, match="zero"):
        paper_mode_multiplier(1.0, torch.zeros(6, 4))
    with pytest.raises(ValueError, match="2-D"):
        paper_mode_multiplier(1.0, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        paper_mode_multiplier(1.0, torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="at least one"):
        paper_mode_multiplier(1.0, [])


def test_rdp_curve_is_additive():
    a = DeerAccountant()
    a.step(1.3, 0.05, 10)
    a.step(0.9, 0.05, 4)
    orders, curve = a.get_rdp()
    b, c = DeerAccountant(), DeerAccountant()
    b.step(1.3, 0.05, 10)
    c.step(0.9, 0.05, 4)
    np.testing.assert_allclose(curve, b.get_rdp()[1] + c.get_rdp()[1], rtol=1e-12)
    assert len(orders) == len(curve) == len(RDP_ORDERS)
