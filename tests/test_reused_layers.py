"""A LoRA layer used more than once per sample (weight sharing, a module applied to two views of one
batch, a second backward through a retained graph) contributes one per-sample gradient: the sum of
its uses, clipped once. Checked against per-sample autograd on a copy of the model that never saw the
privacy engine (each sample alone, its own loss), flat clipping that clips most samples, noise off.
Counting each use as a sample would let one record move the clipped sum by 2C while the accountant
assumes C."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deer
from deer.nn import inject_lora, lora_units

C = 0.05   # far below the per-sample norms of these models: nearly every sample is clipped


class Shared(nn.Module):
    """One block applied twice in a row (weight sharing, as ALBERT or a recurrent cell)."""

    def __init__(self, n=7):
        super().__init__()
        self.block = nn.Linear(n, n)
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


class TwoViews(nn.Module):
    """One encoder called on two tensors of the same batch, the outputs combined per sample."""

    def __init__(self, n=5):
        super().__init__()
        self.enc = nn.Linear(n, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x1, x2 = x
        return self.head(torch.tanh(self.enc(x1)) * torch.tanh(self.enc(x2.flip(-1))))


def _prepare(model, gen, targets):
    torch.manual_seed(gen.initial_seed() % (1 << 31))
    inject_lora(model, targets, r=2)
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(0.3 * torch.randn(u.lora_B.shape, generator=gen))
    oracle = copy.deepcopy(model)   # never made private: its LoRA layers do not capture
    return model, oracle


def _private_grads(model, loss_fn, b, batches=1):
    """The private gradient (noise off) of the LoRA factors after `batches` backward passes of loss_fn."""
    params = [p for _, u in lora_units(model) for p in (u.lora_A, u.lora_B)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(model, torch.optim.SGD(params, lr=0.0), None, noise_multiplier=0.0,
                                          max_grad_norm=C, sample_rate=0.5, expected_batch_size=float(b), seed=0,
                                          loss_reduction="sum", phase="AB")
    loss_fn(model)
    opt.step()
    assert opt.last_step["batch_size"] == b * batches
    assert opt.last_step["clipped_fraction"] > 0.5
    return [p.grad.clone() for p in params]


def _oracle_grads(oracle, sample_losses, b, params=None):
    """Clipped per-sample gradients summed over samples / b, each sample's gradient from its own loss;
    of `params` (default: every LoRA factor of the oracle), clipped jointly."""
    if params is None:
        params = [p for _, u in lora_units(oracle) for p in (u.lora_A, u.lora_B)]
    total = [torch.zeros_like(p) for p in params]
    for i in range(b):
        gs = torch.autograd.grad(sample_losses(oracle, i), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gs))
        c = min(1.0, C / float(norm))
        for t, g in zip(total, gs):
            t += c * g
    return [t / b for t in total]


def _assert_close(got, want):
    for g, w in zip(got, want):
        err = float((g - w).norm() / w.norm())
        assert err < 1e-4, err


@pytest.mark.parametrize("targets", [["block", "head"], ["block"]])
def test_weight_shared_layer(gen, targets):
    """With only the shared block adapted every LoRA layer is used twice: counting uses as samples
    would raise nothing, so only the per-sample sum keeps the bound."""
    b = 6
    x, y = torch.randn(b, 7, generator=gen), torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(Shared(), gen, targets)
    got = _private_grads(model, lambda m: F.cross_entropy(m(x), y, reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), b)
    _assert_close(got, want)


def test_module_called_on_two_tensors_of_one_batch(gen):
    b = 5
    x1, x2 = torch.randn(b, 5, generator=gen), torch.randn(b, 5, generator=gen)
    y = torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(TwoViews(), gen, ["enc", "head"])
    got = _private_grads(model, lambda m: F.cross_entropy(m((x1, x2)), y, reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: F.cross_entropy(m((x1[i:i + 1], x2[i:i + 1])), y[i:i + 1]), b)
    _assert_close(got, want)


def test_two_backward_passes_through_one_forward(gen):
    """loss1.backward(retain_graph=True); loss2.backward(): both are the same samples' losses."""
    b = 5
    x, y = torch.randn(b, 7, generator=gen), torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(Shared(), gen, ["block", "head"])

    def two_losses(m):
        out = m(x)
        F.cross_entropy(out, y, reduction="sum").backward(retain_graph=True)
        (out ** 2).sum().backward()

    def sample_loss(m, i):
        out = m(x[i:i + 1])
        return F.cross_entropy(out, y[i:i + 1]) + (out ** 2).sum()

    _assert_close(_private_grads(model, two_losses, b), _oracle_grads(oracle, sample_loss, b))


def test_gradient_accumulation_stays_separate_batches(gen):
    """Two forward+backward passes over two physical batches of a shared-weight model: 2b samples."""
    b = 4
    x, y = torch.randn(2 * b, 7, generator=gen), torch.randint(0, 3, (2 * b,), generator=gen)
    model, oracle = _prepare(Shared(), gen, ["block", "head"])

    def accumulate(m):
        for k in range(2):
            F.cross_entropy(m(x[k * b:(k + 1) * b]), y[k * b:(k + 1) * b], reduction="sum").backward()

    got = _private_grads(model, accumulate, 2 * b, batches=1)
    want = _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), 2 * b)
    _assert_close(got, want)


def test_albert_shares_its_layer_across_depth(gen):
    """HF ALBERT applies one transformer layer num_hidden_layers times: every LoRA layer in it is used
    three times per sample."""
    from transformers import AlbertConfig, AlbertModel
    torch.manual_seed(gen.initial_seed() % (1 << 31))
    net = AlbertModel(AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=12, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=20, max_position_embeddings=16,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    b, T = 5, 6
    ids = torch.randint(0, 30, (b, T), generator=gen)
    w = torch.randn(12, generator=gen)
    model, oracle = _prepare(net, gen, ["query", "value", "ffn"])

    def loss(m, rows):
        return (torch.tanh(m(input_ids=ids[rows]).last_hidden_state) @ w).pow(2).sum()

    got = _private_grads(model, lambda m: loss(m, slice(None)).backward(), b)
    want = _oracle_grads(oracle, lambda m, i: loss(m, slice(i, i + 1)), b)
    _assert_close(got, want)


def test_uses_with_different_leading_sizes_are_refused(gen):
    """A layer used on (b, n) and on a (b*T, n) fold of the same batch: the rows cannot be attributed."""
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):   # x: (b, T, 4)
            return self.proj(x.mean(1)).sum(-1) + self.proj(x.reshape(-1, 4)).reshape(x.shape[0], -1).sum(-1)

    b = 3
    x = torch.randn(b, 5, 4, generator=gen)
    model, _ = _prepare(Folded(), gen, ["proj"])
    with pytest.raises(ValueError, match=r"'proj' was used 2 times on the same samples with different leading sizes"):
        _private_grads(model, lambda m: m(x).sum().backward(), b)
