"""Layers trained fully beside LoRA (peft's modules_to_save; deer.nn.FullLinear: B = [W | b] applied to
[x, 1] through a frozen identity A): the forward is the layer's own, per-sample gradients of weight and
bias are clipped jointly with the LoRA factors (checked against per-sample autograd through peft's own
modules_to_save copy), the adapter reloads in peft with the trained head, make_private keeps a peft
optimizer working, bad requests are refused, and the federated engine trains a full head in every
sub-round that trains B and aggregates it as it is."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deer
from deer.nn import FullLinear, NoLoRALayersError, get_lora_state, inject_lora, lora_units

from test_reused_layers import C, _assert_close, _oracle_grads

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 9)
        self.mid = nn.Linear(9, 9)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.lin(x)))))


def test_full_linear_keeps_the_forward(gen):
    base = nn.Linear(6, 3)
    x = torch.randn(4, 5, 6, generator=gen)
    want = base(x)
    u = FullLinear(copy.deepcopy(base))
    torch.testing.assert_close(u(x), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(u.weight, base.weight) and torch.equal(u.bias, base.bias)
    assert u.lora_B.shape == (3, 7) and not u.lora_A.requires_grad
    u.set_phase("A")
    assert not u.lora_B.requires_grad and u.trained == ()
    u.set_phase("B")
    assert u.lora_B.requires_grad and u.trained == ("B",)
    nb = FullLinear(nn.Linear(6, 3, bias=False))
    assert nb.lora_B.shape == (3, 6) and nb.bias is None


def _peft_net(gen, **kw):
    torch.manual_seed(int(gen.initial_seed() % 1000))
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "mid"],
                                                    modules_to_save=["head"], **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pm


@pytest.mark.parametrize("phase", ["AB", "B"])
def test_private_step_on_a_peft_model_with_a_trained_head(gen, phase):
    """make_private on a PeftModel with modules_to_save: with noise off the step's gradients of the LoRA
    factors and of the head's weight and bias equal the mean of the jointly clipped per-sample
    gradients computed by autograd through peft's own layers, one sample at a time."""
    b = 6
    x, y = torch.randn(b, 7, generator=gen), torch.randint(0, 4, (b,), generator=gen)
    pm = _peft_net(gen)
    oracle = copy.deepcopy(pm)
    trained = [n for n, p in oracle.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n in trained)
    if phase == "B":   # the LoRA A factors are frozen in the B phase; the head trains with B
        trained = [n for n in trained if "lora_A" not in n]
    params = dict(oracle.named_parameters())
    want = dict(zip(trained, _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), b,
                                           [params[n] for n in trained])))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(pm, opt, None, noise_multiplier=0.0, max_grad_norm=C, sample_rate=0.5,
                                          expected_batch_size=float(b), seed=0, loss_reduction="sum", phase=phase)
    head = model.base_model.model.head
    assert isinstance(head, FullLinear)
    assert any(p is head.lora_B for g in opt.original_optimizer.param_groups for p in g["params"])
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    assert opt.last_step["clipped_fraction"] > 0.5
    got = {}
    for n, u in lora_units(model):
        if isinstance(u, FullLinear):
            got["base_model.model.head.modules_to_save.default.weight"] = u.lora_B.grad[:, :-1]
            got["base_model.model.head.modules_to_save.default.bias"] = u.lora_B.grad[:, -1]
        else:
            for f in u.trained:
                got[f"{n}.lora_{f}.default.weight"] = u.factor(f).grad
    assert set(got) == set(want)
    _assert_close([got[n] for n in trained], [want[n] for n in trained])


def test_one_noisy_step_trains_the_head_on_the_kernels(gen):
    """With noise the head moves, its update is finite, and the accountant is charged."""
    b = 8
    x, y = torch.randn(b, 7, generator=gen), torch.randint(0, 4, (b,), generator=gen)
    model = inject_lora(Net(), ["lin", "mid"], r=2, modules_to_save=["head"])
    before = model.head.lora_B.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                                 lr=0.1), None, noise_multiplier=1.1,
                                          max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=8.0, seed=3)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    moved = model.head.lora_B.detach() - before
    assert torch.isfinite(moved).all() and float(moved.abs().max()) > 0
    assert opt.steps_taken == 1 and opt.engine.get_epsilon(1e-5) > 0


def test_saved_adapter_reloads_in_peft_with_the_trained_head(tmp_path, gen):
    base = Net().eval()
    model = inject_lora(copy.deepcopy(base), ["lin", "mid"], r=2, alpha=4, modules_to_save=["head"])
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.add_(0.5 * torch.randn(u.lora_B.shape, generator=gen))
    deer.save_adapter(model, tmp_path / "adapter")
    x = torch.randn(3, 7, generator=gen)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = model(x)
        assert float((want - base(x)).abs().max()) > 1e-2
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    again = inject_lora(copy.deepcopy(base), ["lin", "mid"], r=2, alpha=4, modules_to_save=["head"])
    deer.load_adapter(again, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
    assert "head.lora_A" not in get_lora_state(again)    # the identity is a constant, not state


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
        inject_lora(Net(), ["lin", "head"], r=2, modules_to_save=["head"])
    with pytest.raises(NoLoRALayersError, match="no module matched modules_to_save"):
        inject_lora(Net(), ["lin"], r=2, modules_to_save=["classifier"])
    seq = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="modules_to_save entry '1' is a LayerNorm"):
        inject_lora(seq, ["0"], r=2, modules_to_save=["1"])


@pytest.mark.parametrize("privacy", ["none", "client", "sample"])
def test_federated_head_trains_with_b_and_is_averaged(gen, privacy):
    from deer.fed import prepare_job, run_method
    from test_fed_engine import tiny_cfg
    cfg = tiny_cfg(int(gen.initial_seed() % 1000), privacy=privacy, lora_targets=["qkv"], modules_to_save=["head"],
                   noise_multiplier=0.8 if privacy != "none" else None, lr=0.3)
    job = prepare_job(cfg, log=lambda *a: None)
    assert isinstance(job.model.head, FullLinear) and "head.lora_B" in job.init_adapters
    infos = []
    run_method(job, "deer", log=lambda *a: None, on_aggregate=infos.append)
    assert [i["phase"] for i in infos] == ["B", "A"] * cfg.rounds
    for i in infos:
        moved = not torch.equal(i["after"]["head.lora_B"], i["before"]["head.lora_B"])
        assert moved == (i["phase"] == "B"), i["phase"]
        if privacy == "none" and i["phase"] == "B":   # aggregated as it is: the weighted mean
            w = torch.tensor(i["weights"], dtype=torch.float64) / sum(i["weights"])
            mean = sum(wk * c["head.lora_B"].double() for wk, c in zip(w, i["clients"]))
            torch.testing.assert_close(i["after"]["head.lora_B"].double(), mean, rtol=1e-6, atol=1e-7)
