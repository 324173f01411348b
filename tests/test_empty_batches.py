"""Empty Poisson batches (what Opacus' DPDataLoader yields at low sample rates): a batch of 0 samples
through forward, backward and optimizer.step() is a charged step whose update is the noise alone."""
import copy
import math
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import deer.ops
from deer import reference as ref
from deer.nn import LoRALinear, lora_layers
from deer.privacy import PrivacyEngine

N_IN, SIGMA, C, B_EXP, Q, LR = 23, 1.7, 0.9, 3.5, 0.05, 0.3


class MLP(nn.Module):
    def __init__(self, gen, n=N_IN, h=31, m=13):
        super().__init__()
        self.l1, self.l2 = LoRALinear(nn.Linear(n, h), r=5, alpha=7.0), LoRALinear(nn.Linear(h, m), r=3, alpha=3.0)
        with torch.no_grad():
            for u in lora_layers(self):
                u.lora_A.copy_(torch.randn(u.lora_A.shape, generator=gen))
                u.lora_B.copy_(0.5 * torch.randn(u.lora_B.shape, generator=gen))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _private(model, backend, phase, mech, red, seed):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    eng = PrivacyEngine()
    _, opt, _ = eng.make_private(module=model, optimizer=opt, sample_rate=Q, expected_batch_size=B_EXP,
                                 noise_multiplier=SIGMA, max_grad_norm=C, mechanism=mech, phase=phase,
                                 backend=backend, loss_reduction=red, seed=seed)
    return eng, opt


def _step(model, opt, x, zero_out=False, red="mean"):
    opt.zero_grad()
    out = model(x)
    loss = out.mean() if red == "mean" else out.sum()
    (0.0 * loss if zero_out else loss).backward()
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("mech", ["isotropic", "regulated_metric"])
@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("backend", deer.ops.available_backends("cpu"))
def test_empty_batch_step_is_charged_noise(gen, one_thread, backend, phase, mech, red):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model = MLP(gen)
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng, opt = _private(model, backend, phase, mech, red, seed)
    grads = _step(model, opt, torch.zeros(0, N_IN), red=red)         # the empty batch: must not raise
    assert eng.accountant.history == [(SIGMA, Q, 1)] and opt.steps_taken == 1
    assert opt.last_step["batch_size"] == 0 and eng.get_epsilon(1e-5) > 0
    trained = {n for n in before if n.endswith(f"lora_{phase}")}
    assert set(grads) == trained
    for n, p in model.named_parameters():
        if n in trained:                                              # the update is -lr * (the noise)
            torch.testing.assert_close(p.detach(), before[n] - LR * grads[n], rtol=1e-6, atol=1e-7)
        else:                                                         # frozen factor and base untouched
            assert torch.equal(p.detach(), before[n]), n
    # Independent: the same seed and step on a nonempty batch whose per-sample gradients are all zero.
    _, opt2 = _private(twin, backend, phase, mech, red, seed)
    b = int(torch.randint(1, 12, (1,), generator=gen))
    want = _step(twin, opt2, torch.randn(b, N_IN, generator=gen), zero_out=True, red=red)
    assert opt2.last_step["batch_size"] == b
    for n in trained:
        assert torch.equal(grads[n], want[n]), f"{n} seed {gen.initial_seed()}"   # 0 + noise: exact
    # The noise has std sigma * C / b_exp (whitened by the frozen factor for regulated noise).
    z = []
    for u, name in zip(lora_layers(model), ("l1", "l2")):
        g = grads[f"{name}.lora_{phase}"].double()
        if mech == "regulated_metric":
            K = ref.metric_gram(u.lora_A.detach().double(), u.lora_B.detach().double(), phase, eng.mechanism.lam)
            g = ref.whiten(g, ref.cholesky_upper(K), phase)
        z.append(g.flatten())
    z = torch.cat(z)
    assert z.abs().min() > 0
    ratio = float(z.std()) / (SIGMA * C / B_EXP)
    assert abs(ratio - 1) < 6 / math.sqrt(2 * z.numel()), (ratio, z.numel(), gen.initial_seed())


def _poisson(gen, n_data, batch_size, seed):
    x = torch.randn(n_data, N_IN, generator=gen)
    y = torch.randint(0, 13, (n_data,), generator=gen)
    model = MLP(gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    eng = PrivacyEngine()
    model, opt, loader = eng.make_private(module=model, optimizer=opt,
                                          data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
                                          noise_multiplier=1.0, max_grad_norm=C, phase="B", seed=seed,
                                          mechanism="regulated_metric")
    return model, opt, eng, loader


def test_first_batch_empty_trains_to_the_end(gen, one_thread):
    for seed in range(500):                                          # q = 1/8, P(empty) = (7/8)^23 ~ 5%
        *_, loader = _poisson(gen, 23, 3, seed)
        if len(next(iter(loader))[0]) == 0:
            break
    else:
        pytest.fail("no seed in 0..499 gives an empty first batch")
    model, opt, eng, loader = _poisson(gen, 23, 3, seed)
    sizes = []
    for epoch in range(2):
        eng.set_phase("B" if epoch == 0 else "A")
        for x, y in loader:
            sizes.append(len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert opt.last_step["batch_size"] == len(x)
    assert sizes[0] == 0, (seed, sizes)
    assert opt.steps_taken == len(sizes) == 16 and sum(k for *_, k in eng.accountant.history) == 16
    assert eng.get_epsilon(1e-5) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_loop_with_empty_batches(gen, one_thread, capsys):
    timm = pytest.importorskip("timm")
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    torch.manual_seed(gen.initial_seed())
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2)
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    # q = 1/30, expected batch 1: P(empty) = (29/30)^30 ~ 0.36, P(no empty batch in 60) ~ 2e-12
    x, y = torch.randn(30, 3, 16, 16, generator=gen), torch.randint(0, 10, (30,), generator=gen)
    ns = {"model": model, "train_loader": DataLoader(TensorDataset(x, y), batch_size=1), "EPOCHS": 2}
    exec(compile(code, "README.md", "exec"), ns)
    opt, engine = ns["optimizer"], ns["engine"]
    assert 0 in sizes, sizes
    assert opt.steps_taken == len(sizes) == 60 and sum(k for *_, k in engine.accountant.history) == 60
    eps = engine.get_epsilon(1e-5)
    assert 0 < eps <= 8.0 + 1e-6 and f"epsilon spent: {eps:.2f}" in capsys.readouterr().out
