"""LoRA on nn.Embedding, as peft's embedding LoRA (delta of the table = s (B A)^T, A: (r, vocab),
B: (dim, r)), computed as a Linear branch on the one-hot tokens so per-sample capture and kernels are
those of every LoRA layer. The output is unchanged with B = 0 and the branch moves it, merge folds the
delta, per-sample gradients through make_private equal per-sample autograd on a copy that never saw
the privacy engine (own model and HF BERT's word embeddings), the adapter reloads in peft with
identical outputs, a peft embedding adapter converts with from_peft, and what deer cannot adapt is
refused."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deer
from deer import save_adapter
from deer.nn import LoRAEmbedding, from_peft, inject_lora, lora_units

from test_lora_probe import dead_units
from test_reused_layers import _assert_close, _oracle_grads, _prepare, _private_grads


class Tokens(nn.Module):
    def __init__(self, vocab=13, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(7, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(h).mean(1))


def test_embedding_is_wrapped_with_the_same_output_and_a_live_branch(gen):
    model = Tokens()
    ids = torch.randint(0, 13, (4, 5), generator=gen)
    with torch.no_grad():
        want = model(ids)
    inject_lora(model, ["emb", "pos", "head"], r=3)
    assert {n for n, u in lora_units(model) if isinstance(u, LoRAEmbedding)} == {"emb", "pos"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    assert dead_units(model, ids, gen) == []
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(0.3 * torch.randn(u.lora_B.shape, generator=gen))
        live = model(ids)
        assert float((live - want).abs().max()) > 1e-3
        for _, u in lora_units(model):
            u.merge()
        torch.testing.assert_close(model(ids), live, rtol=1e-5, atol=1e-5)


def test_branch_is_peft_embedding_lora(gen):
    base = nn.Embedding(11, 5)
    u = LoRAEmbedding(base, r=2, alpha=3.0)
    with torch.no_grad():
        u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
    ids = torch.randint(0, 11, (3, 4), generator=gen)
    want = base(ids) + 1.5 * F.embedding(ids, u.lora_A.T) @ u.lora_B.T
    torch.testing.assert_close(u(ids), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        LoRAEmbedding(nn.Embedding(11, 5, max_norm=1.0), r=2)
    with pytest.raises(ValueError, match="no dropout"):
        inject_lora(Tokens(), ["emb"], r=2, dropout=0.1)


def test_per_sample_gradients_match_autograd(gen):
    b = 6
    ids = torch.randint(0, 13, (b, 5), generator=gen)
    y = torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(Tokens(), gen, ["emb", "head"])
    got = _private_grads(model, lambda m: F.cross_entropy(m(ids), y, reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: F.cross_entropy(m(ids[i:i + 1]), y[i:i + 1]), b)
    _assert_close(got, want)


def test_embedding_of_inputs_shared_by_the_batch_is_refused(gen):
    """The position table is looked up with arange(T), one input for the whole batch: its LoRA branch
    sees no sample dimension, and the step says so (naming the layer) instead of misattributing."""
    b = 4
    ids, y = torch.randint(0, 13, (b, 5), generator=gen), torch.randint(0, 3, (b,), generator=gen)
    model, _ = _prepare(Tokens(), gen, ["emb", "pos", "head"])
    with pytest.raises(ValueError, match=r"'pos.lora_A': 5.*input the whole batch shares"):
        _private_grads(model, lambda m: F.cross_entropy(m(ids), y, reduction="sum").backward(), b)


def test_hf_bert_word_embeddings(gen):
    """A model deer did not build: HF BERT (random init, tiny) with LoRA on its word embeddings and
    attention queries; private gradients with noise off equal per-sample autograd."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=29, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(int(gen.initial_seed() % 1000))
    net = transformers.BertForSequenceClassification(cfg).eval()
    b = 5
    ids = torch.randint(1, 29, (b, 7), generator=gen)
    mask = torch.ones(b, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    y = torch.randint(0, 3, (b,), generator=gen)
    model, oracle = _prepare(net, gen, ["word_embeddings", "query"])
    assert any(isinstance(u, LoRAEmbedding) for _, u in lora_units(model))
    k = 100.0   # a scaled loss, so that clipping binds on the tiny model's small gradients
    got = _private_grads(model, lambda m: (k * F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y,
                                                               reduction="sum")).backward(), b)
    want = _oracle_grads(oracle, lambda m, i: k * F.cross_entropy(
        m(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits, y[i:i + 1]), b)
    _assert_close(got, want)


def test_embedding_adapter_reloads_in_peft(tmp_path, gen):
    peft = pytest.importorskip("peft")
    base = Tokens().eval()
    model = inject_lora(copy.deepcopy(base), ["emb", "head"], r=2, alpha=4)
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 13, (3, 5), generator=gen)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)
    # and back into deer
    again = inject_lora(copy.deepcopy(base), ["emb", "head"], r=2, alpha=4)
    deer.load_adapter(again, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_peft_embedding_lora_converts(gen):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(Tokens(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "head"]))
    with torch.no_grad():   # peft starts the embedding's A at zero: give both factors values
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, 13, (4, 5), generator=gen)
    with torch.no_grad():
        want = pm(ids)
    peft_a = pm.base_model.model.emb.lora_embedding_A["default"]
    from_peft(pm)
    emb = pm.base_model.model.emb
    assert isinstance(emb, LoRAEmbedding) and emb.lora_A is peft_a
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), want, rtol=1e-6, atol=1e-6)
