"""inject_lora on timm ViT (fused qkv: one LoRALinear by default, or per-slice factors), HF BERT
(query/key/value), name/regex/type targets, phases and the LoRA state exchange the federated trainer
uses."""
import pytest
import torch
import torch.nn as nn

from deer.nn import (LoRALinear, LoRAQKV, get_lora_state, get_phase, inject_lora, lora_layers, lora_units,
                     set_lora_state, set_phase)


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=5, embed_dim=24, depth=2,
                             num_heads=2, mlp_ratio=2.0)


def tiny_bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg)


def test_vit_qkv_slices_and_head(gen):
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    y0 = model(x)
    inject_lora(model, ["qkv", "head"], r=4, alpha=8, qkv_slices=("q", "k", "v"))
    for blk in model.blocks:
        assert isinstance(blk.attn.qkv, LoRAQKV) and tuple(blk.attn.qkv.slices) == ("q", "k", "v")
    assert isinstance(model.head, LoRALinear)
    assert len(lora_layers(model)) == 2 * 3 + 1
    torch.testing.assert_close(model(x), y0)        # B = 0: the model is unchanged at injection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert "blocks.0.attn.qkv.slices.q.lora_A" in trainable


def test_vit_qkv_subset_and_plain():
    model = inject_lora(tiny_vit(), "qkv", r=2, qkv_slices=("q", "v"))
    assert tuple(model.blocks[1].attn.qkv.slices) == ("q", "v")
    model = inject_lora(tiny_vit(), "qkv", r=2, qkv_slices=None)
    assert type(model.blocks[0].attn.qkv) is LoRALinear
    model = inject_lora(tiny_vit(), "qkv", r=2)           # the default: one LoRALinear on the fused qkv
    assert all(type(b.attn.qkv) is LoRALinear for b in model.blocks)


def test_bert_attention_projections(gen):
    model = tiny_bert().eval()
    ids = torch.randint(0, 50, (3, 9), generator=gen)
    y0 = model(input_ids=ids).last_hidden_state
    inject_lora(model, ["query", "key", "value"], r=4)
    names = [n for n, _ in lora_units(model)]
    assert len(names) == 6 and all(n.split(".")[-1] in ("query", "key", "value") for n in names)
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, y0)


def test_regex_type_and_callable_targets():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    inject_lora(m, r"2\.\d", r=2)
    assert [n for n, _ in lora_units(m)] == ["2.0", "2.1"]
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    inject_lora(m, nn.Linear, r=2)
    assert len(lora_layers(m)) == 2
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    inject_lora(m, lambda name, mod: isinstance(mod, nn.Linear) and mod.out_features == 2, r=1)
    assert [n for n, _ in lora_units(m)] == ["1"]
    # injecting again does not wrap LoRA layers (or their frozen base) a second time
    with pytest.raises(ValueError, match="no module matched"):
        inject_lora(m, "1", r=1)


def test_phase_and_state_roundtrip(gen):
    model = inject_lora(tiny_vit(), ["qkv", "head"], r=3)
    set_phase(model, "B")
    assert get_phase(model) == "B"
    assert all(not u.lora_A.requires_grad and u.lora_B.requires_grad for u in lora_layers(model))
    state = get_lora_state(model, factors=("B",))
    assert set(state) == {f"{n}.lora_B" for n, _ in lora_units(model)}
    new = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    set_lora_state(model, new)
    got = get_lora_state(model, factors=("B",))
    for k in new:
        torch.testing.assert_close(got[k], new[k])
    other = inject_lora(tiny_vit(), ["qkv", "head"], r=3)
    set_lora_state(other, get_lora_state(model), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    other.load_state_dict(model.state_dict())   # same base weights too
    torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_state_errors(gen):
    model = inject_lora(tiny_vit(), "head", r=2)
    with pytest.raises(KeyError, match="not LoRA factors"):
        set_lora_state(model, {"head.weight": torch.zeros(5, 24)})
    with pytest.raises(ValueError, match="shape"):
        set_lora_state(model, {"head.lora_A": torch.zeros(3, 24)})
    with pytest.raises(ValueError, match="NaN"):
        set_lora_state(model, {"head.lora_A": torch.full((2, 24), float("nan"))})
    with pytest.raises(KeyError, match="missing"):
        set_lora_state(model, {"head.lora_A": torch.zeros(2, 24)}, strict=True)
    with pytest.raises(ValueError, match="factors"):
        get_lora_state(model, factors=("C",))
