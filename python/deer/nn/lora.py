"""LoRALinear: a drop-in replacement for nn.Linear with a LoRA branch whose backward hands the
layer's input and output gradient to the DP machinery (no Python hooks on the hot path).

    y = x W^T + b + s * dropout(x) A^T B^T,     A: (r, n) kaiming-uniform(a=sqrt(5)), B: (m, r) zeros

During a private step (`capture=True`) the custom autograd Function stores, per physical batch,
X = dropout(x) (b, T, n), U = X A^T (b, T, r) and G = dL/dy (b, T, m): everything the per-sample
gradient kernels need. The summed gradients of A and B are still produced as usual, so the same
layer serves non-private training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reference import check_phase


class _LoRABranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scale, layer):
        u = x @ A.T
        ctx.save_for_backward(x, u, A, B)
        ctx.scale = scale
        ctx.layer = layer
        return (u @ B.T) * scale

    @staticmethod
    def backward(ctx, gout):
        x, u, A, B = ctx.saved_tensors
        s = ctx.scale
        layer = ctx.layer
        v = gout @ B                      # (..., r): dL/du / s
        gx = (v @ A) * s if ctx.needs_input_grad[0] else None
        gA = gB = None
        if ctx.needs_input_grad[1]:
            gA = s * v.reshape(-1, v.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            gB = s * gout.reshape(-1, gout.shape[-1]).T @ u.reshape(-1, u.shape[-1])
        if layer is not None and layer.capture:
            layer._captured.append((x.detach(), u.detach(), gout.detach()))
        return gx, gA, gB, None, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 name: str = ""):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}"
                            + (f" at {name!r}" if name else ""))
        m, n = base.out_features, base.in_features
        if not (isinstance(r, int) and 1 <= r <= min(m, n)):
            raise ValueError(f"LoRA rank must be an integer in [1, min(out, in)] = [1, {min(m, n)}] for "
                             f"{name or 'this layer'} ({m}x{n}), got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha if alpha is not None else r)
        self.scale = self.alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, n, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(m, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name
        self.capture = False
        self._captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.merged = False
        self.phase = "AB"

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def set_phase(self, phase: str):
        """'A': train A (B frozen); 'B': train B (A frozen); 'AB': train both."""
        self.phase = check_phase(phase)
        self.lora_A.requires_grad_(phase in ("A", "AB"))
        self.lora_B.requires_grad_(phase in ("B", "AB"))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        if self.merged:
            return y
        return y + _LoRABranch.apply(self.dropout(x), self.lora_A, self.lora_B, self.scale, self)

    def pop_captured(self):
        out, self._captured = self._captured, []
        return out

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, phase={self.phase}"


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]
