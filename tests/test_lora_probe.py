"""Every LoRA branch deer injects is on the forward path: on each model family deer accepts, a nonzero
B moves the output of every unit (probed one unit at a time). A planted module that bypasses its
LoRA layer fails the probe, and nn.MultiheadAttention (whose forward reads out_proj.weight directly)
is refused by inject_lora instead of becoming a silent no-op."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deer.nn import inject_lora, lora_units

from test_inject import tiny_bert, tiny_vit


def dead_units(model, x, gen) -> list[str]:
    """The LoRA units whose nonzero B leaves the model's output unchanged."""
    model.eval()
    units = lora_units(model)
    with torch.no_grad():
        for _, u in units:
            u.lora_B.zero_()
        out0 = model(x) if not isinstance(x, dict) else model(**x).last_hidden_state
        dead = []
        for name, u in units:
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=gen))
            out = model(x) if not isinstance(x, dict) else model(**x).last_hidden_state
            if torch.equal(out, out0):
                dead.append(name)
            u.lora_B.zero_()
    return dead


class Bypass(nn.Module):
    """Calls its projection's weight directly, as nn.MultiheadAttention does with out_proj."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def _llama():
    from transformers import LlamaConfig, LlamaModel
    return LlamaModel(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)), ["0", "2"], lambda g: torch.randn(3, 5, generator=g), {}),
    "timm-fused-qkv": (tiny_vit, ["qkv", "attn.proj", "fc1", "fc2", "head"], lambda g: torch.randn(2, 3, 16, 16, generator=g), {}),
    "timm-sliced-qkv": (tiny_vit, ["qkv"], lambda g: torch.randn(2, 3, 16, 16, generator=g), {"qkv_slices": ("q", "k", "v")}),
    "hf-bert": (tiny_bert, ["query", "key", "value", "attention.output.dense", "intermediate.dense"], lambda g: {"input_ids": torch.randint(0, 50, (2, 5), generator=g)}, {}),
    "hf-llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                 lambda g: {"input_ids": torch.randint(0, 40, (2, 6), generator=g)}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_injected_branch_is_live(gen, case):
    build, targets, inputs, kw = CASES[case]
    torch.manual_seed(gen.initial_seed() % (1 << 31))
    model = inject_lora(build(), targets, r=2, **kw)
    assert len(lora_units(model)) >= 2
    assert dead_units(model, inputs(gen), gen) == []


def test_probe_catches_a_bypassed_branch(gen):
    model = inject_lora(Bypass(), ["proj", "head"], r=2)
    assert dead_units(model, torch.randn(4, 6, generator=gen), gen) == ["proj"]


@pytest.mark.parametrize("build", ["mha", "encoder", "torchvision-vit"])
def test_multihead_attention_out_proj_is_refused(build):
    if build == "mha":
        model = nn.Sequential(nn.MultiheadAttention(8, 2))
    elif build == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=1, enable_nested_tensor=False)
    else:
        from torchvision.models.vision_transformer import VisionTransformer
        model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    with pytest.raises(ValueError, match=r"out_proj.*MultiheadAttention.*never run"):
        inject_lora(model, ["out_proj"], r=2)
    # the model's other Linear layers are fine (the MLP of the encoder layer / the ViT block)
    if build != "mha":
        inject_lora(model, ["linear1", "linear2"] if build == "encoder" else [r".*mlp\.(0|3)"], r=2)
        assert len(lora_units(model)) == 2
