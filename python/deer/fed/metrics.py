"""Test-set metrics: accuracy, macro precision/recall/F1 and one-vs-rest macro AUC (scikit-learn)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]).float().softmax(-1) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    p = predict_proba(model, x)
    if not torch.isfinite(p).all():
        return {"accuracy": math.nan, "precision": math.nan, "recall": math.nan, "f1": math.nan, "auc": math.nan}
    yt, pp = y.numpy(), p.double().numpy()
    pred = pp.argmax(1)
    labels = list(range(num_classes))
    prec, rec, f1, _ = precision_recall_fscore_support(yt, pred, labels=labels, average="macro", zero_division=0)
    present = np.unique(yt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if num_classes == 2:
                auc = roc_auc_score(yt, pp[:, 1])
            elif len(present) == num_classes:
                auc = roc_auc_score(yt, pp / pp.sum(1, keepdims=True), multi_class="ovr", average="macro", labels=labels)
            else:  # a class missing from the test set has no ROC curve: average over the present ones
                auc = float(np.mean([roc_auc_score(yt == c, pp[:, c]) for c in present]))
    except ValueError:
        auc = math.nan
    return {"accuracy": float((pred == yt).mean()), "precision": float(prec), "recall": float(rec),
            "f1": float(f1), "auc": float(auc)}
