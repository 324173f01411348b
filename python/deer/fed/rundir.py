"""A federated run directory that never forgets privacy spent and never unpickles.

    <run_dir>/lock                 held (flock) by the one process training this directory
    <run_dir>/releases.jsonl       the privacy journal (deer.fed.accounting.ReleaseJournal)
    <run_dir>/state.r<N>.safetensors  the global adapters after round N, the last completed one
    <run_dir>/state.json           round, history, skipped sub-rounds, the config fingerprint, the method,
                                   the number of releases and the journal digest at that checkpoint,
                                   and the name and sha256 of the adapters file

The adapters file of a round is new (never overwritten), and state.json is written last and renamed into place: it is the commit point of a checkpoint. A resume
refuses a journal that is missing, shorter than the checkpoint's count or whose first releases differ
from the ones the checkpoint saw: the epsilon it would report would omit releases the run made. A
journal longer than the checkpoint (releases of the round the run was killed in) is the normal case:
every release in it is counted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket

import torch

from .accounting import JournalError, ReleaseJournal

STATE_JSON, JOURNAL, LOCK = "state.json", "releases.jsonl", "lock"
FORMAT = 1


class RunDirError(ValueError):
    """A run directory that cannot be resumed as it is (damaged, from another run, or in use)."""


class RunDirInUse(RunDirError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_replace(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write a safetensors file atomically: a kill leaves the old file or the new one, never a torn one."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path + ".tmp")
    _fsync_replace(path + ".tmp", path)


def read_safetensors(path: str, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, or a RunDirError naming it and `what` it is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"{path} ({what}) cannot be read ({type(e).__name__}: {e}): it is damaged or not a "
                          "safetensors file. Restore it, or remove it to have deer write it again") from None


class RunDir:
    """The run directory of one method: lock it, read its journal, load and save checkpoints."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._lock = open(os.path.join(path, LOCK), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise RunDirInUse(f"{path} is being trained by {holder}; wait for it to finish (or stop it) before "
                              f"resuming, or use another run directory") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock.flush()
        if os.path.exists(os.path.join(path, "state.pt")):
            self.close()
            raise RunDirError(f"{os.path.join(path, 'state.pt')} is a checkpoint in the old pickle format, which deer "
                              f"no longer loads (unpickling a file can run any code it contains). Start a new run "
                              f"directory; keep this one's releases.jsonl with the results it produced")
        try:
            self.journal = ReleaseJournal(os.path.join(path, JOURNAL))
        except JournalError:
            self.close()
            raise

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def load(self, fingerprint: str, method: str) -> dict | None:
        """The last checkpoint ({"round", "adapters", "history", "skipped"}), or None when the run
        never completed a round. Raises RunDirError naming the file for anything that does not agree."""
        js = os.path.join(self.path, STATE_JSON)
        if not os.path.exists(js):
            return None
        try:
            with open(js) as f:
                st = json.load(f)
            keys = {"format", "round", "history", "skipped", "fingerprint", "method", "releases", "journal_sha256",
                    "tensors", "tensors_sha256"}
            if not isinstance(st, dict) or not keys <= set(st):
                raise ValueError(f"missing keys {sorted(keys - set(st) if isinstance(st, dict) else keys)}")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{js} is damaged ({e}); it cannot be resumed. Start a new run directory") from None
        if st["fingerprint"] != fingerprint or st["method"] != method:
            raise RunDirError(f"{js} holds a run of {st['method']!r} with config fingerprint {st['fingerprint']} "
                              f"(this run: {method!r}, {fingerprint}): use a new run directory, or the original "
                              f"configuration to resume")
        n, j = int(st["releases"]), self.journal
        if len(j.entries) < n:
            raise RunDirError(f"{j.path} holds {len(j.entries)} releases but the checkpoint after round {st['round'] + 1} "
                              f"({js}) counted {n}: releases are missing, and a resume would report less privacy "
                              f"spent than the run spent. Restore the journal, or start a new run directory")
        if j.digest(n) != st["journal_sha256"]:
            raise RunDirError(f"the first {n} releases in {j.path} differ from the ones the checkpoint after round "
                              f"{st['round'] + 1} ({js}) recorded: the journal was edited or comes from another run. "
                              f"Restore it, or start a new run directory")
        ts = os.path.join(self.path, os.path.basename(str(st["tensors"])))
        if not os.path.exists(ts) or _sha256(ts) != st["tensors_sha256"]:
            raise RunDirError(f"{ts} is {'missing' if not os.path.exists(ts) else 'not the file ' + js + ' recorded'} "
                              f"(torn or replaced); it cannot be resumed. Start a new run directory")
        from safetensors.torch import load_file
        adapters = load_file(ts)
        return {"round": int(st["round"]), "adapters": adapters, "history": st["history"], "skipped": st["skipped"]}

    def save(self, rnd: int, adapters: dict[str, torch.Tensor], history: list, skipped: list, fingerprint: str,
             method: str) -> None:
        """Checkpoint after round `rnd`: a new adapters file first, then state.json (the commit point),
        then the adapters files no checkpoint points at any more."""
        name = f"state.r{rnd + 1}.safetensors"
        ts, js = os.path.join(self.path, name), os.path.join(self.path, STATE_JSON)
        write_safetensors(adapters, ts)
        st = {"format": FORMAT, "round": rnd, "history": history, "skipped": skipped, "fingerprint": fingerprint,
              "method": method, "releases": len(self.journal.entries), "journal_sha256": self.journal.digest(),
              "tensors": name, "tensors_sha256": _sha256(ts)}
        with open(js + ".tmp", "w") as f:
            json.dump(st, f, default=float)
        _fsync_replace(js + ".tmp", js)
        for old in os.listdir(self.path):
            if old.startswith("state.r") and old.endswith(".safetensors") and old != name:
                os.remove(os.path.join(self.path, old))
