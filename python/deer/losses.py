"""Per-sample losses for sequence models that keep DP-SGD's sensitivity bound.

Clipping bounds the gradient of one record only if that gradient does not depend on the other
records: the loss must be a sum (or a mean over the physical batch) of per-sample losses, one per
record. HF causal LMs' default `out.loss` is the mean over all N valid tokens of the batch, i.e.
sum_i (n_i / N) L_i with L_i sample i's mean token loss: sample i is weighted by n_i / N, which
depends on the other samples' lengths, so the per-sample gradient the engine recovers (times b for
loss_reduction='mean') is b n_i / N times the true one and the clipping is of the wrong quantity.

    out = model(input_ids=ids, attention_mask=mask)                  # no labels= : no token-mean loss
    loss = deer.losses.causal_lm_loss(out.logits, labels)            # with make_private(loss_reduction="mean")
    loss = deer.losses.causal_lm_loss(out.logits, labels, reduction="sum")   # loss_reduction="sum"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
                   reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy with each sample's own loss = mean over ITS valid tokens.

    logits (b, T, V), labels (b, T) integer. shift=True: logits[:, :-1] predict labels[:, 1:] (as HF
    does); shift=False: logits[:, t] predict labels[:, t]. Tokens whose label is ignore_index do not
    count. Computed in float32 (the logits are upcast). reduction: 'mean' over the b samples (use with
    make_private(loss_reduction='mean')), 'sum' (loss_reduction='sum') or 'none' (the (b,) losses).
    A sample with no valid token has loss 0, and so gradient 0 (not NaN): it still counts in b.
    Left padding: label the first real token ignore_index too, or it counts as predicted by a pad.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"causal_lm_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"causal_lm_loss: logits must be a floating tensor (batch, seq_len, vocab), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
                         f"{' of dtype ' + str(logits.dtype) if isinstance(logits, torch.Tensor) else ''}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"causal_lm_loss: labels must be an integer tensor (batch, seq_len), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: labels {tuple(labels.shape)} must be (batch, seq_len) = "
                         f"{tuple(logits.shape[:2])} of logits {tuple(logits.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    labels = labels.long()
    tok = F.cross_entropy(logits.float().reshape(b * t, v), labels.reshape(b * t), ignore_index=ignore_index,
                          reduction="none").view(b, t)   # 0 (and no gradient) at ignored tokens
    n = (labels != ignore_index).sum(1)
    per_sample = tok.sum(1) / n.clamp_min(1)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total if reduction == "sum" else total / max(b, 1)   # an empty batch: 0, not NaN
