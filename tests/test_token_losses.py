"""deer.losses.causal_lm_loss: per-sample token losses whose DP step matches a per-sample oracle
(HF Llama / GPT-2 with LoRA, unequal lengths, right and left padding), and why HF's batch token
mean is not such a loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

import deer
from deer.losses import causal_lm_loss
from deer.nn import lora_units

transformers = pytest.importorskip("transformers")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _loop_oracle(logits, labels, ignore_index=-100, shift=True):
    """Each sample alone: F.cross_entropy (mean) over its valid tokens, 0 when it has none."""
    out = []
    for lg, lb in zip(logits, labels):
        if shift:
            lg, lb = lg[:-1], lb[1:]
        keep = lb != ignore_index
        out.append(F.cross_entropy(lg[keep].float(), lb[keep]) if keep.any() else lg.sum() * 0.0)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# the loss itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [True, False])
def test_matches_per_sample_loop(gen, shift):
    b, T, V = 6, 11, 23
    logits = torch.randn(b, T, V, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(V, (b, T), generator=gen)
    labels[torch.rand(b, T, generator=gen) < 0.3] = -100
    labels[2] = -100                                  # a sample with no valid token
    ref = _loop_oracle(logits, labels, shift=shift)
    none = causal_lm_loss(logits, labels, shift=shift, reduction="none")
    assert none.shape == (b,) and none[2] == 0
    assert _rel(none, ref) < 1e-6
    assert abs(float(causal_lm_loss(logits, labels, shift=shift)) - float(ref.mean())) < 1e-5 * float(ref.mean())
    assert abs(float(causal_lm_loss(logits, labels, shift=shift, reduction="sum")) - float(ref.sum())) \
        < 1e-5 * float(ref.sum())


def test_all_ignored_sample_has_zero_finite_gradient(gen):
    b, T, V = 4, 7, 13
    logits = torch.randn(b, T, V, generator=gen).requires_grad_()
    labels = torch.randint(V, (b, T), generator=gen)
    labels[1] = -100
    labels[3, 1:] = -100                              # only its first label: nothing left after the shift
    for reduction in ("mean", "sum"):
        (g,) = torch.autograd.grad(causal_lm_loss(logits, labels, reduction=reduction), logits)
        assert torch.isfinite(g).all()
        assert (g[1] == 0).all() and (g[3] == 0).all() and g[0].abs().sum() > 0
    empty = causal_lm_loss(logits[:0], labels[:0])
    assert empty.item() == 0                          # an empty (Poisson) batch: 0, not NaN


def test_upcasts_and_custom_ignore_index(gen):
    logits = torch.randn(3, 6, 9, generator=gen)
    labels = torch.randint(9, (3, 6), generator=gen)
    labels[0, 2:] = 7
    out = causal_lm_loss(logits.bfloat16(), labels.int(), ignore_index=7, reduction="none")
    assert out.dtype == torch.float32
    assert _rel(out, _loop_oracle(logits.bfloat16(), labels, ignore_index=7)) < 1e-6


def test_rejects_bad_inputs():
    lg, lb = torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        causal_lm_loss(lg[0], lb)
    with pytest.raises(ValueError, match="logits"):
        causal_lm_loss(lg.long(), lb)
    with pytest.raises(TypeError, match="integer"):
        causal_lm_loss(lg, lb.float())
    with pytest.raises(TypeError, match="integer"):
        causal_lm_loss(lg, lb.bool())
    with pytest.raises(ValueError, match="batch, seq_len"):
        causal_lm_loss(lg, lb[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(lg, lb, reduction="token_mean")


# ---------------------------------------------------------------------------------------------
# HF causal LMs with LoRA through make_private, against a per-sample oracle
# ---------------------------------------------------------------------------------------------

V, T = 40, 14


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "lm_head"]


def _gpt2():
    # GPT-2's attention and MLP projections are transformers' Conv1D, adapted like Linear layers
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                 bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "lm_head"]


def _model(gen, build):
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        model, targets = build()
    deer.nn.inject_lora(model, targets, r=2, seed=0)
    with torch.no_grad():
        for _, u in lora_units(model):
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen) * 0.05)
    return model.eval()


def _factors(model):
    return [p for _, u in lora_units(model) for p in (u.lora_A, u.lora_B)]


def _batch(gen, b, left):
    """b rows of distinct lengths, padded right or left: mask 0 and label -100 on the pads (and, left
    padded, on the first real token, which the last pad would predict; the row alone has no such target)."""
    lens = torch.randperm(T - 2, generator=gen)[:b] + 3
    ids = torch.randint(1, V, (b, T), generator=gen)
    mask = torch.zeros(b, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        (mask[i, T - n:] if left else mask[i, :n]).fill_(1)
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(1) - 1).clamp_min(0)          # each row is positioned as if alone
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100           # left pad: no target predicted from a pad position
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos), labels


def _row(inputs, i):
    return {k: v[i:i + 1] for k, v in inputs.items()}


def _per_sample_grads(model, inputs, labels):
    """Sample i alone (its row, same padding): the flat gradient of its own mean token loss."""
    params = _factors(model)
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        causal_lm_loss(model(**_row(inputs, i)).logits, labels[i:i + 1], reduction="sum"), params)])
        for i in range(labels.shape[0])])


def _clipped_mean(g, C):
    return (g * (C / g.norm(dim=1, keepdim=True)).clamp(max=1)).sum(0) / g.shape[0]


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("build,b", [(_llama, 5), (_gpt2, 6)], ids=["llama", "gpt2"])
def test_make_private_matches_per_sample_oracle(gen, build, b, left, reduction):
    model = _model(gen, build)
    inputs, labels = _batch(gen, b, left)
    oracle_model = copy.deepcopy(model)               # before make_private: no capture
    g = _per_sample_grads(oracle_model, inputs, labels)
    norms = g.norm(dim=1)
    s = norms.sort().values
    C = float(s[0] + s[1]) / 2                        # clips all but the smallest one
    expected = _clipped_mean(g, C)
    assert (norms > C).sum() == b - 1
    i = int(torch.randint(b, (1,), generator=gen))    # a padded row computes as the sample alone
    keep = inputs["attention_mask"][i] == 1
    alone = causal_lm_loss(oracle_model(input_ids=inputs["input_ids"][i, keep][None]).logits, labels[i, keep][None])
    padded = causal_lm_loss(oracle_model(**_row(inputs, i)).logits, labels[i:i + 1])
    assert abs(alone.item() - padded.item()) < 1e-5 * alone.item()

    params = _factors(model)
    model, opt, _ = deer.make_private(model, torch.optim.SGD(params, lr=0.0), None, noise_multiplier=0.0,
                                      max_grad_norm=C, sample_rate=0.5, expected_batch_size=b, seed=0,
                                      phase="AB", loss_reduction=reduction)
    loss = causal_lm_loss(model(**inputs).logits, labels, reduction=reduction)
    loss.backward()
    opt.step()
    got = torch.cat([p.grad.flatten() for p in params])
    err = _rel(got, expected)
    print(f"{build.__name__} b={b} {'left' if left else 'right'} {reduction}: rel err {err:.2e}")
    assert err < 1e-4
    assert opt.last_step["batch_size"] == b


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("build,b", [(_llama, 5), (_gpt2, 6)], ids=["llama", "gpt2"])
def test_hf_token_mean_gives_wrong_per_sample_gradients(gen, build, b, left):
    """Why the engine refuses HF's `out.loss`: it is sum_i (n_i / N) L_i, so the per-sample gradient
    loss_reduction='mean' would recover is b n_i / N g_i, not g_i."""
    model = _model(gen, build)
    inputs, labels = _batch(gen, b, left)
    n = (labels[:, 1:] != -100).sum(1).double()
    per_sample = causal_lm_loss(model(**inputs).logits, labels, reduction="none")
    hf = model(**inputs, labels=labels).loss
    assert abs(hf.item() - float((n / n.sum() * per_sample.detach().double()).sum())) < 1e-5 * hf.item()
    g = _per_sample_grads(model, inputs, labels)
    hf_grad = torch.cat([x.flatten() for x in torch.autograd.grad(hf, _factors(model))])
    w = (n / n.sum()).float()
    assert _rel((w[:, None] * g).sum(0), hf_grad) < 1e-4       # HF's loss weights sample i by n_i / N
    # Without clipping (a sample both versions clip would hide the scale) the released means differ.
    wrong = _clipped_mean(b * w[:, None] * g, float("inf"))
    right = _clipped_mean(g, float("inf"))
    print(f"{build.__name__} {'left' if left else 'right'}: token-mean vs per-sample rel diff {_rel(wrong, right):.3f}")
    assert _rel(wrong, right) > 1e-2
    scale = b * w                                     # the sensitivity: a per-sample norm inflated or shrunk
    assert scale.max() > 1.05 and scale.min() < 0.95
