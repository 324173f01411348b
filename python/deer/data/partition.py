"""Splitting a training set across clients: IID and Dirichlet non-IID (label skew).

Both return one int64 index array per client; together they cover every sample exactly once.
"""
from __future__ import annotations

import numpy as np


def _check(labels, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not (isinstance(num_clients, (int, np.integer)) and num_clients >= 1):
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if len(labels) < num_clients:
        raise ValueError(f"cannot split {len(labels)} samples across {num_clients} clients: every client "
                         "needs at least one sample")
    return labels


def partition_iid(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal the samples out in near-equal shares."""
    labels = _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(labels, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1,
                        max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: for each class c draw proportions p_c ~ Dir(alpha * 1_K) over the K clients
    and hand out that class's samples accordingly. Small alpha -> each client sees few classes;
    large alpha -> close to IID. Redraws (up to max_tries) until every client has min_size samples."""
    labels = _check(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0 (small = strongly non-IID), got {alpha}")
    if min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        out = [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"Dirichlet split with alpha={alpha} left a client with fewer than {min_size} samples "
                     f"after {max_tries} draws: raise alpha, lower min_size or use fewer clients")
