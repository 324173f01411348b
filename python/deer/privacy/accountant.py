"""Privacy accounting for deer: a thin, validated wrapper around Opacus' accountants.

Every DP release deer makes (a local DP-SGD step at sample level, one server aggregation at client level)
is a Poisson-subsampled Gaussian mechanism: sampling rate q, noise multiplier sigma = noise std /
sensitivity. `DeerAccountant` records the history of (sigma, q, steps) and composes it with a maintained
accountant (Opacus' RDP or PRV analysis); nothing here re-derives the RDP math. What deer adds:

* heterogeneous histories at a bounded cost: the paper mode's true multiplier sigma / sigma_max(frozen)
  changes every sub-round, so the RDP curve is kept as a running sum over the orders (one Opacus
  `compute_rdp` call per distinct (sigma, q), cached), and epsilon is one Opacus conversion away;
* an RDP order grid reaching 1024 (tiny epsilon) with few costly fractional orders (see RDP_ORDERS), so
  the optimum is rarely at the edge of the grid (a bound at the edge is valid, only looser);
* input validation with errors that say what to do, JSON-serialisable state (a resumed run never
  forgets privacy it already spent), and `would_exceed` to refuse a step *before* it is taken.

See docs/privacy.md for what each deer mode guarantees and which multiplier it charges.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from typing import Sequence

import numpy as np

MECHANISMS = ("rdp", "prv")

# RDP orders: integers 2..64 and a geometric tail to 1024 (cheap: Opacus sums a finite binomial series for
# an integer order), plus the fractional orders of dp-accounting's default grid and a few more between 1
# and 6. Fractional orders near 1 cost Opacus a slowly converging series (tens of ms each per distinct
# (sigma, q)) and only matter for epsilon in the tens, so the grid stops at 1.1. A coarser grid can only
# make epsilon larger (the conversion takes the minimum over orders), never smaller.
RDP_ORDERS: tuple[float, ...] = tuple(sorted(set(
    [1.1, 1.25, 1.5, 1.75, 2.25, 2.5, 2.75, 3.25, 3.5, 3.75, 4.5, 5.5]
    + [float(a) for a in range(2, 65)]
    + [72.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0]
)))

# PRV accuracy: Opacus returns the upper end of an interval of width 2 * eps_error around the estimate,
# with delta_error = delta / 1000 (Opacus' defaults, kept so results match a plain Opacus PRVAccountant).
PRV_EPS_ERROR = 0.01

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_number(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        # torch / numpy 0-d tensors: accept anything float() understands, reject the rest clearly
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} is NaN: a NaN noise multiplier or rate usually means a NaN crept "
                         f"into sigma_max(frozen factor) or the batch size; fix it before accounting")
    return x


def check_noise_multiplier(noise_multiplier, num_steps: int = 1) -> float:
    """sigma must be > 0 (math.inf is allowed: a release that reveals nothing costs nothing)."""
    s = _check_number("noise_multiplier", noise_multiplier)
    if s < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {s}")
    if s == 0 and num_steps > 0:
        raise ValueError("noise_multiplier = 0 makes epsilon infinite: a step without noise is not "
                         "differentially private at all. Use a noise multiplier > 0 (see "
                         "noise_multiplier_for) or do not account/claim DP for this run.")
    return s


def check_sample_rate(sample_rate) -> float:
    q = _check_number("sample_rate", sample_rate)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1] (expected batch size / dataset size at sample "
                         f"level, sampled clients / all clients at client level), got {q}")
    return q


def check_delta(delta) -> float:
    d = _check_number("delta", delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1) (typically well below 1 / dataset size, e.g. 1e-5), "
                         f"got {d}")
    return d


def check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps:
        raise TypeError(f"num_steps must be a whole number, got {num_steps!r}")
    n = int(num_steps)
    if n < 0:
        raise ValueError(f"num_steps must be >= 0, got {n}")
    return n


def check_epsilon(name: str, eps) -> float:
    e = _check_number(name, eps)
    if not e > 0:
        raise ValueError(f"{name} must be > 0, got {e}")
    return e


def check_mechanism(mechanism: str) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS} ('rdp': Renyi DP, fast for long and "
                         f"heterogeneous histories; 'prv': numerical composition, tighter), got {mechanism!r}")
    return mechanism


# --------------------------------------------------------------------------------------------
# Opacus-backed epsilon computation
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP curve of one Poisson-subsampled Gaussian step over RDP_ORDERS (Opacus' analysis)."""
    from opacus.accountants.analysis import rdp as opacus_rdp
    out = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=list(RDP_ORDERS))
    out = np.asarray(out, dtype=np.float64)
    out.setflags(write=False)
    return out


def _epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    from opacus.accountants.analysis import rdp as opacus_rdp
    if not np.any(rdp > 0):
        return 0.0
    with warnings.catch_warnings():
        # Opacus warns when the optimum is at the edge of the order grid; the bound is still valid.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    # Opacus' conversion can go slightly negative for a negligible RDP curve; epsilon is >= 0.
    return max(0.0, float(eps))


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant
    hist = [(s, q, n) for s, q, n in history if n > 0 and math.isfinite(s)]
    if not hist:
        return 0.0
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in hist]
    with np.errstate(divide="ignore", invalid="ignore"):  # q = 1 makes log(1 - q) = -inf inside Opacus
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


# --------------------------------------------------------------------------------------------
# The accountant
# --------------------------------------------------------------------------------------------

class DeerAccountant:
    """Composes the privacy loss of a sequence of Poisson-subsampled Gaussian releases.

    mechanism: 'rdp' (Opacus' RDP analysis; fast, the default) or 'prv' (Opacus' PRV accountant;
    tighter, cost grows with the number of *distinct* (sigma, q) entries in the history).

    Each `step(noise_multiplier, sample_rate, num_steps)` records num_steps releases with that true
    multiplier (the multiplier the mechanism actually has; for deer's `paper` mode that is
    sigma / sigma_max(frozen), see `paper_mode_multiplier`). Different multipliers per step compose
    correctly (RDP adds per order; PRV convolves the privacy-loss distributions).
    """

    def __init__(self, mechanism: str = "rdp"):
        self.mechanism = check_mechanism(mechanism)
        self.history: list[tuple[float, float, int]] = []
        self._rdp = np.zeros(len(RDP_ORDERS))

    # -- recording ---------------------------------------------------------------------------
    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        n = check_num_steps(num_steps)
        s = check_noise_multiplier(noise_multiplier, n)
        q = check_sample_rate(sample_rate)
        if n == 0:
            return
        if self.history and self.history[-1][0] == s and self.history[-1][1] == q:
            self.history[-1] = (s, q, self.history[-1][2] + n)
        else:
            self.history.append((s, q, n))
        if self.mechanism == "rdp" and math.isfinite(s):
            self._rdp = self._rdp + n * _rdp_one_step(s, q)

    # -- querying ----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        d = check_delta(delta)
        if self.mechanism == "rdp":
            return _epsilon_from_rdp(self._rdp, d)
        return _prv_epsilon(self.history, d)

    def get_rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of the whole history at each order): the composed Renyi-DP curve ('rdp' only)."""
        if self.mechanism != "rdp":
            raise ValueError("get_rdp needs mechanism='rdp' (a PRV accountant composes privacy-loss "
                             "distributions, not RDP curves)")
        return np.array(RDP_ORDERS), self._rdp.copy()

    def would_exceed(self, target_epsilon: float, delta: float, noise_multiplier: float,
                     sample_rate: float, num_steps: int = 1) -> bool:
        """True when taking num_steps more releases at (noise_multiplier, sample_rate) would push
        epsilon(delta) above target_epsilon. Call it BEFORE a step and refuse the step if True.
        A noise multiplier of 0 always exceeds (infinite epsilon)."""
        target = check_epsilon("target_epsilon", target_epsilon)
        d = check_delta(delta)
        n = check_num_steps(num_steps)
        s = _check_number("noise_multiplier", noise_multiplier)
        if s < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {s}")
        q = check_sample_rate(sample_rate)
        if n > 0 and s == 0:
            return True
        trial = DeerAccountant(self.mechanism)
        trial.load_state_dict(self.state_dict())
        trial.step(s, q, n)
        return trial.get_epsilon(d) > target

    def __len__(self) -> int:
        """Number of releases recorded."""
        return sum(n for _, _, n in self.history)

    def __repr__(self) -> str:
        return f"DeerAccountant(mechanism={self.mechanism!r}, releases={len(self)}, entries={len(self.history)})"

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state. An infinite multiplier (a release that reveals nothing) is
        stored as the string 'inf' so the dict survives strict JSON."""
        return {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "history": [[("inf" if math.isinf(s) else s), q, n] for s, q, n in self.history],
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore the history. The history is what was spent; it may be loaded into an accountant of
        the other mechanism (the same releases composed another way)."""
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict) or "history" not in d:
            raise ValueError("accountant state must be a dict with a 'history' list, as produced by "
                             "DeerAccountant.state_dict()")
        version = d.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"accountant state version {version} is not supported (expected "
                             f"{STATE_VERSION}); it was written by another deer version")
        fresh = DeerAccountant(self.mechanism)
        for k, entry in enumerate(d["history"]):
            try:
                s, q, n = entry
            except (TypeError, ValueError):
                raise ValueError(f"accountant state history[{k}] must be [noise_multiplier, "
                                 f"sample_rate, num_steps], got {entry!r}") from None
            s = math.inf if s == "inf" else s
            fresh._append_exact(check_noise_multiplier(s, 1), check_sample_rate(q), check_num_steps(n))
        self.history, self._rdp = fresh.history, fresh._rdp

    def _append_exact(self, s: float, q: float, n: int) -> None:
        # keep entries exactly as stored (no merging) so a round trip reproduces the same history
        if n == 0:
            return
        self.history.append((s, q, n))
        if math.isfinite(s):
            self._rdp = self._rdp + n * _rdp_one_step(s, q)


# --------------------------------------------------------------------------------------------
# Calibration and the paper mode's true multiplier
# --------------------------------------------------------------------------------------------

def noise_multiplier_for(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                         mechanism: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' search tolerance, 0.01 in epsilon) such that `steps`
    releases at `sample_rate` spend at most target_epsilon at target_delta. Uses Opacus'
    get_noise_multiplier with the same orders / PRV settings as DeerAccountant, so
    DeerAccountant(mechanism).step(sigma, q, steps) then reports epsilon <= target_epsilon."""
    from opacus.accountants.utils import get_noise_multiplier
    target = check_epsilon("target_epsilon", target_epsilon)
    d = check_delta(target_delta)
    q = check_sample_rate(sample_rate)
    n = check_num_steps(steps)
    check_mechanism(mechanism)
    if n == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier")
    kwargs = {"alphas": list(RDP_ORDERS)} if mechanism == "rdp" else {"eps_error": PRV_EPS_ERROR}
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", UserWarning)
            sigma = get_noise_multiplier(target_epsilon=target, target_delta=d, sample_rate=q,
                                         steps=n, accountant=mechanism, epsilon_tolerance=0.01, **kwargs)
    except ValueError as e:
        raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon <= {target} at delta={d} with "
                         f"{n} steps at sample rate {q}: the budget is too small for this many releases. "
                         f"Raise the budget, take fewer steps or sample fewer records per step ({e})") from None
    return float(sigma)


def paper_mode_multiplier(noise_multiplier: float, frozen_factors, lam: float = 0.0) -> float:
    """True per-step multiplier of the paper's mechanism (Euclidean clipping to C + regulated noise
    sigma C xi, Cov(xi) = K^{-1}, K = frozen^T frozen + lam I): sigma / max_l sqrt(sigma_max(frozen_l)^2
    + lam). A Euclidean-clipped gradient has whitened norm up to C sqrt(lambda_max(K)); the worst layer
    sets the multiplier (docs/design.md section 5). What deer's regulated_paper mechanism charges.
    frozen_factors: one 2-D tensor or a sequence of them (the frozen factor of every LoRA layer)."""
    import torch
    s = _check_number("noise_multiplier", noise_multiplier)
    if s < 0 or lam < 0:
        raise ValueError(f"noise_multiplier and the ridge lambda must be >= 0, got {s} and {lam}")
    factors = [frozen_factors] if hasattr(frozen_factors, "shape") else list(frozen_factors)
    if not factors:
        raise ValueError("paper_mode_multiplier needs the frozen factor of at least one LoRA layer")
    Ks = []
    for F in factors:
        F = torch.as_tensor(F).detach().to(torch.float64)
        if F.dim() != 2 or not torch.isfinite(F).all():
            raise ValueError(f"a frozen LoRA factor must be a finite 2-D tensor (B: out x r, A: r x in), got "
                             f"shape {tuple(F.shape)}{' with NaN/Inf' if F.dim() == 2 else ''}")
        # the r x r Gram (the nonzero spectrum is the same on either side)
        Ks.append((F.T @ F if F.shape[0] >= F.shape[1] else F @ F.T) + lam * torch.eye(min(F.shape), dtype=F.dtype))
    if max(float(torch.linalg.eigvalsh(K).max()) for K in Ks) <= 0.0:
        raise ValueError("every frozen factor is exactly zero (e.g. B = 0 at LoRA init): regulated noise is "
                         "undefined without a ridge lambda > 0; the paper mode cannot be used in this phase")
    from deer.reference import effective_multiplier
    return float(effective_multiplier(s, "euclidean", "regulated", Ks))


__all__ = ["DeerAccountant", "noise_multiplier_for", "paper_mode_multiplier", "RDP_ORDERS", "MECHANISMS",
           "PRV_EPS_ERROR"]
