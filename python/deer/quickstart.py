"""A short, complete DP-LoRA fine-tune on data that ships with scikit-learn (the 8x8 digits):
pretrain a tiny timm ViT non-privately on a public half (digits 0-4), then fine-tune LoRA adapters
privately on the other half (all ten digits, disjoint images) with DEeR's alternating B/A phases,
regulated metric clipping and regulated noise, using the float64-capable reference DP step.
Prints loss, accuracy, the DP settings and epsilon from Opacus' RDP accountant.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference as ref
from .nn.lora import LoRALinear, lora_layers


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0      # (1797, 1, 8, 8)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def tiny_vit(num_classes=10):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=num_classes,
                             embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


def inject_qkv_lora(model: nn.Module, r: int) -> None:
    for blk in model.blocks:
        blk.attn.qkv = LoRALinear(blk.attn.qkv, r=r, alpha=2 * r, name="attn.qkv")


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    out = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return out


def run(epochs_pre: int = 8, rounds: int = 6, steps_per_phase: int = 10, batch: int = 64,
        sigma: float = 1.0, C: float = 1.0, lam: float = 1e-2, lr: float = 0.05, r: int = 4,
        delta: float = 1e-5, seed: int = 0, log=print):
    from opacus.accountants import RDPAccountant
    torch.manual_seed(seed)
    t0 = time.time()
    x, y = load_digits_tensors(seed)
    half = len(y) // 2
    pub = (y[:half] <= 4)
    x_pub, y_pub = x[:half][pub], y[:half][pub]
    x_priv, y_priv = x[half:], y[half:]
    n_test = len(y_priv) // 4
    x_test, y_test = x_priv[:n_test], y_priv[:n_test]
    x_tr, y_tr = x_priv[n_test:], y_priv[n_test:]

    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    log(f"[pretrain] public split: {len(y_pub)} images of digits 0-4 (non-private)")
    for ep in range(epochs_pre):
        perm = torch.randperm(len(y_pub))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x_pub[idx]), y_pub[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    log(f"[pretrain] done, loss {loss.item():.3f}; private-split test accuracy before fine-tuning "
        f"{accuracy(model, x_test, y_test):.3f}")

    for p in model.parameters():
        p.requires_grad_(False)
    inject_qkv_lora(model, r)
    model.head = LoRALinear(model.head, r=r, alpha=2 * r, name="head")  # every trained tensor is LoRA
    layers = lora_layers(model)
    n = len(y_tr)
    q = batch / n
    gen = torch.Generator().manual_seed(seed + 1)
    acc = RDPAccountant()
    log(f"[dp] private split n={n}, expected batch {batch} (Poisson q={q:.4f}), sigma={sigma}, C={C}, "
        f"lambda={lam}, rank={r}, DEeR phases B then A each round, metric clipping + regulated noise")
    for rnd in range(rounds):
        for phase in ("B", "A"):
            for lyr in layers:
                lyr.set_phase(phase)
            for _ in range(steps_per_phase):
                mask = torch.rand(n, generator=gen) < q
                idx = mask.nonzero().squeeze(1)
                for lyr in layers:
                    lyr.capture = True
                if len(idx) > 0:
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], reduction="sum")
                    loss.backward()
                    batches = []
                    for lyr in layers:
                        (xx, uu, gg), = lyr.pop_captured()
                        batches.append(ref.LayerBatch(xx, gg, lyr.lora_A.detach(), lyr.lora_B.detach(),
                                                      lyr.scale))
                    res = ref.dp_step(batches, phase, C, sigma, batch, metric="regulated",
                                      noise="regulated", lam=lam, generator=gen)
                    with torch.no_grad():
                        for lyr, gdict in zip(layers, res.grads):
                            p = lyr.lora_A if phase == "A" else lyr.lora_B
                            p -= lr * gdict[phase]
                    for lyr in layers:
                        lyr.lora_A.grad = lyr.lora_B.grad = None
                acc.step(noise_multiplier=sigma, sample_rate=q)
                for lyr in layers:
                    lyr.capture = False
        eps = acc.get_epsilon(delta)
        log(f"[round {rnd + 1}/{rounds}] loss/sample {loss.item() / max(1, len(idx)):.3f}  "
            f"test acc {accuracy(model, x_test, y_test):.3f}  epsilon {eps:.2f} (delta={delta})")
    log(f"[done] {time.time() - t0:.1f}s")
    return {"accuracy": accuracy(model, x_test, y_test), "epsilon": acc.get_epsilon(delta)}
