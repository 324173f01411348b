"""Model zoo (random init, small sizes): models deer did not build, each with the layer types and
options people bring. For every model:

* with the noise off, the private step (make_private, phase AB, deer's kernels) equals the mean of the
  jointly clipped per-sample gradients of an independent oracle: torch.func (vmap of grad) through
  peft's own LoRA layers (a peft model holding the same adapter), fp32, relative error < 1e-4, heads
  trained fully included;
* one private step with noise runs on the kernels, moves every trained tensor and is charged;
* the adapter deer saves reloads in peft (PeftModel.from_pretrained) with identical outputs.

Cases: timm ViT (fused qkv + a head trained fully), HF BERT (query/value with a rank pattern, the
classifier trained fully, padded batch), HF GPT-2 (Conv1D, causal LM loss with padding), HF Llama
(causal LM loss with padding), a timm ResNet (Conv2d targets), a model with an Embedding target, and
a peft-wrapped model (get_peft_model with modules_to_save and a rank pattern) converted by make_private.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

import deer
from deer.losses import causal_lm_loss
from deer.nn import FullLinear, LoRAEmbedding, inject_lora, lora_units
from deer.nn.lora import LoRAConv2d

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

C = 0.05       # below every per-sample norm here: clipping binds for nearly every sample
PREFIX = "base_model.model."


@dataclass
class Zoo:
    model: nn.Module                        # deer's (LoRA injected), or a peft model make_private converts
    base: nn.Module                         # the plain model the adapter belongs to
    batch: tuple                            # model inputs, one row per sample
    loss: Callable                          # loss(outputs, *targets) -> per-sample mean loss, (b,)
    targets: tuple
    is_peft: bool = False


class TokenNet(nn.Module):
    """Token ids -> an Embedding target -> a Linear target -> a head trained fully."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(23, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.tok(ids))).mean(1))


def _ce(out, y):
    return F.cross_entropy(out.logits if hasattr(out, "logits") else out, y, reduction="none")


def _lm(out, labels):
    return causal_lm_loss(out.logits, labels, reduction="none")


def _padded_lm_batch(gen, b, T, vocab):
    ids = torch.randint(1, vocab, (b, T), generator=gen)
    mask = torch.ones(b, T, dtype=torch.long)
    for i, n in enumerate([T, T - 3, T - 1, T - 5, T - 2][:b]):
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _case(name: str, gen) -> Zoo:
    torch.manual_seed(int(gen.initial_seed() % 10000))
    b = 5
    if name == "timm-vit":
        base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=16, patch_size=8,
                                 embed_dim=16, depth=1, num_heads=2).eval()
        model = inject_lora(copy.deepcopy(base), ["qkv", "proj"], r=2, alpha=4, modules_to_save=["head"])
        x, y = torch.randn(b, 3, 16, 16, generator=gen), torch.randint(0, 4, (b,), generator=gen)
        return Zoo(model, base, (x,), _ce, (y,))
    if name == "hf-bert":
        cfg = transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=16, num_labels=3)
        base = transformers.BertForSequenceClassification(cfg).eval()
        model = inject_lora(copy.deepcopy(base), ["query", "value"], r=2, alpha=4, rank_pattern={"value": 3},
                            modules_to_save=["classifier"])
        ids, mask, _ = _padded_lm_batch(gen, b, 7, 31)
        y = torch.randint(0, 3, (b,), generator=gen)
        return Zoo(model, base, (ids, mask), _ce, (y,))
    if name == "hf-gpt2":
        cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        base = transformers.GPT2LMHeadModel(cfg).eval()
        model = inject_lora(copy.deepcopy(base), ["c_attn", "c_proj"], r=2, alpha=4)
        ids, mask, labels = _padded_lm_batch(gen, b, 9, 37)
        return Zoo(model, base, (ids, mask), _lm, (labels,))
    if name == "hf-llama":
        cfg = transformers.LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        base = transformers.LlamaForCausalLM(cfg).eval()
        model = inject_lora(copy.deepcopy(base), ["q_proj", "k_proj", "v_proj", "o_proj"], r=2, alpha=4)
        ids, mask, labels = _padded_lm_batch(gen, b, 9, 41)
        return Zoo(model, base, (ids, mask), _lm, (labels,))
    if name == "timm-resnet":
        base = timm.create_model("resnet18", pretrained=False, num_classes=3, zero_init_last=False).eval()
        model = inject_lora(copy.deepcopy(base), [r"layer1\.0\.conv1", r"layer2\.0\.downsample\.0", "fc"], r=2,
                            alpha=4)
        x, y = torch.randn(b, 3, 16, 16, generator=gen), torch.randint(0, 3, (b,), generator=gen)
        return Zoo(model, base, (x,), _ce, (y,))
    if name == "embedding":
        base = TokenNet().eval()
        model = inject_lora(copy.deepcopy(base), ["tok", "mix"], r=3, alpha=6, modules_to_save=["head"])
        ids, y = torch.randint(0, 23, (b, 6), generator=gen), torch.randint(0, 5, (b,), generator=gen)
        return Zoo(model, base, (ids,), _ce, (y,))
    if name == "peft-wrapped":
        cfg = transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=16, num_labels=3)
        base = transformers.BertForSequenceClassification(cfg).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=2, lora_alpha=4, target_modules=["query", "key", "value"], modules_to_save=["classifier"],
                rank_pattern={"layer.1.attention.self.value": 4}))
        ids, mask, _ = _padded_lm_batch(gen, b, 7, 31)
        y = torch.randint(0, 3, (b,), generator=gen)
        return Zoo(model.eval(), base, (ids, mask), _ce, (y,), is_peft=True)
    raise ValueError(name)


CASES = ["timm-vit", "hf-bert", "hf-gpt2", "hf-llama", "timm-resnet", "embedding", "peft-wrapped"]


def _randomise(model, gen):
    """Non-zero B (and heads moved away from their init), as after some training."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_embedding_A" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        for _, u in lora_units(model):
            u.lora_B.add_(0.3 * torch.randn(u.lora_B.shape, generator=gen))


def _call(model, batch):
    if len(batch) == 2:
        return model(input_ids=batch[0], attention_mask=batch[1])
    return model(batch[0])


def _oracle(z: Zoo, tmp_path, gen) -> nn.Module:
    """A peft model holding the same adapter as z.model: peft's own layers, the oracle's model."""
    if z.is_peft:
        return copy.deepcopy(z.model)
    deer.save_adapter(z.model, tmp_path / "oracle")
    return peft.PeftModel.from_pretrained(copy.deepcopy(z.base), str(tmp_path / "oracle"), is_trainable=True).eval()


def _oracle_grads(oracle: nn.Module, z: Zoo) -> dict[str, torch.Tensor]:
    """torch.func: per-sample gradients of every trainable peft tensor (torch.func.grad of each
    sample's own loss through functional_call, one sample at a time: transformers' mask code branches
    on the data, which vmap refuses), clipped jointly to C, summed, / b."""
    params = {n: p.detach() for n, p in oracle.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in oracle.named_parameters() if not p.requires_grad}
    buffers = dict(oracle.named_buffers())

    def sample_loss(ps, *row):
        k = len(z.batch)
        inputs, state = tuple(t.unsqueeze(0) for t in row[:k]), ({**ps, **frozen}, buffers)
        if k == 2:
            out = functional_call(oracle, state, (), {"input_ids": inputs[0], "attention_mask": inputs[1]})
        else:
            out = functional_call(oracle, state, inputs)
        return z.loss(out, *(t.unsqueeze(0) for t in row[k:]))[0]

    b = z.batch[0].shape[0]
    per = [grad(sample_loss)(params, *(t[i] for t in (*z.batch, *z.targets))) for i in range(b)]
    g = {n: torch.stack([p[n] for p in per]) for n in params}
    norms = torch.sqrt(sum((v.double() ** 2).flatten(1).sum(1) for v in g.values()))
    c = torch.clamp(C / norms, max=1.0).float()
    return {n: (c.view(-1, *[1] * (v.dim() - 1)) * v).sum(0) / b for n, v in g.items()}


def _deer_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """deer's private gradients under peft's parameter names."""
    out = {}
    for n, u in lora_units(model):
        p = PREFIX + n.removeprefix(PREFIX)
        if isinstance(u, FullLinear):
            out[f"{p}.modules_to_save.default.weight"] = u.lora_B.grad[:, :u.base.in_features]
            if u.has_bias:
                out[f"{p}.modules_to_save.default.bias"] = u.lora_B.grad[:, -1]
        elif isinstance(u, LoRAEmbedding):
            out[f"{p}.lora_embedding_A.default"] = u.lora_A.grad
            out[f"{p}.lora_embedding_B.default"] = u.lora_B.grad
        else:
            a, bb = u.lora_A.grad, u.lora_B.grad
            if isinstance(u, LoRAConv2d):
                a = a.view(u.r, *u.base.weight.shape[1:])
                bb = bb.view(*bb.shape, 1, 1)
            out[f"{p}.lora_A.default.weight"] = a
            out[f"{p}.lora_B.default.weight"] = bb
    return out


def _private(model, z: Zoo, noise: float, seed: int = 0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0 if noise == 0 else 0.05)
    b = z.batch[0].shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = deer.make_private(model, opt, None, noise_multiplier=noise, max_grad_norm=C, sample_rate=0.1,
                                          expected_batch_size=float(b), seed=seed, loss_reduction="mean", phase="AB")
    z.loss(_call(model, z.batch), *z.targets).mean().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("name", CASES)
def test_zoo(name, gen, tmp_path):
    z = _case(name, gen)
    _randomise(z.model, gen)
    oracle = _oracle(z, tmp_path, gen)
    with torch.no_grad():   # peft and deer compute the same function
        torch.testing.assert_close(_logits(_call(z.model, z.batch)), _logits(_call(oracle, z.batch)),
                                   rtol=1e-5, atol=1e-5)
    want = _oracle_grads(oracle, z)

    # noise off: the private step's gradients are the oracle's clipped mean
    model, opt = _private(copy.deepcopy(z.model), z, 0.0)
    assert opt.last_step["clipped_fraction"] > 0.5
    got = _deer_grads(model)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    if name in ("timm-vit", "hf-bert", "embedding", "peft-wrapped"):
        assert any("modules_to_save" in n for n in got)      # heads trained fully are part of the check
    for n in want:
        err = float((got[n].double() - want[n].double()).norm() / want[n].double().norm())
        assert err < 1e-4, (n, err)

    # one noisy step on the kernels: every trained tensor moves, finitely, and the step is charged
    noisy = copy.deepcopy(z.model)
    before = {n: p.detach().clone() for n, p in noisy.named_parameters() if p.requires_grad}
    noisy, opt = _private(noisy, z, 1.0, seed=7)
    assert opt.steps_taken == 1 and opt.engine.get_epsilon(1e-5) > 0
    for _, u in lora_units(noisy):
        for f in u.trained:
            assert torch.isfinite(u.factor(f)).all()
    assert all(not torch.equal(p, before[n]) for n, p in noisy.named_parameters() if n in before and p.requires_grad)

    # the adapter deer saves reloads in peft with identical outputs
    deer.save_adapter(noisy, tmp_path / "saved")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(z.base), str(tmp_path / "saved")).eval()
    noisy.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(_call(loaded, z.batch)), _logits(_call(noisy, z.batch)),
                                   rtol=1e-5, atol=1e-5)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out
