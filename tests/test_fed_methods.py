"""Every method's schedule and what it may change; the joint regulated step of the no-DE ablation."""
import pytest
import torch
import torch.nn.functional as F

from deer.fed import prepare_job, run_method
from deer.fed.client import LocalTrainConfig, NoiseKey, private_step
from deer.privacy.release import FrozenMetric
from deer.fed.config import method_spec
from deer.nn import lora_key, lora_layers, set_phase

from test_fed_engine import tiny_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULE = {"deer": ["B", "A"], "deer_no_nr": ["B", "A"], "deer_no_de": ["AB"], "ffa": ["B"], "fedavg": ["AB"]}


@pytest.mark.parametrize("privacy,methods", [("client", list(SCHEDULE)), ("sample", ["deer", "deer_no_de"])])
def test_methods_schedule_frozen_factors_and_budget(gen, privacy, methods):
    seed = gen.initial_seed() % 100000
    # client level samples 2 of 4 clients per round (q = 1/2); sample level takes every client each round
    # so that the worst client spends exactly the calibrated budget
    cfg = tiny_cfg(seed, rounds=2, privacy=privacy, target_epsilon=4.0, num_clients=4,
                   clients_per_round=2 if privacy == "client" else 4, local_steps=2)
    job = prepare_job(cfg, log=lambda *a: None)
    for method in methods:
        sched = SCHEDULE[method]
        seen = []

        def check(info, seen=seen):
            seen.append(info["phase"])
            assert set(info["after"]) == set(info["before"]) == set(job.init_adapters)
            for k, t in info["after"].items():
                changed = not torch.equal(t, info["before"][k])
                assert changed == (lora_key(k)[1] in info["phase"]), (method, info["phase"], k, seed)

        res = run_method(job, method, log=lambda *a: None, on_aggregate=check)
        assert seen == sched * cfg.rounds, (method, seen)
        assert 3.0 < res["epsilon"] <= 4.0, (method, res["epsilon"], seed)
        if method == "ffa":  # A stays at its random initialisation for the whole run
            a_keys = [k for k in job.init_adapters if lora_key(k)[1] == "A"]
            assert a_keys and set(res["adapters"]) == set(job.init_adapters)
            for k in a_keys:
                assert torch.equal(res["adapters"][k], job.init_adapters[k])


def test_joint_regulated_step_without_clipping_or_noise_is_the_gradient(gen):
    """With C huge and sigma = 0 the DP step must return the plain mean gradient of both factors."""
    seed = gen.initial_seed() % 100000
    cfg = tiny_cfg(seed)
    job = prepare_job(cfg, log=lambda *a: None)
    model = job.model
    with torch.no_grad():  # non-zero B so that both factors get gradients
        for l in lora_layers(model):
            l.lora_B.normal_(generator=gen)
    set_phase(model, "AB")
    layers = lora_layers(model)
    x, y = job.data.clients[0].x[:9], job.data.clients[0].y[:9]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    params = [p for l in layers for p in (l.lora_A, l.lora_B)]
    expected = torch.autograd.grad(loss, params)
    for l in layers:
        l.capture = True
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for l in layers:
        l.capture = False
    captured = [l.pop_captured()[0] for l in layers]
    for backend in (None, "reference"):   # deer's kernels, and the float64 oracle
        tcfg = LocalTrainConfig(1, 9, 0.1, "sample", noise_multiplier=0.0, max_grad_norm=1e12, lam=0.1,
                                backend=backend)
        mech = method_spec("deer_no_de").mechanism.replace(lam=0.1)
        metric = FrozenMetric([(l.name, l) for l in layers], "AB", mech.validate("AB", frozen_at_start=True))
        grads, sigma = private_step(layers, "AB", mech, tcfg, 9.0, metric, NoiseKey(seed, 0), captured=captured)
        got = [g for d in grads for g in (d["A"], d["B"])]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g.float(), e / 9.0, rtol=1e-4, atol=1e-6)
