"""nn.MultiheadAttention with its four projections as Linear children, so LoRA can adapt them.

torch's `nn.MultiheadAttention.forward` reads `in_proj_weight` and `out_proj.weight` directly (through
`F.multi_head_attention_forward` or a fused kernel), so a LoRA layer put in place of `out_proj` would
never run, and q, k, v have no module at all. `LinearMultiheadAttention` computes the same function
with `q_proj`, `k_proj`, `v_proj` and `out_proj` called as modules; `inject_lora` swaps it in for every
MHA one of whose projections is a target.

Two layout rules matter for per-sample gradients (deer reads dim 0 of every LoRA layer's input as the
sample): a sequence-first MHA (`batch_first=False`) has its inputs transposed to (batch, seq, features)
*before* the projections, and an unbatched call (seq, features) becomes a batch of one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _additive(mask: torch.Tensor | None, what: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = may not attend) as -inf / 0, a float mask as is (added to the scores)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{what}: only bool and floating-point masks are supported, got {mask.dtype}")
    return mask.to(dtype)


class LinearMultiheadAttention(nn.Module):
    """The function of `nn.MultiheadAttention` (same arguments, outputs and state-dict loading), with
    the projections as `nn.Linear` modules. Build one from an existing MHA with `from_mha`.

    `add_bias_kv` and `add_zero_attn` are not supported (`from_mha` refuses them)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        f = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias, **f)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias, **f)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias, **f)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias, **f)
        # torch's Transformer layers read these to decide on their fused fast path, which would bypass
        # the projection modules; these values make them call this module's forward instead.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._register_load_state_dict_pre_hook(self._mha_keys)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> "LinearMultiheadAttention":
        """The equivalent module, with copies of `mha`'s weights (same device, dtype, requires_grad and
        training mode)."""
        where = f"nn.MultiheadAttention {name!r}" if name else "nn.MultiheadAttention"
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{where} uses add_bias_kv={mha.bias_k is not None}, add_zero_attn={mha.add_zero_attn}; "
                             "deer's LoRA attention does not implement the extra key/value position these add. "
                             "Leave this module out of target_modules or build it without them.")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.out_proj.bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.load_state_dict(mha.state_dict())
        src = {"out_proj.weight": w, "out_proj.bias": mha.out_proj.bias}
        for p in PROJECTIONS[:3]:
            src[f"{p}.weight"] = mha.in_proj_weight if mha._qkv_same_embed_dim else getattr(mha, f"{p}_weight")
            src[f"{p}.bias"] = mha.in_proj_bias
        for k, p in new.named_parameters():
            p.requires_grad_(src[k].requires_grad)
        return new.train(mha.training)

    def _mha_keys(self, state_dict, prefix, *args):
        """Load an nn.MultiheadAttention state dict: in_proj_* (or q/k/v_proj_weight) split into the
        three projections; out_proj.* has the same names in both."""
        E = self.embed_dim
        for kind in ("weight", "bias"):
            fused = state_dict.pop(prefix + f"in_proj_{kind}", None)
            if fused is not None:
                if fused.shape[0] != 3 * E:
                    raise ValueError(f"{prefix}in_proj_{kind} has shape {tuple(fused.shape)}; expected first dim 3 x {E}")
                for p, part in zip(PROJECTIONS[:3], fused.split(E)):
                    state_dict[prefix + f"{p}.{kind}"] = part
        for p in PROJECTIONS[:3]:
            separate = state_dict.pop(prefix + f"{p}_weight", None)
            if separate is not None:
                state_dict[prefix + f"{p}.weight"] = separate

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (as for nn.MultiheadAttention): pass the causal "
                               "mask, e.g. nn.Transformer.generate_square_subsequent_mask(seq_len)")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # before the projections: their inputs must be (batch, seq, features)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, _ = query.shape
        S, H, D = key.shape[1], self.num_heads, self.head_dim
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must have the same batch and sequence sizes, got {tuple(key.shape)} "
                             f"and {tuple(value.shape)}")
        q = self.q_proj(query).view(N, L, H, D).transpose(1, 2)
        k = self.k_proj(key).view(N, S, H, D).transpose(1, 2)
        v = self.v_proj(value).view(N, S, H, D).transpose(1, 2)

        scores = (q * D ** -0.5) @ k.transpose(-2, -1)                       # (N, H, L, S)
        mask = _additive(attn_mask, "attn_mask", scores.dtype)
        if mask is not None:
            if mask.shape == (L, S):
                scores = scores + mask
            elif mask.shape == (N * H, L, S):
                scores = scores + mask.view(N, H, L, S)
            else:
                raise ValueError(f"attn_mask has shape {tuple(mask.shape)}; expected {(L, S)} or {(N * H, L, S)}")
        pad = _additive(key_padding_mask, "key_padding_mask", scores.dtype)
        if pad is not None:
            if pad.shape != (N, S):
                raise ValueError(f"key_padding_mask has shape {tuple(pad.shape)}; expected {(N, S)}")
            scores = scores + pad.view(N, 1, 1, S)
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
