"""Sample-level DP inside a client runs through deer's kernels (deer.ops.per_sample_grad_norm and
clip_reduce_noise) and equals the float64 reference path (backend='reference'): without noise to float32
rounding, with noise too (both draw the same Philox stream from the same key). The step is the
subsampled Gaussian the accountant is charged: Poisson sampling at q = b / n, division by the expected
batch size q n, noise std sigma C, one release (sigma, q) per step."""
import pytest
import torch
import torch.nn.functional as F

from deer.fed import prepare_job
from deer.fed.client import LocalTrainConfig, NoiseKey, local_train, private_step
from deer.privacy.release import FrozenMetric
from deer.fed.config import method_spec
from deer.nn import lora_units, set_lora_state, set_phase
from deer.ops import resolve_backend

from test_fed_engine import tiny_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def job():
    return prepare_job(tiny_cfg(1234, num_clients=2, clients_per_round=2), log=lambda *a: None)


def _kernel_backend():
    """The backend `backend=None` resolves to for CPU tensors; the test is about deer's kernels."""
    b = resolve_backend(torch.device("cpu"), None, op="clip_reduce_noise")
    if b == "reference":
        pytest.skip("deer._C (CPU kernels) is not built here")
    return b


def _prepare(job, gen, phase):
    """Global adapters with a non-zero B (so that A-phase gradients and K = B^T B + lam I are generic),
    and the captured (X, U, G) of one batch of 13 samples of client 0."""
    model = job.model
    start = {k: t.clone() if k.endswith(".lora_A") else 0.3 * torch.randn(t.shape, generator=gen)
             for k, t in job.init_adapters.items()}
    set_lora_state(model, start, strict=True)
    set_phase(model, phase)
    layers = [u for _, u in lora_units(model)]
    x, y = job.data.clients[0].x[:13], job.data.clients[0].y[:13]
    for l in layers:
        l.capture = True
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for l in layers:
        l.capture = False
    captured = [l.pop_captured()[0] for l in layers]
    return layers, start, captured


def _step(layers, phase, spec, cfg, expected_batch, start, key, captured):
    """private_step with the sub-round's FrozenMetric, built (as local_train does) from the layers'
    values now, which _prepare set to `start`."""
    for l in layers:
        for f in ("A", "B"):
            assert torch.equal(l.factor(f).detach(), start[f"{l.name}.lora_{f}"])
    mech = spec.mechanism.replace(lam=cfg.lam)
    metric = FrozenMetric([(l.name, l) for l in layers], phase, mech)
    return private_step(layers, phase, mech, cfg, expected_batch, metric, key, captured=captured)


CASES = [("deer", "B"), ("deer", "A"), ("deer_no_de", "AB"), ("fedavg", "AB"), ("ffa", "B")]


@pytest.mark.parametrize("method,phase", CASES)
def test_private_step_kernels_equal_reference(job, gen, method, phase):
    backend = _kernel_backend()
    seed = gen.initial_seed()
    spec = method_spec(method)
    layers, start, captured = _prepare(job, gen, phase)
    key = NoiseKey(seed % (1 << 62), 5, 3)
    for sigma, C in ((0.0, 0.05), (0.0, 1e9), (1.3, 0.05)):   # clipping active / inactive; noise on
        outs = {}
        for b in (None, backend, "reference"):
            cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=sigma, max_grad_norm=C, lam=0.1, backend=b)
            outs[b] = _step(layers, phase, spec, cfg, 8.0, start, key, captured=captured)
        (kg, keff), (rg, reff) = outs[backend], outs["reference"]
        assert keff == reff == sigma
        for li, (kd, rd, nd) in enumerate(zip(kg, rg, outs[None][0])):
            assert set(kd) == set(rd) == set(phase)
            for f in kd:
                assert kd[f].dtype == torch.float32 and rd[f].dtype == torch.float64
                assert torch.equal(kd[f], nd[f])             # backend=None resolves to the kernels
                scale = float(rd[f].abs().max())
                torch.testing.assert_close(kd[f].double(), rd[f], rtol=1e-4, atol=1e-5 * scale + 1e-12,
                                           msg=f"{method} {phase} layer {li} {f} sigma={sigma} C={C} seed {seed}")
    # the noise is really there and keyed: another step number gives other noise
    cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=1.3, max_grad_norm=0.05, lam=0.1, backend=backend)
    other, _ = _step(layers, phase, spec, cfg, 8.0, start, NoiseKey(key.seed, 6, 3), captured=captured)
    diff = max(float((a[f] - b[f]).abs().max()) for a, b in zip(other, kg) for f in a)
    assert diff > 1e-3


@pytest.mark.parametrize("method,phase", [("deer", "B"), ("deer", "A"), ("fedavg", "AB")])
def test_noise_law_and_empty_batch(job, gen, method, phase):
    """With sigma C >> any clipped sum the step is (sigma C xi) / b: xi ~ N(0, I) (isotropic), or
    whitened xi ~ N(0, I) (regulated: xi R^T in phase B, R xi in phase A, K = R^T R from the start
    adapters). An empty Poisson batch (captured=[]) releases the same noise alone."""
    _kernel_backend()
    spec = method_spec(method)
    layers, start, captured = _prepare(job, gen, phase)
    sigma, C, b = 1e6, 1.0, 8.0
    cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=sigma, max_grad_norm=C, lam=0.1)
    seed = gen.initial_seed()
    full, _ = _step(layers, phase, spec, cfg, b, start, NoiseKey(seed, 0, 0), captured=captured)
    z = []
    for step in range(24):   # independent keys: enough entries for a tight test
        empty, eff = _step(layers, phase, spec, cfg, b, start, NoiseKey(seed, step, 0), captured=[])
        assert eff == sigma
        for l, fd, ed in zip(layers, full, empty):
            for f in ed:
                if step == 0:
                    torch.testing.assert_close(fd[f], ed[f], rtol=1e-5, atol=1e-5 * float(ed[f].abs().max()))
                xi = ed[f].double() * b / (sigma * C)
                if spec.mechanism.noise == "regulated":
                    A0, B0 = start[f"{l.name}.lora_A"].double(), start[f"{l.name}.lora_B"].double()
                    K = (A0 @ A0.T if f == "B" else B0.T @ B0) + 0.1 * torch.eye(A0.shape[0], dtype=torch.float64)
                    R = torch.linalg.cholesky(K).mT
                    xi = xi @ R.T if f == "B" else R @ xi
                z.append(xi.flatten())
    z = torch.cat(z)
    assert z.numel() > 1000
    # 5 standard errors: mean se 1/sqrt(N), std se 1/sqrt(2N)
    assert abs(float(z.mean())) < 5 / z.numel() ** 0.5, float(z.mean())
    assert abs(float(z.std()) - 1) < 5 / (2 * z.numel()) ** 0.5, float(z.std())


def test_local_train_kernels_equal_reference_and_accounting(job, gen):
    """Whole local training (DEeR's B then A sub-round, 3 DP steps each): the kernel path ends where the
    reference path does, and both report the releases the accountant is charged: sigma at q = b / n per step."""
    _kernel_backend()
    seed = gen.initial_seed()
    cd = job.data.clients[1]
    n = len(cd.y)
    start = {k: t.clone() for k, t in job.init_adapters.items()}
    for phase in ("B", "A"):
        ends = {}
        for backend in (None, "reference"):
            cfg = LocalTrainConfig(1, 16, 0.2, "sample", noise_multiplier=0.9, max_grad_norm=0.5, lam=0.1,
                                   local_steps=3, backend=backend)
            upd = local_train(job.model, start, cd.x, cd.y, phase, method_spec("deer"), cfg,
                              torch.Generator().manual_seed(seed), noise_seed=seed + 1, client=1)
            assert upd.releases == [(0.9, 16 / n, 3)]
            ends[backend] = upd.adapters
        assert set(ends[None]) == set(ends["reference"]) == set(start)
        for k in start:
            torch.testing.assert_close(ends[None][k], ends["reference"][k], rtol=1e-4, atol=1e-6,
                                       msg=f"{phase} {k} seed {seed}")
        start = ends[None]


def test_step_is_poisson_sampled_mean_over_expected_batch(job, gen):
    """sigma = 0 and no clipping: one local step moves the trained factor by -lr * (sum of the per-sample
    gradients of the Poisson batch) / (q n) -- the expected batch size the accountant's q refers to, not
    the realised one. The batch is drawn from the client's stream exactly as q = b / n says."""
    _kernel_backend()
    seed = gen.initial_seed()
    cd = job.data.clients[0]
    n, bsz, lr = len(cd.y), 16, 0.1
    q = bsz / n
    start = {k: t.clone() for k, t in job.init_adapters.items()}
    cfg = LocalTrainConfig(1, bsz, lr, "sample", noise_multiplier=0.0, max_grad_norm=1e9, lam=0.1, local_steps=1)
    upd = local_train(job.model, start, cd.x, cd.y, "B", method_spec("ffa"), cfg, torch.Generator().manual_seed(seed),
                      noise_seed=1, client=0)
    assert upd.releases == [(0.0, q, 1)]
    idx = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < q).nonzero().squeeze(1)
    model = job.model
    set_lora_state(model, start, strict=True)
    set_phase(model, "B")
    layers = lora_units(model)
    params = [l.lora_B for _, l in layers]
    grads = torch.autograd.grad(F.cross_entropy(model(cd.x[idx]), cd.y[idx], reduction="sum"), params)
    assert set(upd.adapters) == set(start)
    for (name, _), g in zip(layers, grads):
        expected = start[f"{name}.lora_B"] - lr * g / (q * n)
        torch.testing.assert_close(upd.adapters[f"{name}.lora_B"], expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(upd.adapters[f"{name}.lora_A"], start[f"{name}.lora_A"])
    set_lora_state(model, job.init_adapters, strict=True)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_private_step_drops_nonfinite_samples(job, gen, backend):
    """A record whose loss gradient is NaN is dropped from the private sum with a warning (as the
    PrivacyEngine does): the release equals the one where that record contributes nothing, and no NaN
    reaches it. A non-finite release is refused with the layer's name."""
    if backend is None:
        _kernel_backend()
    spec = method_spec("deer")
    layers, start, captured = _prepare(job, gen, "B")
    poisoned = [(X, U, G.clone()) for X, U, G in captured]
    poisoned[0][2][4] = float("nan")          # sample 4's output gradient in the first LoRA layer
    zeroed = [(X, U, G.clone()) for X, U, G in captured]
    for c in zeroed:
        c[2][4] = 0.0                          # sample 4 contributes nothing anywhere
    cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=0.7, max_grad_norm=0.05, lam=0.1, backend=backend)
    key = NoiseKey(gen.initial_seed(), 2, 1)
    with pytest.warns(RuntimeWarning, match="1 sample"):
        got, _ = _step(layers, "B", spec, cfg, 8.0, start, key, captured=poisoned)
    want, _ = _step(layers, "B", spec, cfg, 8.0, start, key, captured=zeroed)
    for g, w in zip(got, want):
        assert torch.isfinite(g["B"]).all()
        torch.testing.assert_close(g["B"], w["B"], rtol=1e-6, atol=1e-9)


def test_private_step_refuses_a_nonfinite_release(job, gen, monkeypatch):
    import deer.ops as ops_mod
    _kernel_backend()
    layers, start, captured = _prepare(job, gen, "B")
    real = ops_mod.clip_reduce_noise_grouped

    def poisoned(*args, **kw):
        outs = real(*args, **kw)
        outs[-1] = outs[-1].clone()
        outs[-1].view(-1)[0] = float("inf")
        return outs
    monkeypatch.setattr(ops_mod, "clip_reduce_noise_grouped", poisoned)   # the release's one call
    cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=0.7, max_grad_norm=0.05, lam=0.1)
    with pytest.raises(FloatingPointError, match=r"lora_B is not finite"):
        _step(layers, "B", method_spec("deer"), cfg, 8.0, start, NoiseKey(3, 0, 0), captured=captured)


def test_private_step_refuses_a_layer_captured_twice(job, gen):
    """Local training runs one forward and backward per step, so every LoRA layer holds one physical
    batch; a second forward and backward would be counted as extra samples, so the step refuses it,
    naming the layer."""
    layers, start, _ = _prepare(job, gen, "B")
    x, y = job.data.clients[0].x[:5], job.data.clients[0].y[:5]
    for l in layers:
        l.capture = True
    for _ in range(2):
        F.cross_entropy(job.model(x), y, reduction="sum").backward()
    for l in layers:
        l.capture = False
    spec = method_spec("deer")
    mech = spec.mechanism.replace(lam=0.1)
    metric = FrozenMetric([(l.name, l) for l in layers], "B", mech)
    cfg = LocalTrainConfig(1, 16, 0.1, "sample", noise_multiplier=0.7, max_grad_norm=0.05, lam=0.1)
    with pytest.raises(RuntimeError, match=rf"{layers[0].name} captured 2 batches"):
        private_step(layers, "B", mech, cfg, 8.0, metric, NoiseKey(3, 0, 0))
    set_lora_state(job.model, job.init_adapters, strict=True)


def test_local_sgd_momentum_and_weight_decay(job, gen):
    """momentum / weight_decay: the client's local steps follow v <- mu v + (g + wd p), p <- p - lr v
    with v = 0 at the start of the sub-round (an independent recursion on the same batches)."""
    seed = gen.initial_seed()
    cd = job.data.clients[0]
    n, bsz, lr, mu, wd, steps = len(cd.y), 16, 0.1, 0.9, 0.05, 4
    start = {k: t.clone() if k.endswith(".lora_A") else 0.1 * torch.randn(t.shape, generator=gen)
             for k, t in job.init_adapters.items()}
    cfg = LocalTrainConfig(1, bsz, lr, "none", local_steps=steps, momentum=mu, weight_decay=wd)
    upd = local_train(job.model, start, cd.x, cd.y, "AB", method_spec("fedavg"), cfg,
                      torch.Generator().manual_seed(seed))
    model = job.model
    set_lora_state(model, start, strict=True)
    set_phase(model, "AB")
    params = [getattr(l, "lora_" + f) for _, l in lora_units(model) for f in "AB"]
    vel = [torch.zeros_like(p) for p in params]
    g2 = torch.Generator().manual_seed(seed)
    per_epoch = -(-n // bsz)
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=g2)
        idx = perm[(step % per_epoch) * bsz:(step % per_epoch + 1) * bsz]
        grads = torch.autograd.grad(F.cross_entropy(model(cd.x[idx]), cd.y[idx]), params)
        with torch.no_grad():
            for p, v, g in zip(params, vel, grads):
                v.mul_(mu).add_(g + wd * p)
                p.sub_(lr * v)
    moved = 0.0
    for (name, lyr) in lora_units(model):
        for f in "AB":
            key = f"{name}.lora_{f}"
            torch.testing.assert_close(upd.adapters[key], getattr(lyr, "lora_" + f).detach(), rtol=1e-4, atol=1e-6)
            moved = max(moved, float((upd.adapters[key] - start[key]).abs().max()))
    assert moved > 1e-3
    # without momentum the same steps end elsewhere: the option is not ignored
    plain = local_train(job.model, start, cd.x, cd.y, "AB", method_spec("fedavg"),
                        LocalTrainConfig(1, bsz, lr, "none", local_steps=steps), torch.Generator().manual_seed(seed))
    assert max(float((plain.adapters[k] - upd.adapters[k]).abs().max()) for k in start) > 1e-4
    set_lora_state(model, job.init_adapters, strict=True)
