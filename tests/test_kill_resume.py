"""`deer train` killed with SIGKILL at any point (during pretraining, mid-round, right after a
checkpoint, twice in a row), then `deer train --resume`: the adapters and metrics are bit-identical to
an uninterrupted run with the same seed, and the epsilon counts every release in the journal (at least
the uninterrupted run's)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deer.fed.accounting import ReleaseJournal

pytestmark = pytest.mark.slow

CONFIG = ["methods=[deer]", "rounds=3", "image_size=8", "num_clients=2", "clients_per_round=2", "partition=iid",
          "public_fraction=0.3", "pretrain_epochs=3", "local_steps=6", "batch_size=16", "lora_r=2",
          "target_epsilon=6.0", "torch_threads=1", "seed=11",
          "model_kwargs={img_size: 8, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0}"]


def _deer(*args):
    return subprocess.Popen([sys.executable, "-m", "deer.cli", "train", "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def _journal_lines(run):
    try:
        return sum(1 for line in open(run / "deer" / "releases.jsonl") if line.endswith("\n"))
    except OSError:
        return 0


def _checkpoint(run):
    """(rounds completed, releases at that checkpoint) from state.json, (0, 0) before the first."""
    try:
        st = json.load(open(run / "deer" / "state.json"))
        return st["round"] + 1, st["releases"]
    except (OSError, ValueError, KeyError):
        return 0, 0


# when to kill: a predicate on the run directory, polled every few milliseconds
POINTS = {
    "pretraining": lambda run: (run / "config.yaml").exists(),
    "mid-round": lambda run: _journal_lines(run) >= 1 and _checkpoint(run)[0] == 0,
    "after-checkpoint": lambda run: _checkpoint(run)[0] >= 1,
    "mid-round-2": lambda run: _checkpoint(run)[0] >= 1 and _journal_lines(run) > _checkpoint(run)[1],
}
SCENARIOS = {"pretraining": ["pretraining"], "mid-round": ["mid-round"], "after-checkpoint": ["after-checkpoint"],
             "twice": ["mid-round", "mid-round-2"]}


def _kill_at(proc, run, point, timeout=300):
    deadline = time.monotonic() + timeout
    while not POINTS[point](run):
        assert proc.poll() is None, f"deer train ended before the kill point {point!r}: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _result(run):
    met = json.load(open(run / "deer" / "metrics.json"))
    rows = [{k: v for k, v in h.items() if k not in ("seconds", "epsilon")} for h in met["history"]]
    return load_file(str(run / "deer" / "adapter.safetensors")), rows, met


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    p = _deer("--run-dir", str(run), *CONFIG)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return _result(run)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_9_then_resume_is_bit_identical(tmp_path, reference, scenario):
    run = tmp_path / "run"
    first = True
    for point in SCENARIOS[scenario]:
        p = _deer("--run-dir", str(run), *CONFIG) if first else _deer("--resume", str(run))
        first = False
        _kill_at(p, run, point)
    p = _deer("--resume", str(run))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    adapters, rows, met = _result(run)
    ref_adapters, ref_rows, ref_met = reference
    assert set(adapters) == set(ref_adapters)
    for k, t in ref_adapters.items():
        assert torch.equal(adapters[k], t), (scenario, k)
    assert rows == ref_rows
    journal = ReleaseJournal(str(run / "deer" / "releases.jsonl"))
    assert met["releases"] == len(journal.entries) >= ref_met["releases"]
    assert met["epsilon"] == pytest.approx(journal.epsilon(1e-5), rel=1e-12)
    assert met["epsilon"] >= ref_met["epsilon"] * (1 - 1e-12)
