"""Adapters saved by deer load into the same base model with peft and give the same outputs (and load
back into deer); qkv-slice adapters, which peft cannot represent, are refused with a clear error."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from deer.nn import get_lora_state, inject_lora, lora_layers, set_phase
from deer.privacy.checkpoint import load_adapter, load_lora_state, save_adapter, save_lora_state


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(self.proj(x))))


class Tiny(nn.Module):
    def __init__(self, d=12, classes=5):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def _trained(gen, base, targets, r, alpha):
    model = inject_lora(copy.deepcopy(base), targets, r=r, alpha=alpha)
    with torch.no_grad():
        for u in lora_layers(model):
            u.lora_A.copy_(torch.randn(u.lora_A.shape, generator=gen))
            u.lora_B.copy_(0.3 * torch.randn(u.lora_B.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("targets,r,alpha", [(["proj", "out", "head"], 4, 8.0), (["fc", "head"], 2, 3.0)])
def test_peft_loads_deer_adapter(gen, tmp_path, targets, r, alpha):
    from peft import PeftModel

    base = Tiny().eval()
    model = _trained(gen, base, targets, r, alpha)
    x = torch.randn(5, 7, 12, generator=gen)
    want = model(x)
    assert not torch.allclose(want, base(x))   # the adapter really changes the output
    save_adapter(model, str(tmp_path))
    cfg = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == r and cfg["lora_alpha"] == alpha

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-6, msg=f"seed {gen.initial_seed()}")

    # and back into deer
    other = inject_lora(copy.deepcopy(base), targets, r=r, alpha=alpha).eval()
    load_adapter(other, str(tmp_path))
    torch.testing.assert_close(other(x), want)


def test_mixed_ranks_use_rank_pattern(gen, tmp_path):
    from peft import PeftModel

    base = Tiny().eval()
    model = inject_lora(copy.deepcopy(base), ["proj", "out"], r=4, alpha=4.0)
    inject_lora(model, "head", r=2, alpha=6.0)
    with torch.no_grad():
        for u in lora_layers(model):
            u.lora_B.normal_()
    model.eval()
    x = torch.randn(3, 4, 12, generator=gen)
    save_adapter(model, str(tmp_path))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-6)


def test_qkv_slices_are_refused_and_deer_format_works(gen, tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=24, depth=1, num_heads=2)
    model = inject_lora(vit, ["qkv", "head"], r=2, qkv_slices=("q", "k", "v"))
    with pytest.raises(ValueError, match="qkv_slices=None"):
        save_adapter(model, str(tmp_path / "peft"))
    set_phase(model, "B")
    with torch.no_grad():
        for u in lora_layers(model):
            u.lora_B.normal_()
    save_lora_state(model, str(tmp_path / "deer.safetensors"))
    fresh = VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=24, depth=1, num_heads=2)
    fresh = inject_lora(fresh, ["qkv", "head"], r=2, qkv_slices=("q", "k", "v"))
    load_lora_state(fresh, str(tmp_path / "deer.safetensors"))
    for k, v in get_lora_state(model).items():
        torch.testing.assert_close(get_lora_state(fresh)[k], v)


def test_path_arguments_round_trip(gen, tmp_path):
    from peft import PeftModel

    base = Tiny().eval()
    model = _trained(gen, base, ["proj", "head"], 2, 4.0)
    x = torch.randn(3, 4, 12, generator=gen)
    where = tmp_path / "nested" / "adapter"
    save_adapter(model, where, base_model_name_or_path=tmp_path / "base")
    cfg = json.load(open(where / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), where).eval()
    want = model(x)
    torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-6, msg=f"seed {gen.initial_seed()}")


@pytest.mark.parametrize("fail", ["json.dump", "safetensors"])
def test_failed_save_changes_nothing(gen, tmp_path, monkeypatch, fail):
    import safetensors.torch

    from deer.privacy import checkpoint

    base = Tiny().eval()
    old = tmp_path / "old"
    save_adapter(_trained(gen, base, ["proj"], 2, 2.0), old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")
    if fail == "json.dump":
        monkeypatch.setattr(checkpoint.json, "dump", boom)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    model = _trained(gen, base, ["proj", "out"], 4, 8.0)
    for target in (tmp_path / "new", old):
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]   # no new folder, no temporary folder
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
