"""LoRA on nn.MultiheadAttention: inject_lora swaps in LinearMultiheadAttention, whose q/k/v/out
projections are modules. It must compute what nn.MultiheadAttention computes (every argument), load its
state dict, keep torch's Transformer fast paths from bypassing it, give correct per-sample gradients
(checked against per-sample autograd through make_private), and refuse what it cannot do before
changing the model."""
import copy

import pytest
import torch
import torch.nn as nn

from deer.nn import LinearMultiheadAttention, inject_lora, lora_units

from test_lora_probe import ATTENTION as ALL, dead_units, torchvision_vit
from test_reused_layers import _assert_close, _oracle_grads, _prepare, _private_grads

def _calls(gen, N, L, S, E, kdim, batch_first):
    """Inputs and keyword sets covering nn.MultiheadAttention's arguments."""
    q = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    kv = torch.randn(N, S, kdim, generator=gen, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.rand(N, S, generator=gen) < 0.3
    pad[:, 0] = False                                  # no query row with every key masked
    am = torch.rand(L, S, generator=gen) < 0.3
    am[:, 0] = False
    per_head = torch.randn(N * 3, L, S, generator=gen, dtype=torch.float64)
    kws = [{}, dict(key_padding_mask=pad), dict(attn_mask=am), dict(attn_mask=am.double() * -2.5),
           dict(attn_mask=per_head, key_padding_mask=pad, average_attn_weights=False),
           dict(need_weights=False, key_padding_mask=pad.double() * -1e4)]
    if L == S:
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        kws.append(dict(attn_mask=causal, is_causal=True, need_weights=False))
    return q, kv, kws


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (5, True), (None, False)])
def test_same_function_as_multihead_attention(gen, batch_first, kdim, bias):
    E = 9
    mha = nn.MultiheadAttention(E, 3, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first,
                                dropout=0.3).double().eval()
    new = LinearMultiheadAttention.from_mha(mha)
    assert not new.training and isinstance(new.q_proj, nn.Linear) and isinstance(new.out_proj, nn.Linear)
    for L, S in ((7, 7), (4, 11)):
        q, kv, kws = _calls(gen, 5, L, S, E, kdim or E, batch_first)
        for kw in kws:
            want_out, want_w = mha(q, kv, kv, **kw)
            got_out, got_w = new(q, kv, kv, **kw)
            torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12, msg=str(kw))
            assert (got_w is None) == (want_w is None)
            if want_w is not None:
                torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
        # unbatched (seq, features) input
        q1, kv1 = (q[:, 0], kv[:, 0]) if not batch_first else (q[0], kv[0])
        for a, b in zip(mha(q1, kv1, kv1), new(q1, kv1, kv1)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_loads_a_multihead_attention_state_dict_and_keeps_flags(gen):
    for kdim in (None, 6):
        mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        new = LinearMultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        new.load_state_dict(mha.state_dict())          # in_proj_* / q_proj_weight keys, strict
        x, kv = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 4, kdim or 8, generator=gen)
        torch.testing.assert_close(new(x, kv, kv)[0], mha(x, kv, kv)[0])
    mha.in_proj_bias.requires_grad_(False)
    new = LinearMultiheadAttention.from_mha(mha.train())
    assert new.training and not new.q_proj.bias.requires_grad and new.q_proj.weight.requires_grad
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        new(x, kv, kv, is_causal=True)


def test_inject_converts_only_targeted_attention(gen):
    model = nn.ModuleDict({"a": nn.MultiheadAttention(8, 2, batch_first=True),
                           "b": nn.MultiheadAttention(8, 2, add_bias_kv=True), "fc": nn.Linear(8, 8)})
    inject_lora(model, ["a.q_proj", "a.out_proj", "fc"], r=2)
    assert isinstance(model["a"], LinearMultiheadAttention) and isinstance(model["b"], nn.MultiheadAttention)
    assert sorted(n for n, _ in lora_units(model)) == ["a.out_proj", "a.q_proj", "fc"]
    # the attention module named itself: the error names its projections
    with pytest.raises(TypeError, match=r"'b' is an nn.MultiheadAttention.*'b.q_proj'"):
        inject_lora(nn.ModuleDict({"b": nn.MultiheadAttention(8, 2)}), ["b"], r=2)
    with pytest.raises(ValueError, match=r"'b'.*add_bias_kv=True.*Leave this module out"):
        inject_lora(model, ["b.v_proj"], r=2)
    with pytest.raises(ValueError, match=r"add_zero_attn=True"):
        inject_lora(nn.Sequential(nn.MultiheadAttention(8, 2, add_zero_attn=True)), [r".*_proj"], r=2)


def test_sequence_first_transformer_layer_is_refused_before_any_change():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), num_layers=2,
                                  enable_nested_tensor=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'layers.0'.*TransformerEncoderLayer with batch_first=False.*"
                                         r"layers.0.linear1.*batch_first=True"):
        inject_lora(model, ["out_proj", "linear1"], r=2)
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention) and not lora_units(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # attention alone is fine: the converted module transposes to batch-first before its projections
    inject_lora(model, ALL, r=2)
    assert len(lora_units(model)) == 8


def _encoder(batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2)       # enable_nested_tensor defaults to True


def test_transformer_encoder_fast_paths_do_not_bypass_lora(gen):
    model = _encoder().eval()
    x = torch.randn(3, 6, 8, generator=gen)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = pad[2, 5:] = True
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)     # torch's fused / nested-tensor path
    inject_lora(model, ALL + ["linear1", "linear2"], r=2)
    assert model.use_nested_tensor is False
    with torch.no_grad():
        got = model(x, src_key_padding_mask=pad)
    keep = ~pad                                        # the nested path leaves padded positions at 0
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert dead_units(model, x, gen) == []


def test_torchvision_vision_transformer(gen):
    model = torchvision_vit(2).eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        want = model(x)
    inject_lora(model, ALL + ["heads.head"], r=2)
    assert len(lora_units(model)) == 9
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert dead_units(model, x, gen) == []


class SeqFirst(nn.Module):
    """A sequence-first encoder (the nn.Transformer default layout) with a classifier head."""

    def __init__(self):
        super().__init__()
        self.enc = _encoder(batch_first=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                   # x: (batch, seq, features)
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("build", ["vit", "seq-first-encoder"])
def test_per_sample_gradients_match_autograd(gen, build):
    """Private gradient with noise off and most samples clipped == the sum of each sample's own clipped
    gradient from autograd on a copy that never saw the privacy engine."""
    if build == "vit":
        net = torchvision_vit(1)
        b, x = 5, torch.randn(5, 3, 16, 16, generator=gen)
        targets = ALL + ["heads.head"]
    else:
        net = SeqFirst()
        b, x = 5, torch.randn(5, 7, 8, generator=gen)       # seq 7 != batch 5
        targets = ALL + ["head"]
    y = torch.randint(0, 3, (b,), generator=gen)
    ce = nn.functional.cross_entropy
    model, oracle = _prepare(net, gen, targets)
    got = _private_grads(model, lambda m: ce(m(x), y, reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: ce(m(x[i:i + 1]), y[i:i + 1]), b)
    _assert_close(got, want)


def test_save_adapter_refuses_converted_attention(tmp_path):
    from deer import save_adapter
    model = inject_lora(torchvision_vit(1), ALL + ["heads.head"], r=2)
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention .*no peft equivalent.*save_lora_state"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
