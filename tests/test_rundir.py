"""A run directory never forgets privacy spent: a resume refuses a journal that is missing, shorter,
edited or from another run; one process trains a directory at a time; nothing is unpickled; a torn
last journal line is cut before the next append; a malformed line is a one-line error naming it."""
import json
import os
import pickle

import pytest

from deer.fed import prepare_job, run_method
from deer.fed.accounting import JournalError, ReleaseJournal, epsilon
from deer.fed.rundir import RunDir, RunDirError, RunDirInUse

from test_fed_engine import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA = 1.3


class Killed(Exception):
    pass


def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def job():
    return prepare_job(tiny_cfg(4242, rounds=2, privacy="client", noise_multiplier=SIGMA), log=_quiet)


def _interrupted(job, run_dir):
    """A run stopped after round 2's B release (its checkpoint after round 1 holds 2 releases)."""
    def stop(info):
        if info["round"] == 1 and info["phase"] == "B":
            raise Killed
    with pytest.raises(Killed):
        run_method(job, "deer", str(run_dir), log=_quiet, on_aggregate=stop)
    return ReleaseJournal(str(run_dir / "releases.jsonl"))


def _lines(path):
    return open(path).read().splitlines(keepends=True)


def test_interrupted_run_resumes_and_counts_every_release(job, tmp_path):
    run = tmp_path / "deer"
    assert len(_interrupted(job, run).entries) == 3
    st = json.load(open(run / "state.json"))
    assert st["round"] == 0 and st["releases"] == 2 and os.path.exists(run / st["tensors"])
    res = run_method(job, "deer", str(run), log=_quiet)
    assert res["releases"] == 5   # the torn round's B release counts, and its redo releases again
    assert res["epsilon"] == pytest.approx(epsilon([(SIGMA, 1.0, 5)], job.cfg.delta), rel=1e-9)
    assert [f for f in os.listdir(run) if f.startswith("state.r")] == ["state.r2.safetensors"]


@pytest.mark.parametrize("damage", ["deleted", "shortened", "edited", "reordered"])
def test_damaged_journal_is_refused(job, tmp_path, damage):
    run = tmp_path / "deer"
    run_method(job, "deer", str(run), log=_quiet)           # 2 rounds, 4 releases, checkpoint after round 2
    path = run / "releases.jsonl"
    lines = _lines(path)
    assert len(lines) == 4
    if damage == "deleted":
        os.remove(path)
    elif damage == "shortened":
        path.write_text("".join(lines[:2] + lines[3:]))
    elif damage == "edited":
        e = json.loads(lines[0])
        e["sigma"] = 5.0                                      # a larger sigma would report less epsilon
        path.write_text(json.dumps(e) + "\n" + "".join(lines[1:]))
    else:
        path.write_text("".join([lines[1], lines[0]] + lines[2:]))
    before = path.read_bytes() if path.exists() else None
    match = "holds 0 releases" if damage == "deleted" else "holds 3 releases" if damage == "shortened" else "differ"
    with pytest.raises(RunDirError, match=match) as err:
        run_method(job, "deer", str(run), log=_quiet)
    assert str(path) in str(err.value) and "state.json" in str(err.value)
    assert (path.read_bytes() if path.exists() else None) == before   # nothing appended, nothing charged


def test_a_longer_journal_is_counted_in_full(job, tmp_path):
    """Releases after the checkpoint (a killed round) are the normal case: every one is counted."""
    run = tmp_path / "deer"
    run_method(job, "deer", str(run), log=_quiet)
    with open(run / "releases.jsonl", "a") as f:
        f.write(json.dumps({"ledger": "server", "round": 2, "phase": "B", "sigma": SIGMA, "q": 1.0, "steps": 1}) + "\n")
    res = run_method(job, "deer", str(run), log=_quiet)
    assert res["releases"] == 5
    assert res["epsilon"] == pytest.approx(epsilon([(SIGMA, 1.0, 5)], job.cfg.delta), rel=1e-9)


def test_checkpoint_of_another_run_is_refused(job, tmp_path):
    other = prepare_job(tiny_cfg(4243, rounds=2, privacy="client", noise_multiplier=SIGMA), log=_quiet)
    run_method(other, "deer", str(tmp_path / "a"), log=_quiet)
    run_method(job, "deer", str(tmp_path / "b"), log=_quiet)
    for f in ("state.json", "state.r2.safetensors"):
        os.replace(tmp_path / "a" / f, tmp_path / "b" / f)
    with pytest.raises(RunDirError, match="config fingerprint"):
        run_method(job, "deer", str(tmp_path / "b"), log=_quiet)
    with pytest.raises(RunDirError, match="'deer'"):
        run_method(job, "fedavg", str(tmp_path / "b"), log=_quiet)


@pytest.mark.parametrize("damage", ["torn", "replaced", "missing"])
def test_damaged_adapters_file_is_refused(job, tmp_path, damage):
    run = tmp_path / "deer"
    run_method(job, "deer", str(run), log=_quiet)
    ts = run / "state.r2.safetensors"
    if damage == "torn":
        ts.write_bytes(ts.read_bytes()[:-7])
    elif damage == "replaced":
        from safetensors.torch import load_file, save_file
        t = load_file(str(ts))
        k = sorted(t)[0]
        t[k] = t[k] + 1
        save_file(t, str(ts))
    else:
        os.remove(ts)
    with pytest.raises(RunDirError, match="missing" if damage == "missing" else "torn or replaced"):
        run_method(job, "deer", str(run), log=_quiet)


def test_damaged_state_json_is_refused(job, tmp_path):
    run = tmp_path / "deer"
    run_method(job, "deer", str(run), log=_quiet)
    (run / "state.json").write_text((run / "state.json").read_text()[:40])
    with pytest.raises(RunDirError, match=r"state\.json is damaged"):
        run_method(job, "deer", str(run), log=_quiet)


def test_one_process_at_a_time(job, tmp_path):
    run = tmp_path / "deer"
    with RunDir(str(run)):
        with pytest.raises(RunDirInUse, match=rf"pid {os.getpid()} on"):
            run_method(job, "deer", str(run), log=_quiet)
        assert not (run / "releases.jsonl").exists() and not (run / "state.json").exists()
    assert run_method(job, "deer", str(run), log=_quiet)["releases"] == 4   # released once the holder is done


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))   # unpickling this creates the marker file


def test_old_pickle_checkpoint_is_not_unpickled(job, tmp_path):
    run = tmp_path / "deer"
    run.mkdir()
    marker = tmp_path / "ran"
    with open(run / "state.pt", "wb") as f:
        pickle.dump(_Planted(str(marker)), f)
    with pytest.raises(RunDirError, match="old pickle format"):
        run_method(job, "deer", str(run), log=_quiet)
    assert not marker.exists()


@pytest.mark.parametrize("tail", ['{"ledger": "ser', '{"ledger": "server", "round": 1, "phase": "A", "sigma": 1.3, '
                                  '"q": 1.0, "steps": 1}'])
def test_torn_tail_is_cut_before_the_next_append(job, tmp_path, tail):
    """A kill during an append leaves a fragment without its newline: the resume cuts it (the release
    was never acknowledged) and appends after the last complete line. A complete record whose newline
    is missing counts. Either way every later resume reads the journal."""
    run = tmp_path / "deer"
    _interrupted(job, run)
    with open(run / "releases.jsonl", "a") as f:
        f.write(tail)
    complete = tail.endswith("}")
    res = run_method(job, "deer", str(run), log=_quiet)
    assert res["releases"] == 5 + complete
    lines = _lines(run / "releases.jsonl")
    assert len(lines) == 5 + complete and all(l.endswith("}\n") for l in lines)
    again = run_method(job, "deer", str(run), log=_quiet)      # the run is complete: nothing more released
    assert again["releases"] == 5 + complete and again["epsilon"] == pytest.approx(res["epsilon"], rel=1e-12)


@pytest.mark.parametrize("bad", ['{"ledger": "server"}', '{"ledger": "server", "round": 0, "phase": "B", '
                                 '"sigma": "1.3", "q": 1.0, "steps": 1}', 'not json',
                                 '{"ledger": "server", "round": 0, "phase": "B", "sigma": 1.3, "q": 0, "steps": 1}'])
def test_malformed_line_is_one_error_naming_it(job, tmp_path, bad):
    run = tmp_path / "deer"
    run_method(job, "deer", str(run), log=_quiet)
    lines = _lines(run / "releases.jsonl")
    (run / "releases.jsonl").write_text(lines[0] + bad + "\n" + "".join(lines[1:]))
    with pytest.raises(JournalError, match=r"releases\.jsonl: line 2 .*damaged") as err:
        run_method(job, "deer", str(run), log=_quiet)
    assert "\n" not in str(err.value)


def test_warning_when_a_resumed_run_passes_its_target(tmp_path):
    cfg = tiny_cfg(4244, rounds=2, privacy="client", target_epsilon=6.0)
    job = prepare_job(cfg, log=_quiet)
    clean = run_method(job, "deer", None, log=_quiet)
    assert clean["epsilon"] <= 6.0 * (1 + 1e-6)
    run = tmp_path / "deer"
    _interrupted(job, run)
    logs = []
    res = run_method(job, "deer", str(run), log=logs.append)
    assert res["epsilon"] > 6.0
    warn = [l for l in logs if "above target_epsilon" in l]
    assert len(warn) == 1 and "WARNING" in warn[0] and "target_epsilon=6.0" in warn[0] and f"{res['epsilon']:.3f}" in warn[0]
    logs.clear()
    run_method(job, "deer", str(tmp_path / "fresh"), log=logs.append)
    assert not any("above target_epsilon" in l for l in logs)


def test_damaged_backbone_is_one_error_naming_it(tmp_path):
    """A torn or foreign backbone.safetensors (the run's pretrained backbone) is refused by name."""
    path = tmp_path / "backbone.safetensors"
    for content in (b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad", b"not safetensors at all"):
        path.write_bytes(content)
        with pytest.raises(RunDirError, match=r"backbone\.safetensors \(the pretrained backbone\) cannot be read"):
            prepare_job(tiny_cfg(1, rounds=1), log=_quiet, backbone_path=str(path))
