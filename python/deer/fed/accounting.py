"""Privacy ledgers for federated runs.

A ledger is the list of releases (noise multiplier, sample rate, steps) that actually happened; epsilon
is computed by replaying it into deer.privacy.accountant.DeerAccountant (RDP, Opacus' analysis).
Keeping the ledger itself (not the accountant object) makes resume trivial: the run directory's releases.jsonl is the ledger, appended and fsynced at every release.
"""
from __future__ import annotations

import functools
import json
import math
import os

from ..privacy.accountant import DeerAccountant, noise_multiplier_for


def epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    if not releases:
        return 0.0
    if any(not math.isfinite(s) or s <= 0 for s, _, _ in releases):
        return math.inf
    acc = DeerAccountant(mechanism="rdp")
    for s, q, k in releases:
        acc.step(noise_multiplier=s, sample_rate=q, num_steps=k)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier whose `steps` releases at `sample_rate` stay within (target_epsilon,
    delta) for the accountant that reports epsilon (deer.privacy.accountant.noise_multiplier_for)."""
    return noise_multiplier_for(target_epsilon, delta, sample_rate, steps, "rdp")


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
