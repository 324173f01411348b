"""Privacy ledgers for federated runs.

A ledger is the list of releases (noise multiplier, sample rate, steps) that actually happened; epsilon
is computed by replaying it into deer.privacy.accountant.DeerAccountant (RDP, Opacus' analysis).
Keeping the ledger itself (not the accountant object) makes resume trivial: the run directory's releases.jsonl is the ledger, appended and fsynced at every release.
"""
from __future__ import annotations

import functools
import hashlib
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


class JournalError(ValueError):
    """The privacy journal is damaged or does not agree with the run's checkpoint."""


_FIELDS = {"ledger": str, "round": int, "phase": str, "sigma": (int, float), "q": (int, float), "steps": int}


def _entry(line: str, where: str) -> dict:
    """One release from one journal line, or a JournalError naming the line."""
    try:
        e = json.loads(line)
    except json.JSONDecodeError:
        raise JournalError(f"{where} is not valid JSON") from None
    bad = [k for k, t in _FIELDS.items() if not isinstance(e, dict) or isinstance(e.get(k), bool)
           or not isinstance(e.get(k), t)]
    if bad or not (e["steps"] >= 1 and 0 < e["q"] <= 1 and e["round"] >= 0 and e["sigma"] >= 0):
        raise JournalError(f"{where} is not a release record (fields {sorted(_FIELDS)}; bad: "
                           f"{bad or 'a value out of range'}): {line[:120]!r}")
    return e


def _canonical(e: dict) -> bytes:
    return (json.dumps(e, sort_keys=True) + "\n").encode()


class ReleaseJournal:
    """Append-only JSON-lines file of releases, one per line: {"ledger", "round", "phase", "sigma", "q", "steps"}.

    Every line but the last ends in a newline. Only the last can be torn (a kill during its append):
    that release was never acknowledged by a checkpoint (the checkpoint of its round comes after it), so
    the first append cuts the file back to its last complete line. Any other malformed line is an
    error naming the file and the line. `digest(n)` fingerprints the first n releases, so a checkpoint
    can tell whether the journal it resumes from is the one it was written with."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: list[dict] = []
        self._tail = None   # how to mend the file's end before the next append: None, b"" (cut) or b"\n"
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            lines = data.split(b"\n")
            body, tail = lines[:-1], lines[-1]   # tail: the text after the final newline, empty unless torn
            for i, raw in enumerate(body):
                if raw.strip():
                    self.entries.append(self._parse(raw, f"{path}: line {i + 1}"))
            if tail.strip():
                self._good = len(data) - len(tail)
                try:   # a record whose newline was not written yet is complete: count it
                    self.entries.append(_entry(tail.decode("utf-8"), ""))
                    self._tail = b"\n"
                except (JournalError, UnicodeDecodeError):
                    self._tail = b""   # torn during its append: never acknowledged by a checkpoint

    @staticmethod
    def _parse(raw: bytes, where: str) -> dict:
        try:
            return _entry(raw.decode("utf-8"), where)
        except (JournalError, UnicodeDecodeError) as err:
            why = err if isinstance(err, JournalError) else f"{where} is not UTF-8 text"
            raise JournalError(f"{why}; the privacy journal is damaged. Restore it from a backup, or start a new "
                               f"run directory (its releases must not be forgotten)") from None

    def _mend_tail(self) -> None:
        """Before appending: cut a torn last line back to the last complete one, or end a complete last
        record with its newline, so the next record starts a line of its own."""
        if self._tail is None:
            return
        with open(self.path, "r+b") as f:
            if self._tail:
                f.seek(0, os.SEEK_END)
                f.write(self._tail)
            else:
                f.truncate(self._good)
            f.flush()
            os.fsync(f.fileno())
        self._tail = None

    def record(self, ledger: str, rnd: int, phase: str, sigma: float, q: float, steps: int) -> None:
        e = {"ledger": ledger, "round": rnd, "phase": phase, "sigma": sigma, "q": q, "steps": steps}
        self.entries.append(e)
        if self.path:
            self._mend_tail()
            with open(self.path, "a") as f:
                f.write(json.dumps(e) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def digest(self, n: int | None = None) -> str:
        """sha256 of the first n releases (all by default) in a canonical form."""
        h = hashlib.sha256()
        for e in self.entries[: len(self.entries) if n is None else n]:
            h.update(_canonical(e))
        return h.hexdigest()

    def releases(self, ledger: str) -> list[tuple[float, float, int]]:
        return [(e["sigma"], e["q"], e["steps"]) for e in self.entries if e["ledger"] == ledger]

    def ledgers(self) -> list[str]:
        return sorted({e["ledger"] for e in self.entries})

    def epsilon(self, delta: float, ledger: str | None = None) -> float:
        """Epsilon of one ledger, or the worst over all ledgers (sample level: the worst client)."""
        names = [ledger] if ledger else self.ledgers()
        return max((epsilon(self.releases(n), delta) for n in names), default=0.0)
