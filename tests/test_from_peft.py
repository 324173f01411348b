"""peft models in: from_peft (and make_private on a PeftModel) turns peft's LoRA layers into deer's,
sharing the tensors, with the same forward; per-sample gradients through make_private equal per-sample
autograd through peft's own layers (an unconverted copy); deer's save reloads in peft with identical
outputs; the peft options deer cannot honour are refused by name."""
import copy
import warnings

import pytest
import torch

import deer
from deer.losses import causal_lm_loss
from deer.nn import LoRALinear, from_peft, lora_units

from test_reused_layers import C, _assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=41, n_positions=16, n_embd=12, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _peft(gen, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_gpt2(), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True},
                                {"rank_pattern": {"h.0.attn.c_attn": 2}, "alpha_pattern": {"h.1.mlp.c_fc": 3}}],
                         ids=["plain", "rslora", "patterns"])
def test_conversion_keeps_the_forward_and_shares_tensors(gen, kw):
    model = _peft(gen, **kw)
    ids = torch.randint(0, 41, (3, 7), generator=gen)
    factors = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        want = model(input_ids=ids).logits
    from_peft(model)
    units = lora_units(model)
    assert len(units) == 4 and all(isinstance(u, LoRALinear) for _, u in units)
    shared = {id(p) for _, u in units for p in (u.lora_A, u.lora_B)}
    assert shared == {id(p) for p in factors.values()}                 # the optimizer's tensors, not copies
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    if "rank_pattern" in kw:
        assert dict(units)["base_model.model.transformer.h.0.attn.c_attn"].r == 2


def test_make_private_on_a_peft_model_matches_autograd_through_peft(gen):
    b, T = 5, 8
    ids = torch.randint(0, 41, (b, T), generator=gen)
    labels = ids.clone()
    for i, n in enumerate(torch.randint(3, T + 1, (b,), generator=gen).tolist()):
        labels[i, n:] = -100
    model = _peft(gen)
    oracle = copy.deepcopy(model)                    # stays a peft model: peft's own LoRA forward
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(model, torch.optim.SGD(params, lr=0.0), None, noise_multiplier=0.0,
                                          max_grad_norm=C, sample_rate=0.5, expected_batch_size=float(b), seed=0,
                                          loss_reduction="sum", phase="AB")
    causal_lm_loss(model(input_ids=ids).logits, labels, reduction="sum").backward()
    opt.step()
    assert opt.last_step["clipped_fraction"] > 0.5
    got = [p.grad.clone() for p in params]
    oparams = [p for n, p in oracle.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in oparams]
    for i in range(b):
        gs = torch.autograd.grad(causal_lm_loss(oracle(input_ids=ids[i:i + 1]).logits, labels[i:i + 1]), oparams)
        c = min(1.0, C / float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs))))
        for t, g in zip(total, gs):
            t += c * g
    _assert_close(got, [t / b for t in total])


def test_deer_save_of_a_converted_peft_model_reloads_in_peft(tmp_path, gen):
    model = from_peft(_peft(gen))
    deer.save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 41, (2, 6), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # and deer loads it back into the converted model
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.zero_()
    deer.load_adapter(model, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,why", [
    ({"use_dora": True}, r"uses DoRA"),
    ({"bias": "all"}, r"trains biases \(bias='all'\)"),
    ({"bias": "lora_only"}, r"trains biases \(bias='lora_only'\)"),
], ids=["dora", "bias-all", "bias-lora-only"])
def test_peft_options_deer_cannot_honour_are_refused(gen, kw, why):
    model = _peft(gen, **kw)
    with pytest.raises(ValueError, match=rf"from_peft: adapter 'default' {why}"):
        from_peft(model)


def test_adapters_other_than_lora_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_gpt2(), peft.IA3Config(target_modules=["c_attn", "c_fc"],
                                                            feedforward_modules=["c_fc"]))
    with pytest.raises(ValueError, match=r"from_peft: adapter 'default' is (PeftType\.)?IA3; deer converts LoRA "
                                         r"adapters only"):
        from_peft(model)


def test_modules_to_save_other_than_linear_are_refused(gen):
    """A Linear in modules_to_save trains fully (tests/test_full_layers.py); other module types are
    refused by name."""
    model = _peft(gen, modules_to_save=["ln_f"])
    with pytest.raises(ValueError, match=r"from_peft: 'base_model.model.transformer.ln_f' \(modules_to_save\) is a "
                                         r"LayerNorm; deer trains nn.Linear modules fully"):
        from_peft(model)


def test_two_adapters_and_merged_layers_are_refused(gen):
    model = _peft(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\].*delete the others"):
        from_peft(model)
    model = _peft(gen)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"is merged into its base weight.*unmerge_adapter"):
        from_peft(model)


def test_lora_bias_and_other_conv_lora_are_refused(gen):
    model = _peft(gen, lora_bias=True)
    with pytest.raises(ValueError, match=r"from_peft: '.*' has a LoRA bias \(lora_bias=True\); its gradient would "
                                         r"escape clipping"):
        from_peft(model)
    net = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.Flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"is peft's LoRA on a Conv1d; deer converts LoRA on Linear, Conv1D, Conv2d "
                                         r"and Embedding layers only"):
        from_peft(pm)
