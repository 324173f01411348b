"""Opacus habits that work on deer's optimizer: make_private_with_epsilon, optimizer.noise_multiplier,
virtual batches through Opacus' own BatchMemoryManager; and the ones refused at once: a GradScaler
at the step that would use it, an IterableDataset where Poisson sampling needs a length."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deer
from deer.nn import inject_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
    inject_lora(m, ["0", "2"], r=3, seed=seed)
    with torch.no_grad():   # a generic B, so that both factors and the regulated metric are non-trivial
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return m


def _data(gen, n=61):
    return torch.utils.data.TensorDataset(torch.randn(n, 7, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _private(model, ds, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    loader = torch.utils.data.DataLoader(ds, batch_size=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deer.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, seed=11, **kw)


def test_make_private_with_epsilon_and_noise_multiplier(gen):
    from opacus.accountants.utils import get_noise_multiplier
    ds = _data(gen)
    _, opt, loader = deer.PrivacyEngine().make_private_with_epsilon(
        _model(1), torch.optim.SGD([p for p in _model(1).parameters() if p.requires_grad], lr=0.1),
        torch.utils.data.DataLoader(ds, batch_size=20), target_epsilon=3.0, target_delta=1e-5, epochs=5,
        max_grad_norm=1.0)
    _, opt2, _ = _private(_model(1), ds, target_epsilon=3.0, target_delta=1e-5, epochs=5, max_grad_norm=1.0)
    want = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=loader.sample_rate,
                                steps=5 * len(loader), accountant="rdp")
    assert opt.noise_multiplier == opt2.noise_multiplier == opt.engine.noise_multiplier
    assert opt.noise_multiplier == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("mechanism,phase", [("isotropic", "B"), ("regulated_metric", "A")])
def test_batch_memory_manager_equals_logical_batches(gen, mechanism, phase):
    """Opacus' BatchMemoryManager splits each Poisson batch into physical batches of at most 4 and
    signals the optimizer to skip all but the last: the run equals the one without it (the same
    logical batches, clipped once, the same noise keys, the same charges), to float32 rounding."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    ds = _data(gen)
    ends, charged, physical = [], [], 0
    for virtual in (False, True):
        model = _model(2)
        _, opt, loader = _private(model, ds, noise_multiplier=0.7, max_grad_norm=0.05, mechanism=mechanism,
                                  phase=phase)
        if virtual:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=opt) as batches:
                for x, y in batches:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    physical += 1
        else:
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        ends.append({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n})
        charged.append((opt.steps_taken, opt.engine.accountant.history))
    assert physical > 2 * len(loader)   # the batches really were split
    assert charged[0] == charged[1] and charged[0][0] == len(loader)
    start = {n: p.detach() for n, p in _model(2).named_parameters() if ".lora_" in n}
    for n, a in ends[0].items():
        torch.testing.assert_close(ends[1][n], a, rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(a, start[n]) == (f".lora_{phase}" not in n), n   # only the trained factor moved


def test_grad_scaler_is_refused_at_its_step(gen):
    model = _model(3)
    before = [p.detach().clone() for p in model.parameters()]
    _, opt, loader = _private(model, _data(gen), noise_multiplier=1.0, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = next(iter(loader))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch's note on the grad_scaler= protocol
        with pytest.raises(RuntimeError, match="GradScaler.*per-sample"):
            scaler.step(opt)
    assert opt.steps_taken == 0 and opt.engine.accountant.history == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # a disabled scaler is a no-op wrapper and trains as usual
    off = torch.amp.GradScaler("cpu", enabled=False)
    opt.zero_grad()
    off.scale(F.cross_entropy(model(x), y)).backward()
    off.step(opt)
    assert opt.steps_taken == 1


def test_iterable_dataset_is_refused(gen):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_data(gen))
    model = _model(4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="IterableDataset"):
        deer.PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=torch.utils.data.DataLoader(
            Stream(), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)
