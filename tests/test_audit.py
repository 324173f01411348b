"""Empirical privacy audit (deer.audit): the one-run bound, the canaries, honest runs of every mode (the
empirical lower bound is informative and below the accountant) and planted bugs (the same audit catches
them: lower bound above what the buggy implementation claims). Planted bugs live only in this file, as
wrappers of / patches on the real DP-step code path. Budget: < 90 s on a 2-core CPU."""
import json
import math

import numpy as np
import pytest
import torch

import deer.reference as ref
from deer.audit import (MODES, AuditConfig, _Setup, epsilon_lower_bound_from_ranking, main,
                        one_run_epsilon_lower_bound, one_run_p_value, run_audit)


def _seed(gen):
    return int(gen.initial_seed())


# --------------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, r, v, delta, published", [
    (1000, 100, 75, 1e-4, 0.673),        # arXiv:2305.08846 Appendix D worked example
    (100000, 1510, 1439, 1e-5, 2.675),   # ibid. Section 7 (white-box DP-SGD audit)
])
def test_one_run_bound_reproduces_published_values(m, r, v, delta, published):
    assert one_run_epsilon_lower_bound(m, r, v, delta, 0.05) == pytest.approx(published, abs=1.5e-3)


def test_one_run_bound_closed_form_and_monotonicity():
    # delta = 0 and every guess right: P[Bin(r, q) >= r] = q^r = beta  =>  eps = logit(beta^(1/r))
    r, beta = 300, 0.05
    q = beta ** (1 / r)
    assert one_run_epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    # more correct guesses -> larger bound; delta > 0 can only weaken it; chance accuracy gives 0
    lbs = [one_run_epsilon_lower_bound(1000, 200, v, 1e-5) for v in (120, 150, 180, 200)]
    assert lbs == sorted(lbs) and lbs[0] > 0
    assert one_run_epsilon_lower_bound(1000, 200, 180, 1e-3) < one_run_epsilon_lower_bound(1000, 200, 180, 0.0)
    assert one_run_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert one_run_p_value(1000, 200, 150, 10.0, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        one_run_p_value(10, 20, 5, 1.0, 0.0)


def test_one_run_bound_is_valid_for_randomized_response(gen):
    """An exactly eps0-DP mechanism on each canary (randomized response: right with prob e^eps0/(1+e^eps0))
    must give a bound above eps0 in at most beta of the runs. A naive point estimate (no confidence
    correction) fails that, so the test can tell a valid bound from an invalid one."""
    rng = np.random.default_rng(_seed(gen))
    eps0, m, beta, trials = 1.5, 400, 0.05, 400
    p0 = 1 / (1 + math.exp(-eps0))
    v = rng.binomial(m, p0, size=trials)
    cache = {int(x): one_run_epsilon_lower_bound(m, m, int(x), 0.0, beta) for x in np.unique(v)}
    over = np.mean([cache[int(x)] > eps0 for x in v])
    assert over <= beta + 3 * math.sqrt(beta * (1 - beta) / trials), f"seed {_seed(gen)}: {over}"
    naive = np.mean([math.log(x / (m - x)) > eps0 for x in v])
    assert naive > 0.3
    assert np.mean(list(cache[int(x)] for x in v)) > 0.5 * eps0          # and it has power


def test_ranking_grid_uses_bonferroni():
    m = 400
    included = np.arange(m) % 2 == 0
    perfect = np.argsort(included, kind="stable")                     # every guess right
    got = epsilon_lower_bound_from_ranking(perfect, included, 1e-5, 0.95)
    assert got["correct"] == got["guesses"] > 0
    # the best single grid point, tested at the full level, would be larger than the corrected bound
    assert got["epsilon_lower"] < one_run_epsilon_lower_bound(m, got["guesses"], got["correct"], 1e-5, 0.05)


# --------------------------------------------------------------------------------------------
# Canaries go through deer's own per-sample gradient code exactly
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("mode", list(MODES))
def test_canary_records_produce_exact_gradients(gen, phase, mode):
    cfg = AuditConfig(mode=mode, phase=phase, canaries=97, rank=5, other_dim=11, frozen_sigma_max=3.0)
    setup = _Setup(cfg, gen)
    coeffs = torch.randn(7, 97, generator=gen, dtype=torch.float64)
    for k in range(cfg.rank):
        g = setup.direction(k, coeffs)
        x, gout = setup.to_records(g)
        got = ref.per_sample_grads(x, gout, setup.A, setup.B, cfg.lora_scale, phase)[phase]
        torch.testing.assert_close(got, g, rtol=1e-9, atol=1e-12, msg=f"seed {gen.initial_seed()}")
    # a unit canary in slot j, clipped to C, reads back along slot j only, with the whitened size the
    # mechanism's sensitivity argument predicts: C (metric clipping) or C sigma_max(frozen) (paper mode)
    j, C = 13, 0.7
    unit = torch.zeros(1, 97, dtype=torch.float64)
    unit[0, j] = C / float(setup.clip_norm[0])
    co = setup.coordinates(setup.direction(0, unit)[0])
    expect = {"isotropic": C, "regulated-metric": C,
              "regulated-paper": C * float(torch.linalg.eigvalsh(setup.K).max().sqrt())}[mode]
    assert float(co[0, j]) == pytest.approx(expect, rel=1e-9)
    co[0, j] = 0
    assert float(co.abs().max()) < 1e-9 * expect


# --------------------------------------------------------------------------------------------
# Honest runs: informative and below the accountant, for every mode and both levels
# --------------------------------------------------------------------------------------------

HONEST = [(level, mode, phase) for level, phase in (("sample", "A"), ("client", "B")) for mode in MODES]


@pytest.mark.parametrize("level, mode, phase", HONEST)
def test_honest_audit_is_informative_and_below_accountant(gen, level, mode, phase):
    res = run_audit(mode=mode, level=level, phase=phase, noise_multiplier=1.0, canaries=1000, steps=1,
                    sample_rate=1.0, accountant="prv", seed=_seed(gen))
    msg = f"seed {_seed(gen)}: {res}"
    assert res.epsilon_lower > 0.5, msg                     # informative
    assert res.epsilon_lower < res.epsilon_claimed, msg     # consistent with the (tight) accountant
    assert res.attack == "sum"                              # no release shared its noise
    if mode == "regulated-paper":
        assert res.noise_multiplier_charged == pytest.approx(1.0 / 2.0)   # sigma / sigma_max(frozen)


def test_honest_multi_step_subsampled_run_is_below_accountant(gen):
    res = run_audit(mode="regulated-metric", noise_multiplier=0.8, sample_rate=0.5, steps=3, clients=2,
                    accountant="prv", seed=_seed(gen))
    assert res.epsilon_lower < res.epsilon_claimed, f"seed {_seed(gen)}: {res}"
    assert res.releases == 6 and res.attack == "sum"


# --------------------------------------------------------------------------------------------
# Planted bugs (each lives only here)
# --------------------------------------------------------------------------------------------

def _no_noise(**kw):
    """Bug: the noise multiplier is silently dropped to 0 while the accountant is told sigma."""
    res = ref.dp_step(**{**kw, "noise_multiplier": 0.0})
    res.noise_multiplier_effective = kw["noise_multiplier"]
    return res


def _same_noise_every_step(**kw):
    """Bug: the noise stream is re-seeded with a constant before every step."""
    return ref.dp_step(**{**kw, "generator": torch.Generator().manual_seed(1234)})


class _SameNoiseEveryClient:
    """Bug: the noise seed is keyed by the step only, not by the client (the audit calls clients in order
    within each step)."""

    def __init__(self, clients):
        self.clients, self.calls = clients, 0

    def __call__(self, **kw):
        g = torch.Generator().manual_seed(777 + self.calls // self.clients)
        self.calls += 1
        return ref.dp_step(**{**kw, "generator": g})


@pytest.mark.parametrize("level, mode", [("sample", "regulated-metric"), ("client", "isotropic")])
def test_detects_noise_set_to_zero(gen, level, mode):
    res = run_audit(mode=mode, level=level, noise_multiplier=2.0, step_fn=_no_noise, seed=_seed(gen))
    assert res.epsilon_lower > res.epsilon_claimed, f"seed {_seed(gen)}: {res}"


@pytest.mark.parametrize("level", ["sample", "client"])
def test_detects_noise_reused_every_step(gen, level):
    cfg = dict(mode="regulated-metric", level=level, noise_multiplier=3.0, sample_rate=0.5, steps=4,
               seed=_seed(gen))
    bug = run_audit(step_fn=_same_noise_every_step, **cfg)
    assert bug.attack == "shared-noise"
    assert bug.epsilon_lower > bug.epsilon_claimed, f"seed {_seed(gen)}: {bug}"
    honest = run_audit(**cfg)                                 # same setting, real code path: no alarm
    assert honest.attack == "sum" and honest.epsilon_lower < honest.epsilon_claimed


def test_detects_noise_reused_every_client(gen):
    cfg = dict(mode="isotropic", level="sample", clients=2, noise_multiplier=3.0, seed=_seed(gen))
    bug = run_audit(step_fn=_SameNoiseEveryClient(2), **cfg)
    assert bug.attack == "shared-noise"
    assert bug.epsilon_lower > bug.epsilon_claimed, f"seed {_seed(gen)}: {bug}"
    honest = run_audit(**cfg)
    assert honest.attack == "sum" and honest.epsilon_lower < honest.epsilon_claimed


@pytest.mark.parametrize("mode, sigma", [("isotropic", 2.0), ("regulated-metric", 2.0), ("regulated-paper", 4.0)])
def test_detects_clipping_disabled(gen, monkeypatch, mode, sigma):
    monkeypatch.setattr(ref, "clip_factors", lambda sq, C: torch.ones_like(sq))   # dp_step looks it up here
    res = run_audit(mode=mode, noise_multiplier=sigma, seed=_seed(gen))
    assert res.epsilon_lower > res.epsilon_claimed, f"seed {_seed(gen)}: {res}"


@pytest.mark.parametrize("level", ["sample", "client"])
def test_paper_mode_sensitivity_is_caught_and_charged(gen, level):
    """Euclidean clipping + regulated noise with sigma_max(frozen) = 8: an accountant charging the nominal
    sigma = 4 is contradicted by the audit; deer's paper mode charges sigma / 8 and is not."""
    res = run_audit(mode="regulated-paper", level=level, noise_multiplier=4.0, frozen_sigma_max=8.0,
                    seed=_seed(gen))
    msg = f"seed {_seed(gen)}: {res}"
    assert res.epsilon_lower > res.epsilon_nominal, msg        # the bug: ignoring sigma_max
    assert res.epsilon_lower < res.epsilon_claimed, msg        # deer's honest charge
    assert res.noise_multiplier_charged == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Plumbing: the step_fn contract, the CLI, bad input
# --------------------------------------------------------------------------------------------

def test_step_fn_contract_and_fresh_noise_streams(gen):
    calls = []

    def recording(**kw):
        calls.append(kw)
        return ref.dp_step(**kw)

    run_audit(mode="regulated-metric", canaries=100, steps=3, clients=2, step_fn=recording, seed=_seed(gen))
    assert len(calls) == 6
    expected = {"layers", "phase", "max_grad_norm", "noise_multiplier", "expected_batch_size", "metric",
                "noise", "lam", "generator"}
    assert all(set(kw) == expected for kw in calls)
    draws = {float(torch.randn(1, generator=kw["generator"])) for kw in calls}
    assert len(draws) == 6                                     # every release has its own noise stream


def test_cli_writes_json(tmp_path, gen):
    out = tmp_path / "audit.json"
    rc = main(["--mode", "isotropic", "--canaries", "200", "--noise-multiplier", "1.0", "--seed",
               str(_seed(gen)), "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rc == 0 and len(rows) == 1
    assert rows[0]["consistent"] and rows[0]["epsilon_lower"] < rows[0]["epsilon_claimed"]
    assert main(["--rank", "2"]) == 2                          # a clear error, not a traceback


@pytest.mark.parametrize("bad, match", [
    (dict(mode="paper"), "mode"), (dict(level="user"), "level"), (dict(phase="AB"), "phase"),
    (dict(rank=2), "rank"), (dict(canaries=10), "canaries"), (dict(sample_rate=0.0), "sample_rate"),
    (dict(frozen_sigma_min=3.0, frozen_sigma_max=2.0), "frozen_sigma"), (dict(delta=0.0), "delta"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        run_audit(**bad)


# --------------------------------------------------------------------------------------------
# The federated server's client-level aggregation, audited through the same step_fn contract
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_fed_server_aggregation_honest(gen, mode):
    pytest.importorskip("deer.fed.aggregate")
    from deer.audit import fed_aggregate_step
    res = run_audit(mode=mode, level="client", phase="A", noise_multiplier=1.0, accountant="prv",
                    step_fn=fed_aggregate_step, seed=_seed(gen))
    msg = f"seed {_seed(gen)}: {res}"
    assert 0.5 < res.epsilon_lower < res.epsilon_claimed, msg
    expected_charge = 0.5 if mode == "regulated-paper" else 1.0   # sigma / sigma_max(frozen) = 1 / 2
    assert res.noise_multiplier_charged == pytest.approx(expected_charge)


def test_fed_server_aggregation_planted_bugs(gen):
    pytest.importorskip("deer.fed.aggregate")
    from deer.audit import fed_aggregate_step

    def same_noise_every_round(**kw):
        return fed_aggregate_step(**{**kw, "generator": torch.Generator().manual_seed(4321)})

    bug = run_audit(mode="regulated-metric", level="client", noise_multiplier=3.0, sample_rate=0.5, steps=4,
                    step_fn=same_noise_every_round, seed=_seed(gen))
    assert bug.epsilon_lower > bug.epsilon_claimed, f"seed {_seed(gen)}: {bug}"
    paper = run_audit(mode="regulated-paper", level="client", noise_multiplier=4.0, frozen_sigma_max=8.0,
                      step_fn=fed_aggregate_step, seed=_seed(gen))
    assert paper.epsilon_nominal < paper.epsilon_lower < paper.epsilon_claimed, f"seed {_seed(gen)}: {paper}"


# --------------------------------------------------------------------------------------------
# deer.privacy's PrivacyEngine (the optimizer users train with), audited the same way
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_privacy_engine_honest(gen, mode):
    from deer.audit import engine_step
    res = run_audit(mode=mode, level="sample", noise_multiplier=1.0, accountant="prv", step_fn=engine_step,
                    seed=_seed(gen))
    msg = f"seed {_seed(gen)}: {res}"
    assert 0.5 < res.epsilon_lower < res.epsilon_claimed, msg
    assert res.attack == "sum", msg
    assert res.noise_multiplier_charged == pytest.approx(0.5 if mode == "regulated-paper" else 1.0, rel=1e-5)


def test_privacy_engine_planted_bugs(gen):
    from deer.audit import engine_step

    def same_seed_every_step(**kw):
        return engine_step(**{**kw, "generator": torch.Generator().manual_seed(99)})

    def noise_off(**kw):
        res = engine_step(**{**kw, "noise_multiplier": 0.0})
        res.noise_multiplier_effective = kw["noise_multiplier"]
        return res

    reuse = run_audit(mode="regulated-metric", noise_multiplier=3.0, sample_rate=0.5, steps=4,
                      step_fn=same_seed_every_step, seed=_seed(gen))
    assert reuse.attack == "shared-noise" and reuse.epsilon_lower > reuse.epsilon_claimed, f"seed {_seed(gen)}: {reuse}"
    silent = run_audit(mode="isotropic", noise_multiplier=2.0, step_fn=noise_off, seed=_seed(gen))
    assert silent.epsilon_lower > silent.epsilon_claimed, f"seed {_seed(gen)}: {silent}"
    paper = run_audit(mode="regulated-paper", noise_multiplier=4.0, frozen_sigma_max=8.0, step_fn=engine_step,
                      seed=_seed(gen))
    assert paper.epsilon_nominal < paper.epsilon_lower < paper.epsilon_claimed, f"seed {_seed(gen)}: {paper}"
