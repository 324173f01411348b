"""LoRA on transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc: y = x W + b with W stored (in, out)):
inject_lora wraps it like a Linear. The output is unchanged with B = 0, every branch moves it, merge
folds the transposed delta, per-sample gradients through make_private equal per-sample autograd on a
copy that never saw the privacy engine, and the adapter reloads in peft with identical outputs."""
import copy

import pytest
import torch

from deer import save_adapter
from deer.losses import causal_lm_loss
from deer.nn import LoRALinear, inject_lora, lora_units

from test_lora_probe import dead_units
from test_reused_layers import _assert_close, _oracle_grads, _prepare, _private_grads

transformers = pytest.importorskip("transformers")
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _gpt2(head=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=41, n_positions=16, n_embd=12, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(cfg).eval()


def test_conv1d_is_wrapped_with_the_same_output_and_live_branches(gen):
    model = _gpt2(head=False)
    ids = torch.randint(0, 41, (3, 7), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    inject_lora(model, TARGETS, r=2)
    units = lora_units(model)
    assert len(units) == 8 and all(isinstance(u, LoRALinear) and u.fan_in_fan_out for _, u in units)
    c_attn = dict(units)["h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (12, 36)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want, rtol=0, atol=0)
    assert dead_units(model, {"input_ids": ids}, gen) == []
    # merge folds s (B A)^T into the (in, out) weight: same output as the unmerged branch
    with torch.no_grad():
        for _, u in units:
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
        live = model(input_ids=ids).last_hidden_state
        for _, u in units:
            u.merge()
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, live, rtol=1e-5, atol=1e-5)
        for _, u in units:
            u.unmerge()
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, live, rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_on_gpt2_match_autograd(gen):
    b, T = 5, 9
    ids = torch.randint(0, 41, (b, T), generator=gen)
    labels = ids.clone()
    lengths = torch.randint(3, T + 1, (b,), generator=gen)
    for i, n in enumerate(lengths.tolist()):                 # right padding of different lengths
        labels[i, n:] = -100
    mask = (labels != -100).long()
    model, oracle = _prepare(_gpt2(seed=int(gen.initial_seed() % 1000)), gen, TARGETS)
    got = _private_grads(model, lambda m: causal_lm_loss(m(input_ids=ids, attention_mask=mask).logits, labels,
                                                         reduction="sum").backward(), b)
    want = _oracle_grads(oracle, lambda m, i: causal_lm_loss(
        m(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits, labels[i:i + 1]), b)
    _assert_close(got, want)


def test_gpt2_adapter_reloads_in_peft(tmp_path, gen):
    peft = pytest.importorskip("peft")
    base = _gpt2()
    model = inject_lora(copy.deepcopy(base), TARGETS, r=2, alpha=4)
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 41, (2, 6), generator=gen)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
