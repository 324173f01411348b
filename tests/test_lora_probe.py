"""Every LoRA branch deer injects is on the forward path: on each model family deer accepts, a nonzero
B moves the output of every unit (probed one unit at a time). A planted module that bypasses its
LoRA layer fails the probe. nn.MultiheadAttention (whose forward reads in_proj_weight and
out_proj.weight directly) is converted by inject_lora, so its q/k/v/out branches are live too."""
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


class SelfAttention(nn.Module):
    """A bare sequence-first nn.MultiheadAttention (torch's default layout) called as self-attention."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def torchvision_vit(num_layers=1):
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(num_layers)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=num_layers, num_heads=2, hidden_dim=8,
                            mlp_dim=16, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)          # torchvision zero-initialises the head
    return vit


ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)), ["0", "2"], lambda g: torch.randn(3, 5, generator=g), {}),
    "timm-fused-qkv": (tiny_vit, ["qkv", "attn.proj", "fc1", "fc2", "head"], lambda g: torch.randn(2, 3, 16, 16, generator=g), {}),
    "timm-sliced-qkv": (tiny_vit, ["qkv"], lambda g: torch.randn(2, 3, 16, 16, generator=g), {"qkv_slices": ("q", "k", "v")}),
    "hf-bert": (tiny_bert, ["query", "key", "value", "attention.output.dense", "intermediate.dense"], lambda g: {"input_ids": torch.randint(0, 50, (2, 5), generator=g)}, {}),
    "hf-llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                 lambda g: {"input_ids": torch.randint(0, 40, (2, 6), generator=g)}, {}),
    "torch-encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2),
                      ATTENTION + ["linear1", "linear2"], lambda g: torch.randn(2, 5, 8, generator=g), {}),
    "torch-mha-seq-first": (SelfAttention, ATTENTION,
                  lambda g: torch.randn(5, 2, 8, generator=g), {}),
    "torchvision-vit": (lambda: torchvision_vit(2), ATTENTION + [r".*mlp\.(0|3)", "heads.head"],
                        lambda g: torch.randn(2, 3, 16, 16, generator=g), {}),
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
