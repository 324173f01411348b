"""Privacy ledgers for federated runs.

A ledger is the list of releases (noise multiplier, sample rate, steps) that actually happened; epsilon
is computed by replaying it into a maintained accountant (deer.privacy.accountant.DeerAccountant when
installed, else Opacus' RDP accountant). Keeping the ledger itself (not the accountant object) makes
resume trivial: the run directory's releases.jsonl is the ledger, appended and fsynced at every release.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings


def _accountant():
    try:
        from ..privacy.accountant import DeerAccountant
        return DeerAccountant(mechanism="rdp")
    except (ImportError, AttributeError, TypeError):
        from opacus.accountants import RDPAccountant
        return RDPAccountant()


def epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    if not releases:
        return 0.0
    if any(not math.isfinite(s) or s <= 0 for s, _, _ in releases):
        return math.inf
    acc = _accountant()
    with_k = _takes_num_steps(acc)
    for s, q, k in releases:
        if with_k:
            acc.step(noise_multiplier=s, sample_rate=q, num_steps=k)
        else:
            for _ in range(k):
                acc.step(noise_multiplier=s, sample_rate=q)
    return float(acc.get_epsilon(delta))


def _takes_num_steps(acc) -> bool:
    import inspect
    return "num_steps" in inspect.signature(acc.step).parameters


@functools.lru_cache(maxsize=256)
def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier whose `steps` releases at `sample_rate` stay within (target_epsilon, delta).

    Searched with Opacus' RDP accountant (fast), then checked against the accountant that reports
    epsilon (`epsilon` below) and raised until that one is within the target too."""
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier
    try:
        with warnings.catch_warnings():  # "optimal order is the largest alpha": only a looser bound
            warnings.simplefilter("ignore", UserWarning)
            sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=steps, accountant="rdp",
                                               epsilon_tolerance=0.01))
    except ValueError as e:
        raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} with {steps} "
                         f"releases at sample rate {sample_rate:.4g}: raise the budget or run fewer rounds/steps "
                         f"({e})") from None
    # The accountant that reports epsilon (DeerAccountant when installed) may convert RDP to
    # (eps, delta) slightly differently: raise sigma in 0.5% steps until it, too, is within budget.
    for _ in range(200):
        if epsilon([(sigma, sample_rate, steps)], delta) <= target_epsilon:
            return sigma
        sigma *= 1.005
    raise ValueError(f"could not calibrate a noise multiplier for epsilon {target_epsilon}")


class ReleaseJournal:
    """Append-only JSON-lines file of releases, one per line: {"ledger", "round", "phase", "sigma", "q", "steps"}."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: list[dict] = []
        if path and os.path.exists(path):
            with open(path) as f:
                for i, line in enumerate(f):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        self.entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        # only the last line can be torn by a kill mid-write; anything else is corruption
                        rest = f.read().strip()
                        if rest:
                            raise ValueError(f"{path}: line {i + 1} is not valid JSON; the privacy journal is corrupt")
                        break

    def record(self, ledger: str, rnd: int, phase: str, sigma: float, q: float, steps: int) -> None:
        e = {"ledger": ledger, "round": rnd, "phase": phase, "sigma": sigma, "q": q, "steps": steps}
        self.entries.append(e)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(e) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def releases(self, ledger: str) -> list[tuple[float, float, int]]:
        return [(e["sigma"], e["q"], e["steps"]) for e in self.entries if e["ledger"] == ledger]

    def ledgers(self) -> list[str]:
        return sorted({e["ledger"] for e in self.entries})

    def epsilon(self, delta: float, ledger: str | None = None) -> float:
        """Epsilon of one ledger, or the worst over all ledgers (sample level: the worst client)."""
        names = [ledger] if ledger else self.ledgers()
        return max((epsilon(self.releases(n), delta) for n in names), default=0.0)
