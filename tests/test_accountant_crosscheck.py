"""Cross-check deer's accountant (a wrapper of Opacus) against an independent maintained implementation:
Google's dp-accounting (RDP accountant and PLD accountant). Runs in CI; budget < 60 s on a 2-core CPU.

Tolerances, and why:
* RDP at integer orders: Opacus and dp-accounting both sum the finite binomial expansion of the sampled
  Gaussian's Renyi divergence (Mironov, Talwar, Zhang 2019) in log space, and both convert RDP to
  (eps, delta) with the same bound (Balle et al. 2020, Thm 21 = Canonne, Kamath, Steinke 2020, Prop 12).
  Same math, independent code: they must agree to floating-point accuracy (relative 1e-8).
* RDP over all of deer's orders (fractional ones included): the fractional-order series differ.
  dp-accounting 0.6 truncates its series early and, for small sigma, overestimates RDP or gives up on an
  order (excluding it), so its epsilon can only be *larger*. deer's (Opacus') fractional values are checked
  here against direct numerical integration of the Renyi divergence (a third, independent computation)
  to 1e-6 relative. So: eps_deer <= eps_dpacc always; equal (1e-8) when deer's optimal order is an
  integer; when it is fractional (where dp-accounting's estimate is off by up to several %), deer's
  epsilon is recomputed from the numerically integrated RDP at that order and must match to 1e-5.
* PRV vs PLD: Opacus' PRV accountant returns the upper end of an interval of half-width eps_error = 0.01
  around its estimate (Gopi, Lee, Wutschitz 2021), so it sits in [true eps, true eps + 0.02]; dp-accounting's
  PLD accountant (pessimistic discretisation, value interval 1e-3) is an upper bound within a few 1e-3 of
  the truth at these sizes. Hence |eps_prv - eps_pld| <= 0.02 + 0.005.
* PRV/PLD are tight numerical accountants and RDP is a (loose) upper bound, so eps_pld <= eps_rdp, and
  eps_prv <= eps_rdp up to PRV's own 0.02 error band (which only matters for epsilon near 0).
"""
import logging
import math
import random
import warnings

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import pld as dpa_pld  # noqa: E402
from dp_accounting import rdp as dpa_rdp  # noqa: E402

from deer.privacy.accountant import PRV_EPS_ERROR, RDP_ORDERS, DeerAccountant  # noqa: E402

INT_ORDERS = [a for a in RDP_ORDERS if float(a).is_integer()]
PLD_INTERVAL = 1e-3
PRV_PLD_TOL = 2 * PRV_EPS_ERROR + 0.005


@pytest.fixture(autouse=True)
def _quiet():
    # dp-accounting logs a warning for every fractional order whose series it abandons (see above)
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


def _event(sigma, q, steps):
    gauss = dp_accounting.GaussianDpEvent(sigma)
    single = gauss if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
    return dp_accounting.SelfComposedDpEvent(single, steps)


def _dpa_rdp_eps(history, delta, orders):
    acc = dpa_rdp.RdpAccountant(orders=list(orders))
    for s, q, n in history:
        acc.compose(_event(s, q, n))
    return acc.get_epsilon(delta)


def _dpa_pld_eps(history, delta):
    acc = dpa_pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for s, q, n in history:
        acc.compose(_event(s, q, n))
    return acc.get_epsilon(delta)


def _deer(history, mechanism):
    acc = DeerAccountant(mechanism)
    for s, q, n in history:
        acc.step(s, q, n)
    return acc


def _deer_eps_at_orders(acc, delta, orders):
    from opacus.accountants.analysis import rdp as opacus_rdp
    all_orders, curve = acc.get_rdp()
    idx = [int(np.flatnonzero(all_orders == a)[0]) for a in orders]
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=curve[idx], delta=delta)
    return max(0.0, float(eps))


# (q, sigma, steps, delta): corners of the range deer is used in (tiny to full sampling, heavy to light noise,
# one release to thousands) plus a few random draws per run.
GRID = [(1.0, 1.0, 1, 1e-5), (1.0, 0.5, 1, 1e-5), (1.0, 4.0, 3, 1e-6), (0.5, 2.0, 4, 1e-5),
        (0.2, 1.5, 50, 1e-6), (0.1, 0.8, 100, 1e-7), (0.01, 1.1, 1000, 1e-5), (0.01, 0.6, 800, 1e-5),
        (1e-3, 0.5, 1000, 1e-5), (1e-3, 4.0, 1, 1e-5), (0.05, 3.0, 2000, 1e-8)]


def _grid(gen):
    rng = random.Random(gen.initial_seed())
    extra = [(rng.choice([0.003, 0.02, 0.3]), round(rng.uniform(0.6, 3.0), 3), rng.randint(1, 1500),
              rng.choice([1e-5, 1e-6])) for _ in range(3)]
    return GRID + extra


def _paper_history(rng, rounds=6, local_steps=25, sigma=1.2, q=0.02):
    """What deer's paper mode charges: per sub-round (B then A) the true multiplier sigma / sigma_max(frozen),
    with the frozen factor's top singular value drifting from round to round."""
    return [(sigma / rng.uniform(0.6, 1.8), q, local_steps) for _ in range(2 * rounds)]


def test_rdp_integer_orders_agree_with_dp_accounting(gen):
    for q, s, n, d in _grid(gen):
        acc = _deer([(s, q, n)], "rdp")
        mine = _deer_eps_at_orders(acc, d, INT_ORDERS)
        theirs = _dpa_rdp_eps([(s, q, n)], d, INT_ORDERS)
        assert mine == pytest.approx(theirs, rel=1e-8), f"q={q} sigma={s} steps={n} delta={d}"


def _optimal_order(acc, delta):
    from opacus.accountants.analysis import rdp as opacus_rdp
    orders, curve = acc.get_rdp()
    return float(opacus_rdp.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)[1])


def test_rdp_all_orders_against_dp_accounting(gen):
    for q, s, n, d in _grid(gen):
        acc = _deer([(s, q, n)], "rdp")
        mine = acc.get_epsilon(d)
        theirs = _dpa_rdp_eps([(s, q, n)], d, RDP_ORDERS)
        where = f"q={q} sigma={s} steps={n} delta={d}"
        assert mine <= theirs * (1 + 1e-9) + 1e-12, where
        alpha = _optimal_order(acc, d)
        if alpha.is_integer():
            assert mine == pytest.approx(theirs, rel=1e-8), where
        else:
            assert mine == pytest.approx(_numerical_eps([(s, q, n)], d, alpha), rel=1e-5), where


def test_rdp_heterogeneous_history_agrees_with_dp_accounting(gen):
    rng = random.Random(gen.initial_seed())
    hist = _paper_history(rng)
    acc = _deer(hist, "rdp")
    assert _deer_eps_at_orders(acc, 1e-5, INT_ORDERS) == pytest.approx(
        _dpa_rdp_eps(hist, 1e-5, INT_ORDERS), rel=1e-8), f"seed {gen.initial_seed()}: {hist}"
    theirs = _dpa_rdp_eps(hist, 1e-5, RDP_ORDERS)
    mine = acc.get_epsilon(1e-5)
    assert mine <= theirs * (1 + 1e-9)
    alpha = _optimal_order(acc, 1e-5)
    if alpha.is_integer():
        assert mine == pytest.approx(theirs, rel=1e-8)
    else:
        assert mine == pytest.approx(_numerical_eps(hist, 1e-5, alpha), rel=1e-5)
    # heterogeneous is not "average sigma": the composed epsilon differs from a constant-sigma history
    mean_sigma = sum(s for s, _, _ in hist) / len(hist)
    flat = _deer([(mean_sigma, hist[0][1], sum(n for _, _, n in hist))], "rdp").get_epsilon(1e-5)
    assert abs(flat - acc.get_epsilon(1e-5)) > 1e-6


def _numerical_rdp(q, sigma, alpha):
    """Renyi divergence of order alpha between (1-q) N(0, s^2) + q N(1, s^2) and N(0, s^2), by direct
    numerical integration in log space on a fine grid (independent of both libraries' series)."""
    z = np.linspace(-40 * sigma, 40 * sigma + 40, 2_000_001)
    log_p0 = -z * z / (2 * sigma ** 2) - 0.5 * math.log(2 * math.pi * sigma ** 2)
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma ** 2))
    lg = log_p0 + alpha * log_ratio
    top = lg.max()
    return (math.log(np.trapezoid(np.exp(lg - top), z)) + top) / (alpha - 1)


def _numerical_eps(history, delta, alpha):
    """Epsilon at one RDP order from numerically integrated RDP (Opacus' conversion formula)."""
    from opacus.accountants.analysis import rdp as opacus_rdp
    total = sum(n * (alpha / (2 * s * s) if q == 1.0 else _numerical_rdp(q, s, alpha)) for s, q, n in history)
    eps, _ = opacus_rdp.get_privacy_spent(orders=[alpha], rdp=[total], delta=delta)
    return float(eps)


@pytest.mark.parametrize("q, sigma", [(0.1, 0.5), (0.01, 0.6), (0.2, 1.3)])
def test_fractional_orders_match_numerical_integration(q, sigma):
    acc = _deer([(sigma, q, 1)], "rdp")
    orders, curve = acc.get_rdp()
    for alpha in (1.25, 1.75, 2.75, 5.5):
        k = int(np.flatnonzero(orders == alpha)[0])
        assert curve[k] == pytest.approx(_numerical_rdp(q, sigma, alpha), rel=1e-6), f"alpha={alpha}"


PRV_GRID = [(1.0, 1.0, 1, 1e-5), (1.0, 4.0, 1, 1e-5), (0.01, 1.1, 1000, 1e-5), (0.5, 3.0, 4, 1e-5),
            (0.1, 2.0, 100, 1e-6)]


def test_prv_agrees_with_pld_and_is_below_rdp():
    for q, s, n, d in PRV_GRID:
        prv = _deer([(s, q, n)], "prv").get_epsilon(d)
        pld = _dpa_pld_eps([(s, q, n)], d)
        rdp = _deer([(s, q, n)], "rdp").get_epsilon(d)
        assert abs(prv - pld) <= PRV_PLD_TOL, f"q={q} sigma={s} steps={n} delta={d}: prv {prv} pld {pld}"
        assert pld <= rdp, f"q={q} sigma={s} steps={n}"
        assert prv <= rdp + 2 * PRV_EPS_ERROR, f"q={q} sigma={s} steps={n}"
        assert prv < rdp or rdp < 0.05          # tight accountants beat RDP except near zero


def test_prv_heterogeneous_history_agrees_with_pld(gen):
    rng = random.Random(gen.initial_seed())
    hist = _paper_history(rng, rounds=3, local_steps=20)
    prv = _deer(hist, "prv").get_epsilon(1e-5)
    pld = _dpa_pld_eps(hist, 1e-5)
    rdp = _deer(hist, "rdp").get_epsilon(1e-5)
    assert abs(prv - pld) <= PRV_PLD_TOL, f"seed {gen.initial_seed()}: {hist}"
    assert prv < rdp and pld < rdp


def test_crosscheck_tolerance_catches_a_slightly_wrong_accountant():
    """Negative control: an accountant off by 1 % in sigma (or charging one step too few) must fail the
    integer-order comparison, so the 1e-8 tolerance above is a real check."""
    q, s, n, d = 0.01, 1.1, 1000, 1e-5
    theirs = _dpa_rdp_eps([(s, q, n)], d, INT_ORDERS)
    for wrong in ([(s * 1.01, q, n)], [(s, q, n - 1)]):
        mine = _deer_eps_at_orders(_deer(wrong, "rdp"), d, INT_ORDERS)
        assert mine != pytest.approx(theirs, rel=1e-8)
