"""Backbone, LoRA adapters and their state for federated runs.

One backbone lives in memory; a client's whole state is the adapter dict
{layer name: {"A": (r, n), "B": (m, r)}} (plain SGD keeps no optimizer state between rounds).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.lora import LoRALinear, lora_layers

AdapterState = dict[str, dict[str, torch.Tensor]]


def build_backbone(name: str, num_classes: int, in_chans: int, model_kwargs: dict | None = None,
                   checkpoint: str | None = None, log=print) -> nn.Module:
    """A timm model by name, randomly initialised (never downloads), optionally loaded from a local
    safetensors / .pth file. A classifier head whose shape does not match num_classes is left at
    its fresh initialisation (reported)."""
    import timm
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                  **(model_kwargs or {}))
    except Exception as e:
        raise ValueError(f"cannot build timm model {name!r} with {model_kwargs}: {e}") from e
    if checkpoint:
        load_checkpoint(model, checkpoint, log)
    return model


def load_checkpoint(model: nn.Module, path: str, log=print) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict")
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    head = {n for n in own if n.startswith(("head.", "fc.", "classifier."))}
    bad = [k for k in skipped if k not in head]
    if bad:
        raise ValueError(f"checkpoint {path!r} does not fit the model: shape mismatch at {bad[:5]} "
                         "(wrong model name or model_kwargs?)")
    sd = {k: v for k, v in sd.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    log(f"[model] loaded {path}" + (f"; classifier head re-initialised ({skipped})" if skipped else ""))


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
             batch_size: int = 64) -> float:
    """Non-private full fine-tuning on the public split (AdamW). Returns the last batch loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())


def inject_lora(model: nn.Module, targets: list[str], r: int, alpha: float, seed: int) -> list[str]:
    """Freeze the backbone and wrap every nn.Linear whose qualified name ends with one of `targets`
    in a LoRALinear. The LoRA A init (kaiming-uniform) is drawn from `seed`, so every party that
    builds the model with the same seed starts from the same adapters. Returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear matches lora_targets={targets}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for n in names:
            parent, _, attr = n.rpartition(".")
            mod = model.get_submodule(parent) if parent else model
            setattr(mod, attr, LoRALinear(getattr(mod, attr), r=min(r, *getattr(mod, attr).weight.shape),
                                          alpha=alpha, name=n))
    finally:
        torch.random.set_rng_state(state)
    return names


def named_lora(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_adapters(model: nn.Module) -> AdapterState:
    return {n: {"A": m.lora_A.detach().clone(), "B": m.lora_B.detach().clone()} for n, m in named_lora(model).items()}


@torch.no_grad()
def set_adapters(model: nn.Module, state: AdapterState) -> None:
    layers = named_lora(model)
    if set(layers) != set(state):
        raise ValueError(f"adapter state has layers {sorted(state)} but the model has {sorted(layers)}")
    for n, m in layers.items():
        for f, p in (("A", m.lora_A), ("B", m.lora_B)):
            t = state[n][f]
            if t.shape != p.shape:
                raise ValueError(f"adapter {n}.{f}: shape {tuple(t.shape)} != model's {tuple(p.shape)}")
            p.copy_(t)


def set_phase(model: nn.Module, phase: str) -> None:
    for m in lora_layers(model):
        m.set_phase(phase)


def flatten_adapters(state: AdapterState) -> dict[str, torch.Tensor]:
    return {f"{n}.lora_{f}": t for n, d in state.items() for f, t in d.items()}


def unflatten_adapters(flat: dict[str, torch.Tensor]) -> AdapterState:
    out: AdapterState = {}
    for k, t in flat.items():
        n, _, f = k.rpartition(".lora_")
        out.setdefault(n, {})[f] = t
    return out
