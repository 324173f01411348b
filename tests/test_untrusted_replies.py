"""A site cannot crash or steer the round loop: every reply is checked against what the server sent
(deer.fed.replies), in the one loop both transports run. One malicious site among honest ones sends,
in turn, each kind of bad reply: the run completes, the reply is left out with a logged reason naming
the site and the field, and the result equals the run in which that site never replied; an inflated
example count is capped at the site's partition size; a fake release report never reaches the journal."""
import re

import pytest
import torch

from deer.fed import prepare_job, run_method
from deer.fed.engine import InProcessClients
from deer.nn import lora_key

from test_fed_engine import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
BAD = 2


def _quiet(*a):
    pass


class OneMalicious(InProcessClients):
    """The in-process transport, with site BAD's reply replaced by `attack(reply)`."""

    def __init__(self, job, attack):
        super().__init__(job)
        self.attack = attack

    def train(self, cids, rnd, si, phase, spec, sigma, start):
        out = super().train(cids, rnd, si, phase, spec, sigma, start)
        if BAD in out:
            out[BAD] = self.attack(out[BAD])
        return out


def _with(reply, **kw):
    for k, v in kw.items():
        setattr(reply, k, v)
    return reply


def _map(reply, fn):
    return _with(reply, adapters=fn(dict(reply.adapters)))


def _first(d):
    return sorted(d)[0]


def _reshaped(d):
    k = _first(d)
    d[k] = torch.zeros(d[k].shape[0] + 1, *d[k].shape[1:])
    return d


def _retyped(d):
    k = _first(d)
    d[k] = d[k].double()
    return d


def _dropped(d):
    del d[_first(d)]
    return d


def _frozen_added(d):
    unit, factor = lora_key(_first(d))
    d[f"{unit}.lora_{'A' if factor == 'B' else 'B'}"] = torch.zeros(1)
    return d


def _unknown_added(d):
    d["head.weight"] = torch.zeros(3, 3)
    return d


def _nan(d):
    k = _first(d)
    d[k] = d[k].clone()
    d[k].view(-1)[0] = float("nan")
    return d


ATTACKS = {   # name -> (attack, the field the log must name)
    "wrong shape": (lambda r: _map(r, _reshaped), "factors: .* is \\("),
    "wrong dtype": (lambda r: _map(r, _retyped), "torch.float64, the server sent"),
    "missing layer": (lambda r: _map(r, _dropped), "factors: 1 missing"),
    "frozen factor added": (lambda r: _map(r, _frozen_added), "1 not asked for"),
    "unknown tensor": (lambda r: _map(r, _unknown_added), "head.weight"),
    "NaN": (lambda r: _map(r, _nan), "NaN/Inf"),
    "not a mapping": (lambda r: _with(r, adapters=[1, 2]), "not a mapping"),
    "NaN examples": (lambda r: _with(r, num_examples=float("nan")), "num-examples: nan"),
    "zero examples": (lambda r: _with(r, num_examples=0), "num-examples: 0"),
    "never comes": (lambda r: "ClientTimeout: no reply within client_timeout_s", "ClientTimeout"),
}
SAMPLE_ATTACKS = {
    "no report": (lambda r: _with(r, releases=[]), "releases: missing"),
    "report not a list": (lambda r: _with(r, releases="lots of noise"), "releases: a str, not a list"),
    "report garbage": (lambda r: _with(r, releases=[("a", 1, 2)]), "is not a \\(sigma"),
    "report bigger sigma": (lambda r: _with(r, releases=[(s * 10, q, k) for s, q, k in r.releases]),
                            "noise multiplier .* differs"),
    "report smaller q": (lambda r: _with(r, releases=[(s, q / 2, k) for s, q, k in r.releases]),
                         "sample rate .* differs"),
    "report fewer steps": (lambda r: _with(r, releases=[(r.releases[0][0], r.releases[0][1], 1)]),
                           "1 steps reported"),
}


def _cfg(privacy):
    kw = dict(privacy="client", noise_multiplier=1.3, min_clients=1) if privacy == "client" else \
        dict(privacy="sample", noise_multiplier=1.1) if privacy == "sample" else {}
    return tiny_cfg(777, rounds=2, **kw)


@pytest.fixture(scope="module")
def jobs():
    return {p: prepare_job(_cfg(p), log=_quiet) for p in ("none", "sample", "client")}


@pytest.fixture(scope="module")
def absent(jobs):
    """Each privacy level's run in which site BAD never replies."""
    return {p: run_method(j, "deer", log=_quiet, clients=OneMalicious(j, lambda r: "gone"))
            for p, j in jobs.items()}


def _run(job, attack):
    logs = []
    res = run_method(job, "deer", log=logs.append, clients=OneMalicious(job, attack))
    return res, "\n".join(logs)


@pytest.mark.parametrize("privacy", ["none", "sample", "client"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_bad_reply_is_left_out(jobs, absent, privacy, name):
    attack, field = ATTACKS[name]
    res, text = _run(jobs[privacy], attack)
    assert re.search(rf"client {BAD} left out: .*{field}", text), text
    ref = absent[privacy]
    for k, t in ref["adapters"].items():
        assert torch.equal(res["adapters"][k], t), k
    assert res["releases"] == ref["releases"] + (4 if privacy == "sample" and name not in ("never comes",) else 0)
    assert len(res["history"]) == 2


@pytest.mark.parametrize("name", sorted(SAMPLE_ATTACKS))
def test_fake_release_report_is_left_out_and_not_journaled(jobs, absent, name):
    attack, field = SAMPLE_ATTACKS[name]
    res, text = _run(jobs["sample"], attack)
    assert re.search(rf"client {BAD} left out: .*{field}", text), text
    ref = absent["sample"]
    assert res["releases"] == ref["releases"]                 # nothing of the fake report was recorded
    assert res["epsilon"] == ref["epsilon"]
    for k, t in ref["adapters"].items():
        assert torch.equal(res["adapters"][k], t), k


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_inflated_example_count_is_capped(jobs, privacy):
    job = jobs[privacy]
    aggs = []
    logs = []
    run_method(job, "deer", log=logs.append, on_aggregate=aggs.append,
               clients=OneMalicious(job, lambda r: _with(r, num_examples=10 ** 9)))
    size = len(job.data.clients[BAD].y)
    assert f"client {BAD}: num-examples 1e+09 capped at its partition's {size}" in "\n".join(logs)
    honest = {c: float(len(job.data.clients[c].y)) for c in range(job.cfg.num_clients)}
    for a in aggs:
        assert a["weights"] == [honest[c] for c in a["ids"]]


def test_huge_update_at_client_level_is_bounded(jobs):
    """A finite 1e30-scaled update is well-formed input: client-level clipping bounds its influence. In
    the first sub-round (same start, same keyed noise) the aggregate differs from the honest run's by
    (clip(bad) - clip(honest)) / (q N), of norm at most 2C / N (FedAvg-LoRA: Euclidean metric, q = 1)."""
    job = jobs["client"]
    first = {}
    for name, attack in (("bad", lambda r: _map(r, lambda d: {k: v * 1e30 for k, v in d.items()})),
                         ("honest", lambda r: r)):
        aggs = []
        res = run_method(job, "fedavg", log=_quiet, on_aggregate=aggs.append, clients=OneMalicious(job, attack))
        assert all(torch.isfinite(t).all() for t in res["adapters"].values())
        first[name] = aggs[0]["after"]
    gap = sum(float((first["bad"][k] - first["honest"][k]).pow(2).sum()) for k in first["bad"]) ** 0.5
    assert 0 < gap <= 2 * job.cfg.max_grad_norm / job.cfg.num_clients * (1 + 1e-6)


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_update_norm_bound_scales_a_huge_update(jobs, privacy):
    """A finite 1e30-norm update: accepted as is without a bound (it drags the mean); with
    update_norm_bound it is scaled to the bound, logged, and the mean stays near the honest ones."""
    job = jobs[privacy]

    def huge(r):       # (a site that failed to train has nothing to inflate)
        return r if isinstance(r, str) else _map(r, lambda d: {k: v + 1e29 for k, v in d.items()})

    logs = []
    bound = 0.5
    job_b = prepare_job(job.cfg.replace(update_norm_bound=bound), log=_quiet)
    seen = []

    def watch(info):
        seen.append(info)
    res = run_method(job_b, "deer", log=logs.append, clients=OneMalicious(job_b, huge), on_aggregate=watch)
    assert any(re.search(rf"client {BAD}: update norm [\d.]+e\+\d\d scaled to update_norm_bound=0.5", m) for m in logs), logs
    for info in seen:                     # the bad site's update, as aggregated, has norm <= the bound
        ids = info["ids"]
        assert BAD in ids
        upd = info["clients"][ids.index(BAD)]
        norm = sum(float((upd[k].double() - info["before"][k].double()).pow(2).sum()) for k in upd
                   if not torch.equal(upd[k], info["before"][k])) ** 0.5
        assert norm <= bound * (1 + 1e-5), norm
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in res["adapters"].values())
    unbounded = run_method(job, "deer", log=_quiet, clients=OneMalicious(job, huge))
    assert max(float(t.abs().max()) for t in unbounded["adapters"].values()) > 1e25


def test_update_norm_bound_is_refused_at_client_level():
    with pytest.raises(ValueError, match="update_norm_bound=1.0 applies at privacy 'none' or 'sample'"):
        tiny_cfg(1, privacy="client", noise_multiplier=1.0, update_norm_bound=1.0)


@pytest.mark.parametrize("method", ["ffa", "fedavg", "deer_no_nr"])
def test_fake_noise_multiplier_is_caught_for_isotropic_methods(jobs, method):
    """Euclidean clipping + isotropic noise charges sigma itself, so a report of another sigma is
    inconsistent and must be left out, as for DEeR's regulated pair."""
    job = jobs["sample"]
    attack, field = SAMPLE_ATTACKS["report bigger sigma"]
    logs = []
    res = run_method(job, method, log=logs.append, clients=OneMalicious(job, attack))
    assert re.search(rf"client {BAD} left out: .*{field}", "\n".join(logs))
    honest = run_method(job, method, log=_quiet, clients=OneMalicious(job, lambda r: "gone"))
    assert res["releases"] == honest["releases"] and res["epsilon"] == honest["epsilon"]
