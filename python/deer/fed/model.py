"""The backbone of federated runs: building it, loading a checkpoint, non-private pretraining.

LoRA goes in with deer.nn.inject_lora (FedConfig.lora_config(), seeded), and a client's whole state is
the flat deer.nn.get_lora_state dict (plain SGD keeps no optimizer state between rounds).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


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
