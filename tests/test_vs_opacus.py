"""deer against Opacus on the same LoRA model.

1. Noise off, same batches: deer's clipped and summed gradients (from the custom autograd capture and
   deer's kernels) equal Opacus' (GradSampleModule in hooks mode on the same LoRA model written with
   nn.Linear modules for A and B, DPOptimizer with flat clipping) to fp32 tolerance.
2. Noise on: the epsilon deer reports equals the epsilon of Opacus' accountants for the same history.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deer.nn import LoRALinear, lora_layers
from deer.privacy import PrivacyEngine


class DeerNet(nn.Module):
    def __init__(self, n=10, h=12, m=5, r=3):
        super().__init__()
        self.l1 = LoRALinear(nn.Linear(n, h), r=r, alpha=6.0)
        self.l2 = LoRALinear(nn.Linear(h, m), r=2, alpha=2.0)

    def forward(self, x):
        return self.l2(F.gelu(self.l1(x))).mean(1)


class OpacusLoRALinear(nn.Module):
    """The same LoRA layer as plain modules: y = base(x) + s * B(A(x)), A, B nn.Linear without bias."""

    def __init__(self, d: LoRALinear):
        super().__init__()
        self.base = copy.deepcopy(d.base)
        self.A = nn.Linear(d.in_features, d.r, bias=False)
        self.B = nn.Linear(d.r, d.out_features, bias=False)
        with torch.no_grad():
            self.A.weight.copy_(d.lora_A)
            self.B.weight.copy_(d.lora_B)
        self.scale = d.scale

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(x))


class OpacusNet(nn.Module):
    def __init__(self, d: DeerNet):
        super().__init__()
        self.l1 = OpacusLoRALinear(d.l1)
        self.l2 = OpacusLoRALinear(d.l2)

    def forward(self, x):
        return self.l2(F.gelu(self.l1(x))).mean(1)


@pytest.mark.parametrize("phase", ["AB", "B", "A"])
@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_clipped_sums_equal_opacus(gen, phase):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(gen.initial_seed())
    deer_net = DeerNet()
    with torch.no_grad():
        for u in lora_layers(deer_net):
            u.lora_B.normal_(0, 0.5)   # non-zero B: the A-phase gradients are not all zero
    op_net = OpacusNet(deer_net)
    for p in op_net.parameters():
        p.requires_grad_(False)
    for lyr in (op_net.l1, op_net.l2):
        lyr.A.weight.requires_grad_(phase in ("A", "AB"))
        lyr.B.weight.requires_grad_(phase in ("B", "AB"))

    b, T = 17, 6
    batches = [(torch.randn(b, T, 10, generator=gen) * (1 + 3 * torch.rand(b, 1, 1, generator=gen)),
                torch.randint(0, 5, (b,), generator=gen)) for _ in range(2)]
    # a bound at the median per-sample norm of the first batch: clipping is active on some samples only
    probe = copy.deepcopy(deer_net)
    with pytest.warns(UserWarning):
        _, popt, _ = PrivacyEngine().make_private(module=probe, optimizer=torch.optim.SGD(probe.parameters(), lr=0),
                                                  sample_rate=0.1, expected_batch_size=b, noise_multiplier=0.0,
                                                  max_grad_norm=1e9, phase=phase)
    F.cross_entropy(probe(batches[0][0]), batches[0][1]).backward()
    popt.pre_step()
    C = float(popt.last_step["per_sample_norms"].median())

    gsm = GradSampleModule(op_net, loss_reduction="mean")   # the hooks implementation
    op_opt = DPOptimizer(torch.optim.SGD([p for p in gsm.parameters() if p.requires_grad], lr=0.5),
                         noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=b, loss_reduction="mean")
    opt = torch.optim.SGD(deer_net.parameters(), lr=0.5)
    eng = PrivacyEngine()
    with pytest.warns(UserWarning, match="NOT differentially private"):
        _, dp_opt, _ = eng.make_private(module=deer_net, optimizer=opt, sample_rate=0.1, expected_batch_size=b,
                                        noise_multiplier=0.0, max_grad_norm=C, phase=phase, seed=0)

    fractions = []
    for x, y in batches:   # two steps: the second one starts from parameters both updated identically
        op_opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        op_opt.pre_step()   # clip, sum, (no) noise, scale: p.grad is what the optimizer applies
        dp_opt.zero_grad()
        F.cross_entropy(deer_net(x), y).backward()
        dp_opt.pre_step()
        for d, o in ((deer_net.l1, op_net.l1), (deer_net.l2, op_net.l2)):
            for f, ow in (("A", o.A.weight), ("B", o.B.weight)):
                dp = d.factor(f)
                if f in phase:
                    torch.testing.assert_close(dp.grad, ow.grad, rtol=2e-4, atol=1e-7,
                                               msg=f"{phase} {f} seed {gen.initial_seed()}")
                else:
                    assert dp.grad is None and ow.grad is None
        fractions.append(dp_opt.last_step["clipped_fraction"])
        op_opt.original_optimizer.step()
        dp_opt.original_optimizer.step()
    assert 0 < fractions[0] < 1      # clipping was active, and not on every sample
    assert eng.get_epsilon(1e-5) == math.inf


def test_epsilon_equals_opacus_rdp(gen):
    """A deer run in paper mode charges a different multiplier per phase; the same history composed
    by Opacus' RDP accountant gives the same epsilon (on deer's order grid; close to Opacus' default
    grid)."""
    from opacus.accountants import RDPAccountant
    from deer.privacy.accountant import RDP_ORDERS

    torch.manual_seed(gen.initial_seed())
    net = DeerNet()
    with torch.no_grad():
        for u in lora_layers(net):
            u.lora_A.mul_(3.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    eng = PrivacyEngine(accountant="rdp")
    _, opt, _ = eng.make_private(module=net, optimizer=opt, sample_rate=0.02, expected_batch_size=8,
                                 noise_multiplier=1.1, max_grad_norm=1.0, noise="regulated", regulator="paper",
                                 phase="B", seed=1)
    for phase in ("B", "A"):
        eng.set_phase(phase)
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 3, 10, generator=gen)), torch.randint(0, 5, (8,), generator=gen)).backward()
        opt.step()
    hist = [tuple(h) for h in eng.accountant.history]
    assert len(hist) == 2                                        # the true multiplier moved with the phase
    assert hist[0][0] < 1.1 < hist[1][0]   # frozen A large: weaker than nominal; frozen B small: stronger
    ref = RDPAccountant()
    ref.history = list(hist)
    delta = 1e-5
    assert eng.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta, alphas=list(RDP_ORDERS)), rel=1e-9)
    # Opacus' default grid is finer at small orders, deer's reaches larger ones: within 2% either way
    assert eng.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=2e-2)


def test_epsilon_equals_opacus_prv():
    from opacus.accountants import PRVAccountant

    hist = [(1.3, 0.01, 40), (0.9, 0.01, 5), (1.3, 0.02, 10)]
    eng = PrivacyEngine(accountant="prv")
    for s, q, n in hist:
        eng.accountant.step(noise_multiplier=s, sample_rate=q, num_steps=n)
    ref = PRVAccountant()
    ref.history = list(hist)
    assert eng.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-6)
