"""Empirical privacy audit of deer's DP mechanisms: `python -m deer.audit --mode regulated-metric`.

What it does. m gradient canaries are each inserted independently with probability 1/2 into the private
data (one client's records at sample level; m canary *clients* at client level). deer's real DP-step code
path (`step_fn`, by default deer.reference.dp_step) is run on that data exactly as in training: Poisson
sampling at rate q, clipping, noise. An attacker who sees every release (every noisy step at sample level,
every aggregate at client level: the threat model the accountant's guarantee covers) scores each canary,
guesses "inserted" for the top scores and "held out" for the bottom ones, and the number of correct
guesses is turned into a lower bound on epsilon with the one-run method of

    T. Steinke, M. Nasr, M. Jagielski. Privacy Auditing with One (1) Training Run. NeurIPS 2023
    (arXiv:2305.08846), the (eps, delta) bound of their Theorem 5.2 / Corollary 5.4.

If the mechanism really is (eps, delta)-DP, the bound exceeds eps with probability at most 1 - confidence.
So: lower bound > the accountant's epsilon means the implementation (or its accounting) is broken.

Canaries. A canary is a record whose per-sample gradient is exactly a chosen direction times a large norm
(canary_norm * C, so clipping is always active): the record's layer input X and output gradient G are
solved for so that deer's own per-sample gradient code produces it (A phase: G B = I, X = g / s).
Directions are chosen in the coordinates where the mechanism's noise is isotropic ("noise-whitened":
Phi(g) = R g in the A phase, g R^T in the B phase, K = R^T R; identity for isotropic noise), one
orthonormal direction per canary along the top eigenvector of K, where a Euclidean-clipped gradient has
the largest whitened norm (C sigma_max(frozen)). That makes the audit tight for the paper mode too.
The remaining eigen-directions carry the other records' gradients (background data) and a noise-only
"fingerprint" subspace that no data touches.

Attack (a fixed function of the releases, so the bound stays valid):
* releases whose fingerprints are identical share their noise (a seed reused across steps or clients);
  if any do, a canary's score is the spread of its coordinate over each noise-sharing group (the noise
  cancels, the canary's varying participation does not), ties broken by the sum score;
* otherwise the score is the canary coordinate of the sum of the canary owner's releases.
Guess counts (k+, k-) come from a small fixed grid; the bound is the best over the grid with a Bonferroni
correction (confidence split across the grid), so it remains a valid (1 - beta) lower bound.

`step_fn` contract (to point the audit at deer.privacy's optimizer or the federated server aggregation):
called with keyword arguments layers, phase, max_grad_norm, noise_multiplier, expected_batch_size,
metric, noise, lam, generator (exactly deer.reference.dp_step's), it returns an object with
`.grads[0][factor]`, the noisy mean gradient (clipped sum + noise) / expected_batch_size, and
`.noise_multiplier_effective`, the multiplier the implementation charges its accountant.
`engine_step` adapts deer.privacy's PrivacyEngine (the optimizer users train with: LoRA capture, kernels)
and `fed_aggregate_step` the federated server's client-level aggregation (deer.fed.aggregate) to that
contract, so `--step engine` and `--level client --step fed` audit that code itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import stats

from deer import reference as ref
from deer.privacy.accountant import DeerAccountant, check_delta
from deer.privacy.mechanism import PRESETS, Mechanism

# the audited modes: deer.privacy.mechanism's presets, spelled with hyphens on the command line
MODES: dict[str, Mechanism] = {name.replace("_", "-"): m for name, m in PRESETS.items()}
LEVELS = ("sample", "client")


# --------------------------------------------------------------------------------------------
# The one-run bound (Steinke, Nasr, Jagielski 2023)
# --------------------------------------------------------------------------------------------

def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] when the mechanism is (eps, delta)-DP with
    respect to m canaries each included independently with probability 1/2 (Steinke et al. 2023,
    Theorem 5.2 with Corollary 5.4):

        p = P[Bin(r, q) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Bin(r, q) < v] / i,
        q = e^eps / (1 + e^eps)   (the accuracy of eps-DP randomized response on one canary).
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct (v={v}) <= guesses (r={r}) <= canaries (m={m})")
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))          # P[Bin >= v]
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        # P[v - i <= Bin < v] = F(v - 1) - F(v - i - 1)
        mass = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
        tail += 2.0 * m * delta * float(np.max(mass / i))
    return min(tail, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest eps such that (eps, delta)-DP is rejected at level beta by v correct of r guesses
    (the p-value above grows with eps; bisection to 1e-6). 0 when nothing can be rejected."""
    if not (0 < beta < 1):
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:   # p(eps) -> 1 as eps grows: this terminates
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_grid(m: int) -> list[tuple[int, int]]:
    """Fixed (k_plus, k_minus) guess counts: few confident guesses suit a noisy mechanism, many suit a
    leaky one. Fixed before looking at scores; the bound corrects for the choice (Bonferroni)."""
    grid = [(k, k) for k in (m // 40, m // 20, m // 10, m // 4, m // 2)] + [(m // 10, 0), (m // 4, 0)]
    return sorted({g for g in grid if g[0] + g[1] > 0})


def epsilon_lower_bound_from_ranking(order: np.ndarray, included: np.ndarray, delta: float,
                                     confidence: float = 0.95) -> dict:
    """order: canary indices from least to most likely included. Returns the best bound over the
    guess grid, each grid point tested at level (1 - confidence) / len(grid)."""
    m = len(order)
    inc = included[order].astype(bool)
    grid = guess_grid(m)
    beta = (1.0 - confidence) / len(grid)
    best = {"epsilon_lower": 0.0, "k_plus": 0, "k_minus": 0, "guesses": 0, "correct": 0}
    for kp, km in grid:
        correct = int(inc[m - kp:].sum()) + int((~inc[:km]).sum())
        lb = one_run_epsilon_lower_bound(m, kp + km, correct, delta, beta)
        if lb > best["epsilon_lower"] or best["guesses"] == 0:
            best = {"epsilon_lower": lb, "k_plus": kp, "k_minus": km, "guesses": kp + km, "correct": correct}
    return best


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------

@dataclass
class AuditConfig:
    mode: str = "regulated-metric"      # isotropic | regulated-metric | regulated-paper
    level: str = "sample"               # sample (a record is protected) | client (a client is protected)
    phase: str = "A"                    # which LoRA factor trains (the other is frozen and public)
    canaries: int = 1000                # m
    noise_multiplier: float = 1.0       # nominal sigma
    max_grad_norm: float = 1.0          # C
    sample_rate: float = 1.0            # q: records per step (sample level) / clients per round (client level)
    steps: int = 1                      # local DP steps (sample level) / rounds (client level)
    clients: int = 1                    # sample level: clients, client 0 holds the canaries
    background: int = 32                # background records per client / background clients
    rank: int = 4                       # r >= 3 (canary, background and fingerprint eigen-directions)
    other_dim: int = 8                  # the layer size that does not index canaries
    frozen_sigma_max: float = 2.0       # largest singular value of the frozen factor
    frozen_sigma_min: float = 0.5
    lam: float = 0.0                    # ridge of the regulated metric
    canary_norm: float = 10.0           # canary gradient norm before clipping, in units of C
    lora_scale: float = 2.0
    delta: float = 1e-5
    confidence: float = 0.95
    accountant: str = "rdp"
    seed: int | None = None

    def validate(self) -> "AuditConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.phase not in ("A", "B"):
            raise ValueError("the audit trains one factor with the other frozen: phase must be 'A' or 'B'")
        if self.rank < 3:
            raise ValueError(f"the audit needs rank >= 3 (canary, background and noise-fingerprint "
                             f"directions), got {self.rank}")
        if self.canaries < 40:
            raise ValueError(f"use at least 40 canaries (the bound needs many independent guesses), "
                             f"got {self.canaries}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1 or self.clients < 1 or self.background < 0:
            raise ValueError("steps and clients must be >= 1 and background >= 0")
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or self.canary_norm <= 0:
            raise ValueError("need noise_multiplier >= 0, max_grad_norm > 0 and canary_norm > 0")
        if not (0 < self.frozen_sigma_min <= self.frozen_sigma_max):
            raise ValueError("need 0 < frozen_sigma_min <= frozen_sigma_max")
        if not (0 < self.confidence < 1):
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        check_delta(self.delta)
        return self


@dataclass
class AuditResult:
    epsilon_lower: float        # empirical lower bound (holds with probability >= confidence)
    epsilon_claimed: float      # accountant with the multipliers the step function reports
    epsilon_nominal: float      # accountant charging the nominal sigma (what ignoring sigma_max would claim)
    noise_multiplier_charged: float  # smallest per-release multiplier the step function reported
    attack: str                 # 'sum' or 'shared-noise'
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    releases: int
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        """The audit found no contradiction with the accountant."""
        return self.epsilon_lower <= self.epsilon_claimed


# --------------------------------------------------------------------------------------------
# Building the layer, canaries and background records
# --------------------------------------------------------------------------------------------

def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    Q, Rr = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rr))


class _Setup:
    """One LoRA layer with a frozen factor of chosen spectrum, the noise whitening, and the eigen-basis of
    K = frozen^T frozen + lam I used for canary / background / fingerprint directions."""

    def __init__(self, cfg: AuditConfig, gen: torch.Generator):
        r, slots, other = cfg.rank, cfg.canaries, max(cfg.other_dim, cfg.rank)
        self.cfg, self.r, self.slots = cfg, r, slots
        self.factor = cfg.phase
        sv = torch.logspace(math.log10(cfg.frozen_sigma_max), math.log10(cfg.frozen_sigma_min), r,
                            dtype=torch.float64)
        # A phase: A (r x n) trains, B (m x r) frozen, canaries index the n columns.
        # B phase: B (m x r) trains, A (r x n) frozen, canaries index the m rows.
        if self.factor == "A":
            m_out, n_in = other, slots
            U = _orthogonal(m_out, gen)[:, :r]
            self.B = U @ torch.diag(sv) @ _orthogonal(r, gen)
            self.A = torch.randn(r, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
        else:
            m_out, n_in = slots, other
            V = _orthogonal(n_in, gen)[:r, :]
            self.A = _orthogonal(r, gen) @ torch.diag(sv) @ V
            self.B = torch.randn(m_out, r, generator=gen, dtype=torch.float64) / math.sqrt(m_out)
        self.m_out, self.n_in = m_out, n_in
        self.K = ref.metric_gram(self.A, self.B, self.factor, cfg.lam)
        evals, evecs = torch.linalg.eigh(self.K)                     # ascending
        self.evecs = evecs.flip(1)                                   # columns v_1 (top) ... v_r
        self.evals = evals.flip(0)
        mode = MODES[cfg.mode]
        # noise whitening: regulated noise has covariance K^{-1} (per column / row) -> R makes it isotropic
        self.Rw = ref.cholesky_upper(self.K) if mode.noise == "regulated" else torch.eye(r, dtype=torch.float64)
        # clipping norm of the unit direction v_k (x) e_j: sqrt(lambda_k) in the regulated metric, 1 otherwise
        self.clip_norm = self.evals.sqrt() if mode.metric == "regulated" else torch.ones(r, dtype=torch.float64)
        # orthonormal whitened basis vectors b_k = Rw v_k / ||Rw v_k|| (orthogonal because v_k are K's eigvecs)
        Wv = self.Rw @ self.evecs
        self.basis = Wv / Wv.norm(dim=0, keepdim=True)               # (r, r), column k = b_k

    # per-sample gradients ------------------------------------------------------------------
    def direction(self, k: int, coeffs: torch.Tensor) -> torch.Tensor:
        """Gradients sum_j coeffs[b, j] v_k (x) e_j, shaped like the trained factor: (b, r, slots) for A,
        (b, slots, r) for B."""
        v = self.evecs[:, k]
        if self.factor == "A":
            return v[None, :, None] * coeffs[:, None, :]
        return coeffs[:, :, None] * v[None, None, :]

    def to_records(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, grad_out) with T = r tokens whose per-sample gradient (deer.reference.per_sample_grads)
        is exactly g. A phase: G B = I_r so g_A = s X. B phase: X A^T = I_r so g_B = s G^T."""
        s, b = self.cfg.lora_scale, g.shape[0]
        if self.factor == "A":
            G = torch.linalg.solve(self.B.T @ self.B, self.B.T)      # (r, m): G B = I
            return g / s, G.expand(b, -1, -1).contiguous()
        X = torch.linalg.solve(self.A @ self.A.T, self.A)            # (r, n): X A^T = I
        return X.expand(b, -1, -1).contiguous(), g.transpose(1, 2) / s

    # reading a release ---------------------------------------------------------------------
    def coordinates(self, noisy_sum: torch.Tensor) -> torch.Tensor:
        """Whitened coordinates (r, slots): entry (k, j) = <Phi(release), b_k (x) e_j>."""
        if self.factor == "A":
            return self.basis.T @ (self.Rw @ noisy_sum)
        return ((noisy_sum @ self.Rw.T) @ self.basis).T


# --------------------------------------------------------------------------------------------
# The federated server as a step function
# --------------------------------------------------------------------------------------------

def fed_aggregate_step(**kw):
    """step_fn adapter for deer.fed.aggregate.aggregate(privacy='client'), called exactly as the fed
    engine calls it: every record of the batch is one Poisson-sampled client whose update (trained factor
    minus the global one) is that record's per-sample gradient; the server clips each update, adds
    sigma C xi to the clipped sum and divides by the expected number of clients (denominator), so
    result * expected_batch_size is the noisy sum of clipped updates, as for dp_step. An empty sample
    still releases noise, as in the engine."""
    from deer.fed.aggregate import aggregate
    (lb,) = kw["layers"]
    phase = kw["phase"]
    g = ref.per_sample_grads(lb.x, lb.grad_out, lb.A, lb.B, lb.scale, phase)[phase]
    base = {"A": lb.A, "B": lb.B}
    m = g.shape[0]
    glob = {f"audit.lora_{f}": t.clone() for f, t in base.items()}     # a deer.nn.get_lora_state dict
    updates = [{**glob, f"audit.lora_{phase}": base[phase] + g[i]} for i in range(m)]
    res = aggregate(glob, updates, [1.0] * m, phase, Mechanism(kw["metric"], kw["noise"], lam=kw["lam"]),
                    privacy="client", noise_multiplier=kw["noise_multiplier"],
                    max_grad_norm=kw["max_grad_norm"], generator=kw["generator"],
                    denominator=kw["expected_batch_size"])
    noisy_mean = res.adapters[f"audit.lora_{phase}"].to(torch.float64) - base[phase]
    return SimpleNamespace(grads=[{phase: noisy_mean}], noise_multiplier_effective=res.noise_multiplier)


def engine_step(**kw):
    """step_fn adapter for deer.privacy.PrivacyEngine: one float32 LoRALinear carrying the audit's factors;
    the batch's records go through forward, backward and the private optimizer's step (LoRA capture,
    per-sample gradients, clipping and noise on the selected kernel backend). Each call builds a fresh
    engine whose noise seed is drawn from the audit's per-release stream."""
    import warnings
    from torch import nn
    from deer.nn.lora import LoRALinear
    from deer.privacy import PrivacyEngine
    (lb,) = kw["layers"]
    phase = kw["phase"]
    r, n = lb.A.shape
    m = lb.B.shape[0]
    layer = LoRALinear(nn.Linear(n, m, bias=False), r=r, alpha=lb.scale * r)
    with torch.no_grad():
        layer.lora_A.copy_(lb.A)
        layer.lora_B.copy_(lb.B)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.0)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=kw["generator"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # lam = 0 with regulated noise: fine here, B is full rank
        module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=layer, optimizer=opt, max_grad_norm=kw["max_grad_norm"],
            noise_multiplier=kw["noise_multiplier"], mechanism=Mechanism(kw["metric"], kw["noise"], lam=kw["lam"]),
            phase=phase, seed=seed, loss_reduction="sum", sample_rate=1.0,
            expected_batch_size=kw["expected_batch_size"])
    x = lb.x.to(torch.float32)
    loss = (module(x) * lb.grad_out.to(torch.float32)).sum()     # dL/dy = grad_out exactly
    loss.backward()
    opt.step()
    grad = module.factor(phase).grad.to(torch.float64)
    return SimpleNamespace(grads=[{phase: grad}], noise_multiplier_effective=opt.last_step["noise_multiplier_effective"])


STEP_FNS = {"reference": ref.dp_step, "fed": fed_aggregate_step, "engine": engine_step}


# --------------------------------------------------------------------------------------------
# Running the mechanism
# --------------------------------------------------------------------------------------------

def _stream(seed: int, *key: int) -> torch.Generator:
    """Counter-based noise stream keyed by (seed, client, step): never reused across releases."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def run_audit(config: AuditConfig | None = None, step_fn: Callable | None = None, **overrides) -> AuditResult:
    """Run one audit. `step_fn` defaults to deer.reference.dp_step (see the module docstring for the
    contract); planted-bug tests wrap it."""
    cfg = AuditConfig(**{**asdict(config or AuditConfig()), **overrides}).validate()
    step_fn = step_fn or ref.dp_step
    t0 = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(np.random.SeedSequence().generate_state(1).tobytes(), "little")
    gen = torch.Generator().manual_seed(seed)
    setup = _Setup(cfg, gen)
    C, m = cfg.max_grad_norm, cfg.canaries
    mode = MODES[cfg.mode]

    included = torch.rand(m, generator=gen) < 0.5                      # S_j = +1 w.p. 1/2
    inc_idx = torch.nonzero(included).flatten()
    # canaries along the top eigen-direction, norm canary_norm * C in the clipping metric
    canary_coef = torch.zeros(len(inc_idx), m, dtype=torch.float64)
    canary_coef[torch.arange(len(inc_idx)), inc_idx] = cfg.canary_norm * C / float(setup.clip_norm[0])
    canary_g = setup.direction(0, canary_coef)

    def background(count: int) -> torch.Tensor:
        # random directions in the second eigen-direction's span, clipping-metric norms in [0.3, 3] C
        coef = torch.randn(count, m, generator=gen, dtype=torch.float64)
        coef = coef / coef.norm(dim=1, keepdim=True).clamp_min(1e-300)
        coef = coef * (0.3 + 2.7 * torch.rand(count, 1, generator=gen, dtype=torch.float64)) * C
        return setup.direction(1, coef / float(setup.clip_norm[1]))

    # data owners: sample level -> clients (client 0 holds the canaries); client level -> one server whose
    # "records" are client updates (a canary client's update is its canary gradient).
    if cfg.level == "sample":
        owners = [torch.cat([background(cfg.background), canary_g]) if c == 0 else background(cfg.background)
                  for c in range(cfg.clients)]
        public_size = [cfg.background + (m if c == 0 else 0) for c in range(cfg.clients)]
    else:
        owners = [torch.cat([background(cfg.background), canary_g])]
        public_size = [cfg.background + m]
    n_canary_rows = len(inc_idx)

    claimed = DeerAccountant(cfg.accountant)
    nominal = DeerAccountant(cfg.accountant)
    charged_min = math.inf
    unnoised = False                                                   # a release reported multiplier 0
    releases = []                                                      # (owner, coords (r, m))
    for t in range(cfg.steps):
        for c, data in enumerate(owners):
            mask = torch.rand(data.shape[0], generator=gen) < cfg.sample_rate
            batch = data[mask]
            x, gout = setup.to_records(batch)
            expected = cfg.sample_rate * public_size[c]               # public, data-independent
            res = step_fn(layers=[ref.LayerBatch(x, gout, setup.A, setup.B, cfg.lora_scale)], phase=cfg.phase,
                          max_grad_norm=C, noise_multiplier=cfg.noise_multiplier, expected_batch_size=expected,
                          metric=mode.metric, noise=mode.noise, lam=cfg.lam,
                          generator=_stream(seed, c, t))
            noisy_sum = res.grads[0][cfg.phase].to(torch.float64) * expected
            releases.append((c, setup.coordinates(noisy_sum)))
            if c == 0:
                eff = float(getattr(res, "noise_multiplier_effective", cfg.noise_multiplier))
                charged_min = min(charged_min, eff)
                if eff == 0:
                    unnoised = True                                    # infinite epsilon, said plainly
                else:
                    claimed.step(eff, cfg.sample_rate)
                if cfg.noise_multiplier > 0:
                    nominal.step(cfg.noise_multiplier, cfg.sample_rate)

    def eps_of(acc: DeerAccountant, infinite: bool) -> float:
        return math.inf if infinite else acc.get_epsilon(cfg.delta)

    order, attack = _rank_canaries(releases, C)
    bound = epsilon_lower_bound_from_ranking(order, included.numpy(), cfg.delta, cfg.confidence)
    return AuditResult(epsilon_lower=bound["epsilon_lower"], epsilon_claimed=eps_of(claimed, unnoised),
                       epsilon_nominal=eps_of(nominal, cfg.noise_multiplier == 0), noise_multiplier_charged=charged_min, attack=attack,
                       canaries=m, included=n_canary_rows, guesses=bound["guesses"], correct=bound["correct"],
                       k_plus=bound["k_plus"], k_minus=bound["k_minus"], releases=len(releases),
                       seconds=time.perf_counter() - t0, config={**asdict(cfg), "seed": seed})


def _rank_canaries(releases: Sequence[tuple[int, torch.Tensor]], C: float) -> tuple[np.ndarray, str]:
    """Order canaries from least to most likely included (see the module docstring for the attack)."""
    coords = torch.stack([co for _, co in releases])                   # (N, r, m)
    owner0 = torch.tensor([o == 0 for o, _ in releases])
    canary = coords[:, 0, :]                                           # (N, m) top eigen-direction
    finger = coords[:, 2:, :].flatten(1)                               # (N, (r-2) m) noise only
    sum_score = canary[owner0].sum(0).numpy()

    norms = finger.norm(dim=1)
    scale = float(norms.max()) if len(norms) else 0.0
    groups: list[list[int]] = []
    if scale > 1e-9 * C:                                               # there is noise to compare
        unassigned = list(range(len(releases)))
        while unassigned:
            a = unassigned.pop(0)
            if float(norms[a]) <= 1e-9 * scale:
                continue
            d = (finger[unassigned] - finger[a]).norm(dim=1) if unassigned else torch.zeros(0)
            # identical noise gives identical fingerprints up to float32 rounding of the releases (~1e-6
            # relative); independent Gaussian fingerprints of >= 2 m coordinates are never within 1e-4
            same = [unassigned[i] for i in torch.nonzero(d <= 1e-4 * float(norms[a])).flatten().tolist()]
            if same:
                groups.append([a, *same])
                unassigned = [u for u in unassigned if u not in same]
    groups = [g for g in groups if any(bool(owner0[i]) for i in g)]
    if not groups:
        return np.argsort(sum_score, kind="stable"), "sum"
    spread = np.zeros(canary.shape[1])
    for g in groups:
        vals = canary[g]
        spread += (vals.max(0).values - vals.min(0).values).numpy()
    # within a noise-sharing group an absent canary's coordinate is constant up to rounding, while a present
    # one whose participation varies moves by at least C
    spread_q = np.where(spread > 1e-3 * C, spread, 0.0)
    return np.lexsort((sum_score, spread_q)), "shared-noise"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    d = AuditConfig()
    p = argparse.ArgumentParser(prog="python -m deer.audit", description=(
        "Empirical privacy audit (one-run method of Steinke, Nasr, Jagielski 2023): insert gradient canaries, "
        "run deer's DP step, and report an empirical lower bound on epsilon next to the accountant's epsilon."))
    p.add_argument("--mode", default=d.mode, choices=[*MODES, "all"], help="privacy mode ('all': every mode)")
    p.add_argument("--level", default=d.level, choices=[*LEVELS, "all"], help="sample (record) or client level")
    p.add_argument("--phase", default=d.phase, choices=["A", "B"])
    p.add_argument("--canaries", type=int, default=d.canaries)
    p.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--sample-rate", type=float, default=d.sample_rate)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--background", type=int, default=d.background)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--frozen-sigma-max", type=float, default=d.frozen_sigma_max)
    p.add_argument("--frozen-sigma-min", type=float, default=d.frozen_sigma_min)
    p.add_argument("--lam", type=float, default=d.lam)
    p.add_argument("--canary-norm", type=float, default=d.canary_norm)
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--accountant", default=d.accountant, choices=["rdp", "prv"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--step", default="reference", choices=list(STEP_FNS),
                   help="code path audited: 'reference' (deer.reference.dp_step), 'engine' (deer.privacy's "
                        "PrivacyEngine optimizer step, float32 kernels) or 'fed' (the federated server's "
                        "client-level aggregation; client level only)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    levels = list(LEVELS) if args.level == "all" else [args.level]
    base = {k: v for k, v in vars(args).items() if k not in ("mode", "level", "json", "step")}
    if args.step == "fed":
        if args.level == "sample":
            print("error: --step fed audits the server's client-level aggregation: use --level client",
                  file=sys.stderr)
            return 2
        levels = ["client"]
    results = []
    for level in levels:
        for mode in modes:
            try:
                results.append(run_audit(AuditConfig(mode=mode, level=level, **base), step_fn=STEP_FNS[args.step]))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=f"deer privacy audit (delta={args.delta}, confidence={args.confidence})")
        for col in ("level", "mode", "eps lower bound", "eps accountant", "eps nominal sigma", "sigma charged",
                    "attack", "correct/guesses", "verdict", "s"):
            table.add_column(col)
        for res in results:
            table.add_row(res.config["level"], res.config["mode"], f"{res.epsilon_lower:.3f}",
                          f"{res.epsilon_claimed:.3f}", f"{res.epsilon_nominal:.3f}",
                          f"{res.noise_multiplier_charged:.3f}", res.attack, f"{res.correct}/{res.guesses}",
                          "ok" if res.consistent else "VIOLATION", f"{res.seconds:.1f}")
        # wide enough for the table when writing to a file or pipe (rich defaults to 80 columns there)
        Console(width=None if sys.stdout.isatty() else 160).print(table)
    except ImportError:  # rich is a dependency, but keep the CLI usable without it
        for res in results:
            print(res.config["level"], res.config["mode"], res.epsilon_lower, res.epsilon_claimed,
                  "ok" if res.consistent else "VIOLATION")
    if args.json:
        payload = json.dumps([{**asdict(r), "consistent": r.consistent} for r in results], indent=2, default=str)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    return 0 if all(r.consistent for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
