"""Every bad input of the DP-LoRA API gets a clear error (or, for NaN gradients, a dropped sample,
a warning and a counter), and each is tested here."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deer.nn import NoLoRALayersError, inject_lora, lora_layers, set_phase
from deer.privacy import PrivacyBudgetExceeded, PrivacyEngine


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _private(model, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or model.parameters(), lr=0.1)
    eng = PrivacyEngine()
    args = dict(sample_rate=0.1, expected_batch_size=5, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    args.update(kw)
    model, opt, _ = eng.make_private(module=model, optimizer=opt, **args)
    return eng, opt


def test_no_lora_layers_matched_lists_names():
    with pytest.raises(NoLoRALayersError, match=r"no module matched.*'0', '3'"):
        inject_lora(_mlp(), ["query", "value"], r=2)


def test_target_not_a_linear():
    with pytest.raises(TypeError, match="'1' is a LayerNorm, not an nn.Linear"):
        inject_lora(_mlp(), ["0", "1"], r=2)
    with pytest.raises(TypeError, match="must be nn.Linear, nn.Conv2d or nn.Embedding modules, but the target type LayerNorm"):
        inject_lora(_mlp(), nn.LayerNorm, r=2)


def test_rank_too_large():
    with pytest.raises(ValueError, match=r"\[1, 3\].*'3'.*got r=4"):
        inject_lora(_mlp(), ["0", "3"], r=4)      # layer '3' is 8 -> 3: rank at most 3
    with pytest.raises(ValueError, match="rank"):
        inject_lora(_mlp(), "0", r=0)


def test_phase_before_lora():
    with pytest.raises(NoLoRALayersError, match="inject_lora"):
        set_phase(_mlp(), "A")
    with pytest.raises(NoLoRALayersError, match="make_private"):
        PrivacyEngine().set_phase("B")
    with pytest.raises(NoLoRALayersError, match="inject_lora"):
        _private(_mlp())


def test_non_lora_trainable_parameters_rejected():
    model = inject_lora(_mlp(), "0", r=2)
    model[3].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"not LoRA factors.*'3.weight'"):
        _private(model)


def test_bad_mode_combinations():
    model = inject_lora(_mlp(), ["0", "3"], r=2)
    with pytest.raises(ValueError, match="frozen factor"):
        _private(model, noise="regulated", phase="AB")
    with pytest.raises(ValueError, match="regulator applies to noise='regulated'"):
        _private(model, regulator="paper")
    with pytest.raises(ValueError, match="noise is 'isotropic' or 'regulated'"):
        _private(model, noise="gaussian")
    with pytest.raises(ValueError, match="not both"):
        _private(model, mechanism="isotropic", noise="regulated")
    with pytest.raises(ValueError, match="noise_multiplier, or target_epsilon"):
        _private(model, noise_multiplier=None)
    with pytest.raises(ValueError, match="target_delta"):
        _private(model, target_epsilon=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _private(model, max_grad_norm=0.0)


def test_budget_raises_before_the_step(gen):
    model = inject_lora(_mlp(), ["0", "3"], r=2)
    eng, opt = _private(model, noise_multiplier=1.5, sample_rate=0.05, target_epsilon=1.0, target_delta=1e-5)
    x = torch.randn(5, 6, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    steps = 0
    with pytest.raises(PrivacyBudgetExceeded, match="No step was taken"):
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            hist = list(eng.accountant.history)
            opt.step()
            steps += 1
    assert steps > 1
    # the refused step changed nothing: no weight, no accountant entry; what was spent is within budget
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert list(eng.accountant.history) == hist
    assert 0.6 < eng.get_epsilon(1e-5) <= 1.0


def test_nan_sample_dropped_with_warning(gen):
    """A NaN/Inf sample is dropped: the step equals the step on the batch without it."""
    torch.manual_seed(gen.initial_seed())
    base = inject_lora(_mlp(), ["0", "3"], r=2)
    with torch.no_grad():
        for u in lora_layers(base):
            u.lora_B.normal_()
    x = torch.randn(6, 6, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    x_bad = x.clone()
    x_bad[2, 1] = float("nan")
    x_bad[4, 0] = float("inf")
    keep = torch.tensor([0, 1, 3, 5])
    results = []
    import copy
    for xb, yb in ((x_bad, y), (x[keep], y[keep])):
        model = copy.deepcopy(base)
        eng, opt = _private(model, noise_multiplier=0.5, loss_reduction="sum", max_grad_norm=0.5, seed=9)
        F.cross_entropy(model(xb), yb, reduction="sum").backward()
        if xb is x_bad:
            with pytest.warns(RuntimeWarning, match="2 sample\\(s\\) had NaN/Inf"):
                opt.step()
            assert opt.nonfinite_samples == 2 and opt.last_step["dropped_nonfinite"] == 2
        else:
            opt.step()
            assert opt.nonfinite_samples == 0
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in results[0]:
        assert torch.isfinite(results[0][n]).all(), n
        torch.testing.assert_close(results[0][n], results[1][n], msg=n)


def test_inconsistent_sample_dimension(gen):
    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):                      # (b, T, 4) -> folds tokens into the batch for b
            return self.b(self.a(x).reshape(-1, 4))
    model = inject_lora(Folding(), ["a", "b"], r=2)
    eng, opt = _private(model)
    model(torch.randn(3, 5, 4, generator=gen)).sum().backward()
    with pytest.raises(ValueError, match="different numbers of samples"):
        opt.step()


def test_nonfinite_private_gradient_refused_before_any_grad_is_written(gen, monkeypatch):
    """If a layer's noisy sum is not finite (finite per-sample gradients, but e.g. an overflowing
    regulated solve), the step raises naming that layer, and no parameter (not even the layers
    computed before it) gets a gradient or an update."""
    import deer.ops as ops_mod
    torch.manual_seed(gen.initial_seed())
    model = inject_lora(_mlp(), ["0", "3"], r=2)
    with torch.no_grad():
        for u in lora_layers(model):
            u.lora_B.normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng, opt = _private(model, noise_multiplier=0.5, max_grad_norm=1.0, seed=3)
    real = ops_mod.clip_reduce_noise_grouped
    calls = []

    def poisoned(*args, **kw):
        outs = real(*args, **kw)
        calls.append(len(outs))
        outs[1] = outs[1].clone()
        outs[1].view(-1)[0] = float("inf")   # the second tensor's release overflows
        return outs
    monkeypatch.setattr(ops_mod, "clip_reduce_noise_grouped", poisoned)   # the release's one call
    F.cross_entropy(model(torch.randn(5, 6, generator=gen)), torch.randint(0, 3, (5,), generator=gen)).backward()
    with pytest.raises(FloatingPointError, match=r"private gradient of .*lora_B is not finite"):
        opt.step()
    assert calls == [4]             # phase AB: A and B of both layers, all computed before the check
    for n, p in model.named_parameters():
        assert p.grad is None, f"{n} got a gradient from a refused step"
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)


def test_nonfinite_private_gradient_with_fused_step_is_charged_and_raises(gen, monkeypatch):
    """With fused_update the kernels have stepped the finite elements before the check can run: the
    step still raises, names the layer, keeps NaN/Inf out of the weights, and is charged to the
    accountant (its noise reached the weights), so a resumed run never forgets it."""
    import deer.ops as ops_mod
    torch.manual_seed(gen.initial_seed())
    model = inject_lora(_mlp(), ["0", "3"], r=2)
    eng, opt = _private(model, noise_multiplier=0.5, max_grad_norm=1.0, seed=3, fused_update=True)
    real = ops_mod.clip_reduce_noise_grouped

    def poisoned(*args, **kw):
        outs = real(*args, **kw)
        outs[1] = outs[1].clone()
        outs[1].view(-1)[0] = float("nan")
        return outs
    monkeypatch.setattr(ops_mod, "clip_reduce_noise_grouped", poisoned)   # the release's one call
    F.cross_entropy(model(torch.randn(5, 6, generator=gen)), torch.randint(0, 3, (5,), generator=gen)).backward()
    assert eng.get_epsilon(1e-5) == 0
    with pytest.raises(FloatingPointError, match=r"lora_B is not finite.*charged to the accountant"):
        opt.step()
    assert opt.steps_taken == 1 and eng.get_epsilon(1e-5) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Bypass(nn.Module):
    """Reads its projection's weight directly (as nn.MultiheadAttention does with out_proj): the LoRA
    branch on `proj` never runs."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def test_a_branch_off_the_forward_path_is_refused_at_the_first_step(gen):
    model = inject_lora(_Bypass(), ["proj", "head"], r=2)
    eng, opt = _private(model)
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"\['proj'\] received no gradient .* saw 5 samples"):
        opt.step()
    assert eng.accountant.state_dict() == PrivacyEngine().accountant.state_dict()   # nothing charged
    assert all(p.grad is None for p in model.parameters())


def test_hf_token_mean_loss_is_refused(gen):
    """transformers' default causal-LM loss averages over every token of the batch, so a sample's
    gradient depends on the other samples' lengths: the private model refuses it at the forward."""
    from transformers import LlamaConfig, LlamaForCausalLM
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    model = inject_lora(lm, ["q_proj", "v_proj"], r=2)
    _private(model)
    ids = torch.randint(0, 30, (3, 5), generator=gen)
    with pytest.raises(ValueError, match=r"computed its own loss .* token-level logits of shape \(3, 5, 30\)"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():   # evaluation with labels= stays allowed
        assert model(input_ids=ids, labels=ids).loss.isfinite()
    assert model(input_ids=ids).logits.shape == (3, 5, 30)
