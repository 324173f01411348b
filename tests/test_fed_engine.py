"""In-process federated engine: deviation (acceptance 1), faults and resume (acceptance 3)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from deer.fed import FedConfig, prepare_job, run_method
from deer.fed.accounting import ReleaseJournal, epsilon
from deer.nn import get_lora_state, lora_key, lora_units


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(seed, **kw):
    base = dict(rounds=2, dataset="digits", image_size=8, num_clients=3, clients_per_round=3, partition="iid",
                public_fraction=0.2, public_classes=None, pretrain_epochs=1, local_steps=3, batch_size=16,
                lr=0.1, lora_r=2, lora_alpha=4.0, seed=seed, progress=False, privacy="none",
                model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                              "mlp_ratio": 2.0})
    base.update(kw)
    return FedConfig(**base).validate()


def _products(state):
    units = {lora_key(k)[0] for k in state}
    assert set(state) == {f"{u}.lora_{f}" for u in units for f in "AB"}
    return {u: state[f"{u}.lora_B"].double() @ state[f"{u}.lora_A"].double() for u in units}


def _deviation(info):
    """max over layers of ||B_agg A_agg - sum_k w_k B_k A_k|| / ||sum_k w_k B_k A_k||."""
    w = torch.tensor(info["weights"], dtype=torch.float64)
    w = w / w.sum()
    agg = _products(info["after"])
    per_client = [_products(c) for c in info["clients"]]
    worst = 0.0
    for n in agg:
        target = sum(wk * pc[n] for wk, pc in zip(w, per_client))
        worst = max(worst, float((agg[n] - target).norm() / target.norm().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_deviation_deer_exact_fedavg_not(gen, privacy):
    seed = gen.initial_seed() % 100000
    # a larger step makes the clients' factors drift apart, which is what FedAvg-LoRA's error is made of
    cfg = tiny_cfg(seed, privacy=privacy, noise_multiplier=0.7 if privacy == "sample" else None, lr=0.3,
                   local_steps=4)
    job = prepare_job(cfg, log=lambda *a: None)
    devs = {"deer": [], "fedavg": []}
    for m in devs:
        run_method(job, m, log=lambda *a: None, on_aggregate=lambda info, m=m: devs[m].append((info["phase"], _deviation(info))))
    assert [p for p, _ in devs["deer"]] == ["B", "A"] * cfg.rounds
    assert len(devs["fedavg"]) == cfg.rounds
    # DEeR: exact up to fp32 rounding of the stored factors, in every sub-round
    assert max(d for _, d in devs["deer"]) < 1e-5, (seed, devs["deer"])
    # FedAvg-LoRA: mean(B_k) mean(A_k) misses mean(B_k A_k) (by -cov_k(B_k, A_k)), far beyond fp32
    # rounding, every round
    assert min(d for _, d in devs["fedavg"]) > 1e-4, (seed, devs["fedavg"])
    assert min(d for _, d in devs["fedavg"]) > 100 * max(d for _, d in devs["deer"]), (seed, devs)


def test_faults_raise_nan_timeout_and_min_clients(gen):
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=2, privacy="client", noise_multiplier=1.0, client_timeout_s=1.0, min_clients=2,
                   num_clients=4, clients_per_round=4)
    job = prepare_job(cfg, log=lambda *a: None)

    def hook(cid, rnd, phase, step, model):
        if rnd == 0 and phase == "B" and cid == 1 and step == 1:
            raise RuntimeError("disk on fire")
        if rnd == 0 and phase == "A" and cid == 2 and step == 2:
            with torch.no_grad():
                next(m for m in model.modules() if hasattr(m, "lora_A")).lora_A[0, 0] = float("nan")
        if rnd == 1 and phase == "B" and cid == 3 and step == 0:
            time.sleep(1.2)
        if rnd == 1 and phase == "A" and cid != 0 and step == 0:
            raise ValueError("network down")     # 3 of 4 fail: only 1 valid < min_clients=2

    logs, aggs = [], []
    res = run_method(job, "deer", log=logs.append, client_hook=hook, on_aggregate=aggs.append)
    text = "\n".join(logs)
    assert "client 1 left out: RuntimeError: disk on fire" in text
    assert "client 2 left out: factors: " in text and "has NaN/Inf entries" in text
    assert "client 3 left out: ClientTimeout" in text
    # q = 1: the rule counts the updates received (crashes and timeouts, not the data, decide it)
    assert "round 2 A: skipped, 1 client updates received < min_clients=2" in text
    assert [(a["round"], a["phase"], a["ids"]) for a in aggs] == [
        (0, "B", [0, 2, 3]), (0, "A", [0, 1, 3]), (1, "B", [0, 1, 2])]
    assert res["skipped"] == [{"round": 1, "phase": "A", "valid": 1, "sampled": 4}]
    # the skipped sub-round released nothing: 3 server releases, and epsilon is theirs exactly
    assert res["releases"] == 3
    assert res["epsilon"] == pytest.approx(epsilon([(1.0, 1.0, 3)], cfg.delta), rel=1e-9)
    # the run finished: both rounds evaluated, all numbers finite
    assert set(res["adapters"]) == set(job.init_adapters)
    assert len(res["history"]) == 2 and all(torch.isfinite(t).all() for t in res["adapters"].values())


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    from deer.fed import FedConfig, prepare_job, run_method
    cfg = FedConfig(**json.loads(sys.argv[1])).validate()
    run_dir = sys.argv[2]
    job = prepare_job(cfg, log=lambda *a: None, backbone_path=os.path.join(run_dir, "backbone.safetensors"))
    def hook(cid, rnd, phase, step, model):
        if rnd == 1 and phase == "A" and cid == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)      # killed mid-round, after round 2's B release
    run_method(job, "deer", os.path.join(run_dir, "deer"), log=print, client_hook=hook)
""")


def test_kill_mid_round_and_resume(tmp_path, gen):
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=3, privacy="client", noise_multiplier=1.3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    journal = ReleaseJournal(str(tmp_path / "deer" / "releases.jsonl"))
    assert [(e["round"], e["phase"]) for e in journal.entries] == [(0, "B"), (0, "A"), (1, "B")]

    job = prepare_job(cfg, log=lambda *a: None, backbone_path=str(tmp_path / "backbone.safetensors"))
    logs = []
    res = run_method(job, "deer", str(tmp_path / "deer"), log=logs.append)
    assert any("resuming after round 1" in l for l in logs), logs
    # every release counts: 3 rounds x 2 sub-rounds + round 2's B released before the kill
    assert res["releases"] == 7
    assert res["epsilon"] == pytest.approx(epsilon([(1.3, 1.0, 7)], cfg.delta), rel=1e-9)
    assert res["epsilon"] > epsilon([(1.3, 1.0, 6)], cfg.delta)
    assert [h["round"] for h in res["history"]] == [1, 2, 3]
    # keyed random streams: the resumed run ends where an uninterrupted one does
    ref = run_method(job, "deer", None, log=lambda *a: None)
    assert set(res["adapters"]) == set(ref["adapters"]) == set(job.init_adapters)
    for k, t in ref["adapters"].items():
        torch.testing.assert_close(res["adapters"][k], t, rtol=1e-5, atol=1e-6)
    assert ref["epsilon"] < res["epsilon"]
    # run directory contents
    assert {"adapter.safetensors", "metrics.json", "releases.jsonl", "state.json"} <= set(os.listdir(tmp_path / "deer"))


def test_client_sampling_poisson_at_client_level(gen):
    """Client level: every client independently with q = clients_per_round / num_clients, a fresh draw per
    sub-round (the realised count varies and can be 0). Otherwise: exactly clients_per_round per round."""
    import numpy as np
    from deer.fed.engine import sample_clients
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, privacy="client", noise_multiplier=1.0, num_clients=10, clients_per_round=3)
    draws = {(r, s): sample_clients(cfg, r, s) for r in range(300) for s in range(2)}
    assert draws == {(r, s): sample_clients(cfg, r, s) for r in range(300) for s in range(2)}   # keyed
    inc = np.zeros(10)
    for d in draws.values():
        assert d == sorted(set(d)) and all(0 <= c < 10 for c in d)
        inc[d] += 1
    n = len(draws)
    se = (0.3 * 0.7 / n) ** 0.5
    assert (abs(inc / n - 0.3) < 5 * se).all(), inc / n                       # each client at rate q
    sizes = [len(d) for d in draws.values()]
    assert abs(np.mean(sizes) - 3) < 5 * (10 * 0.3 * 0.7 / n) ** 0.5 and 0 in sizes and max(sizes) > 3
    assert any(draws[(r, 0)] != draws[(r, 1)] for r in range(300))           # redrawn every sub-round
    # inclusions are independent across clients: the pair frequency is q^2
    both = sum(1 for d in draws.values() if 0 in d and 1 in d) / n
    assert abs(both - 0.09) < 5 * (0.09 * 0.91 / n) ** 0.5
    fixed = cfg.replace(privacy="sample")
    for r in range(20):
        assert len(sample_clients(fixed, r, 0)) == 3 and sample_clients(fixed, r, 0) == sample_clients(fixed, r, 1)


def test_client_level_divides_by_expected_count(gen):
    """sigma = 0, no clipping: each sub-round's aggregate is global + (sum of the valid clients' updates) / (q N),
    whatever the realised number of clients (including 0), and every sub-round is one release at rate q."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=3, privacy="client", noise_multiplier=0.0, max_grad_norm=1e9, num_clients=4,
                   clients_per_round=2)
    job = prepare_job(cfg, log=lambda *a: None)
    infos = []
    run_method(job, "deer", log=lambda *a: None, on_aggregate=infos.append)
    assert [i["phase"] for i in infos] == ["B", "A"] * 3
    for info in infos:
        assert info["ids"] == info["sampled"]
        trained = [k for k in info["after"] if lora_key(k)[1] == info["phase"]]
        assert len(trained) == len(info["after"]) // 2
        for k in trained:
            delta = sum((c[k].double() - info["before"][k].double() for c in info["clients"]),
                        torch.zeros_like(info["after"][k], dtype=torch.float64))
            torch.testing.assert_close(info["after"][k].double(), info["before"][k].double() + delta / 2.0,
                                       rtol=1e-5, atol=1e-6)


def test_client_level_poisson_never_skips_after_the_draw(gen):
    """q < 1: a sub-round whose sampled clients all fail still releases (noise alone) and is charged; the
    min_clients rule does not look at the realised sample (that would void the amplification)."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=2, privacy="client", noise_multiplier=1.0, num_clients=4, clients_per_round=2,
                   min_clients=2)
    job = prepare_job(cfg, log=lambda *a: None)

    def hook(cid, rnd, phase, step, model):
        if rnd == 1 and phase == "B":
            raise RuntimeError("everyone is offline")

    logs, infos = [], []
    res = run_method(job, "deer", log=logs.append, client_hook=hook, on_aggregate=infos.append)
    assert res["skipped"] == [] and not any("skipped" in l for l in logs)
    assert [(i["round"], i["phase"]) for i in infos] == [(0, "B"), (0, "A"), (1, "B"), (1, "A")]
    empty = infos[2]
    assert empty["ids"] == [] and all(f"client {c} left out" in "\n".join(logs) for c in empty["sampled"])
    # noise alone moved the trained factor; the frozen one did not move
    assert set(empty["after"]) == set(empty["before"]) == set(job.init_adapters)
    for k, t in empty["after"].items():
        assert torch.equal(t, empty["before"][k]) == (lora_key(k)[1] == "A")
    assert res["releases"] == 4
    assert res["epsilon"] == pytest.approx(epsilon([(1.0, 0.5, 4)], cfg.delta), rel=1e-9)


def test_warning_when_client_level_noise_drowns_every_update():
    """The aggregate's noise norm (about sigma C sqrt(d) / clients_per_round) above C, the largest norm a
    mean of clipped updates can have: said at the start, with the participants needed; not said when
    the noise is small."""
    for sigma, warned in ((1.0, True), (0.05, False)):
        cfg = tiny_cfg(5, rounds=1, privacy="client", noise_multiplier=sigma, min_clients=1)
        logs = []
        job = prepare_job(cfg, log=lambda *a: None)
        run_method(job, "ffa", log=logs.append)
        hit = [m for m in logs if "unlikely to learn" in m]
        assert bool(hit) == warned, logs
        if warned:
            d = sum(t.numel() for k, t in job.init_adapters.items() if k.endswith(".lora_B"))
            assert f"d = {d} trained entries" in hit[0] and f"about {sigma * d ** 0.5:.0f} expected participants" in hit[0]


def test_warning_when_a_class_has_no_client_records(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(90, 8, 8), dtype=np.uint8)
    y = np.arange(90) % 2                                         # classes 0 and 1 in train
    xt, yt = x[:12], np.array([0, 1, 2] * 4)                      # class 2 only in test
    np.savez(tmp_path / "d.npz", train_images=x, train_labels=y, test_images=xt, test_labels=yt)
    logs = []
    prepare_job(tiny_cfg(3, dataset=str(tmp_path / "d.npz"), num_clients=2, clients_per_round=2, public_fraction=0.0,
                         pretrain_epochs=0), log=logs.append)
    assert any("class(es) ['2'] have no training records on any client" in m for m in logs), logs


@pytest.mark.parametrize("privacy", ["none", "sample", "client"])
def test_fedsa_shares_a_and_keeps_each_clients_b(gen, privacy):
    """FedSA-LoRA: clients train A and B, only A is sent and aggregated (the server's B stays at its
    initial value), and every client starts each round from its own B of the round before."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, privacy=privacy, noise_multiplier=0.8 if privacy != "none" else None, lr=0.3, rounds=3)
    job = prepare_job(cfg, log=lambda *a: None)
    infos, starts = [], {}

    def hook(cid, rnd, phase, step, model):
        if step == 0:
            starts[(cid, rnd)] = {k: t.detach().clone() for k, t in get_lora_state(model).items()}

    res = run_method(job, "fedsa", log=lambda *a: None, on_aggregate=infos.append, client_hook=hook)
    assert [i["phase"] for i in infos] == ["AB"] * cfg.rounds
    b_keys = [k for k in job.init_adapters if lora_key(k)[1] == "B"]
    a_keys = [k for k in job.init_adapters if lora_key(k)[1] == "A"]
    for k in b_keys:   # B never aggregated: the global one is the initial one
        assert torch.equal(res["adapters"][k], job.init_adapters[k])
    for i in infos:
        for c in i["clients"]:   # what reached the server: the global B, the client's A
            assert all(torch.equal(c[k], i["before"][k]) for k in b_keys)
        if privacy == "none":    # the server averages A only
            w = torch.tensor(i["weights"], dtype=torch.float64) / sum(i["weights"])
            for k in a_keys:
                mean = sum(wk * c[k].double() for wk, c in zip(w, i["clients"]))
                torch.testing.assert_close(i["after"][k].double(), mean, rtol=1e-6, atol=1e-7)
    # round r+1 starts from the global A and the client's own B, which moved away from the initial one
    for cid in range(cfg.num_clients):
        for rnd in range(1, cfg.rounds):
            s = starts[(cid, rnd)]
            assert all(torch.equal(s[k], infos[rnd - 1]["after"][k]) for k in a_keys)
            assert any(not torch.equal(s[k], job.init_adapters[k]) for k in b_keys)
            assert any(not torch.equal(s[k], starts[(cid, rnd - 1)][k]) for k in b_keys)
        assert any(not torch.equal(starts[(cid, 1)][k], starts[(o, 1)][k]) for k in b_keys
                   for o in range(cfg.num_clients) if o != cid)
    if privacy == "client":   # only A is clipped and noised: one release per round
        assert res["releases"] == cfg.rounds


def test_fedsa_resume_restores_each_clients_b(tmp_path, gen):
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=3, lr=0.3)
    job = prepare_job(cfg, log=lambda *a: None)
    ref = run_method(job, "fedsa", log=lambda *a: None)

    def stop(cid, rnd, phase, step, model):
        if rnd == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_method(job, "fedsa", str(tmp_path / "fedsa"), log=lambda *a: None, client_hook=stop)
    logs = []
    res = run_method(job, "fedsa", str(tmp_path / "fedsa"), log=logs.append)
    assert any("resuming after round 2" in l for l in logs), logs
    # the personalised models of the last round are scored the same only if every B was restored
    assert [h["accuracy"] for h in res["history"]] == [h["accuracy"] for h in ref["history"]]
    assert [h["f1"] for h in res["history"]] == [h["f1"] for h in ref["history"]]
    for k, t in ref["adapters"].items():
        torch.testing.assert_close(res["adapters"][k], t, rtol=0, atol=0)


def test_fedsa_refused_on_flower(tmp_path):
    from deer.fed.flower_app import init_deployment
    with pytest.raises(ValueError, match="in-process only"):
        init_deployment(str(tmp_path / "d"), tiny_cfg(0), "127.0.0.1:9093", method="fedsa", insecure=True,
                        log=lambda *a: None)


def test_validation_split_selects_the_reported_round(gen):
    """val_fraction holds out a public validation split of all classes, disjoint from the others; every
    round is scored on it and "best" is the test row of the round with the best validation accuracy."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=4, val_fraction=0.15, lr=0.3)
    job = prepare_job(cfg, log=lambda *a: None)
    d = job.data
    assert d.val is not None and len(set(d.val.y.tolist())) == d.num_classes
    parts = [d.val, d.test, d.public, *d.clients]
    assert sum(len(p) for p in parts) == 1797
    res = run_method(job, "fedavg", log=lambda *a: None)
    vals = [h["val"]["accuracy"] for h in res["history"]]
    assert res["best"] is res["history"][vals.index(max(vals))]
    assert tiny_cfg(seed).val_fraction == 0.0 and prepare_job(tiny_cfg(seed), log=lambda *a: None).data.val is None


def test_fedsa_client_whose_own_factors_diverge_keeps_its_previous_ones(gen):
    """A client whose B (never sent) turns non-finite is left out of that sub-round with the reason,
    keeps the B it had, and the run's metrics stay finite."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed, rounds=3, lr=0.3)
    job = prepare_job(cfg, log=lambda *a: None)
    starts = {}

    def hook(cid, rnd, phase, step, model):
        if step == 0:
            starts[(cid, rnd)] = {k: t.detach().clone() for k, t in get_lora_state(model).items() if k.endswith("lora_B")}
        if cid == 1 and rnd == 1 and step == 1:
            with torch.no_grad():
                next(u for _, u in lora_units(model)).lora_B.fill_(float("nan"))

    logs = []
    res = run_method(job, "fedsa", log=logs.append, client_hook=hook)
    assert any("round 2 AB: client 1 left out: its own factors" in l and "not finite" in l for l in logs), logs
    for k, t in starts[(1, 1)].items():   # round 3 starts from the B client 1 had before round 2
        assert torch.equal(starts[(1, 2)][k], t)
    assert all(torch.isfinite(torch.tensor(h["accuracy"])) for h in res["history"])
