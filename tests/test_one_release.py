"""The drop-in engine's step and the federated client's step are one private release: the same
captured batch, the same noise key and the same mechanism give bit-identical private gradients and
the same charged multiplier, for every mechanism, in both DEeR phases, on the kernels and on the
float64 reference."""
import copy

import pytest
import torch
import torch.nn.functional as F

from deer.fed import prepare_job
from deer.fed.client import LocalTrainConfig, NoiseKey, private_step
from deer.nn import lora_units, set_lora_state
from deer.ops import resolve_backend
from deer.privacy import PRESETS, Mechanism, PrivacyEngine
from deer.privacy.release import FrozenMetric

from test_fed_engine import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

MECHANISMS = {**PRESETS, "regulated_metric/per_layer": PRESETS["regulated_metric"].replace(clipping="per_layer"),
              "isotropic/lam=0.3": PRESETS["isotropic"].replace(lam=0.3)}
SIGMA, C, Q, EXPECTED, SEED, CLIENT = 0.8, 0.4, 0.25, 9.5, 20261202, 3


@pytest.fixture(scope="module")
def job():
    return prepare_job(tiny_cfg(77, num_clients=2, clients_per_round=2), log=lambda *a: None)


def _backends():
    kernels = resolve_backend(torch.device("cpu"), None, op="clip_reduce_noise")
    return ["reference"] + ([kernels] if kernels != "reference" else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("phase", ["B", "A"])
@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_engine_step_and_client_step_release_the_same_bits(job, gen, name, phase, backend):
    mech: Mechanism = MECHANISMS[name]
    model = copy.deepcopy(job.model)
    start = {k: t.clone() if k.endswith(".lora_A") else 0.3 * torch.randn(t.shape, generator=gen)
             for k, t in job.init_adapters.items()}
    set_lora_state(model, start, strict=True)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    engine = PrivacyEngine()
    _, opt, _ = engine.make_private(model, torch.optim.SGD(params, lr=0.1), mechanism=mech, phase=phase,
                                    noise_multiplier=SIGMA, max_grad_norm=C, sample_rate=Q,
                                    expected_batch_size=EXPECTED, seed=SEED, client=CLIENT, backend=backend,
                                    loss_reduction="sum")
    units = lora_units(model)
    # the client's sub-round metric, from the same (start-of-phase) adapters
    metric = FrozenMetric(units, phase, mech)

    x, y = job.data.clients[0].x[:11], job.data.clients[0].y[:11]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    captured = [u._captured[0] for _, u in units]
    assert all(len(u._captured) == 1 for _, u in units)

    cfg = LocalTrainConfig(1, 8, 0.1, "sample", noise_multiplier=SIGMA, max_grad_norm=C, lam=mech.lam,
                           backend=backend)
    client_out, client_eff = private_step([u for _, u in units], phase, mech, cfg, EXPECTED, metric,
                                          NoiseKey(SEED, 0, CLIENT), captured=captured)
    opt.pre_step()   # pops the same captured chunks from the layers

    assert opt.last_step["batch_size"] == 11
    assert opt.last_step["noise_multiplier_effective"] == client_eff
    assert engine.accountant.history[-1][0] == client_eff
    if (mech.metric, mech.noise) != ("euclidean", "regulated"):
        assert client_eff == SIGMA
    else:   # regulated_paper is charged sigma / max sqrt(sigma_max(frozen)^2 + lam) over the layers
        frozen = [start[f"{n}.lora_{'A' if phase == 'B' else 'B'}"].double() for n, _ in units]
        smax = max(float(torch.linalg.svdvals(f).max()) ** 2 + mech.lam for f in frozen) ** 0.5
        assert client_eff == pytest.approx(SIGMA / smax, rel=1e-9) and client_eff != SIGMA
    for (uname, u), out in zip(units, client_out):
        assert set(out) == {phase}
        p = u.factor(phase)
        assert p.grad is not None, uname
        assert p.grad.abs().sum() > 0, uname
        # the engine writes the release in the parameter's dtype (the reference releases in float64)
        assert torch.equal(p.grad, out[phase].to(p.dtype)), f"{name} {phase} {backend}: {uname} differs"
        assert u.factor("A" if phase == "B" else "B").grad is None
