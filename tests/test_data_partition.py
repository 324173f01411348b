"""IID and Dirichlet partitioning: every sample exactly once, and alpha controls label skew."""
import numpy as np
import pytest

from deer.data import partition_dirichlet, partition_iid, prepare_data


def _covers_once(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_covers_once_and_balanced(gen):
    rng = np.random.default_rng(gen.initial_seed())
    labels = rng.integers(0, 7, size=1003)
    parts = partition_iid(labels, 9, seed=gen.initial_seed())
    _covers_once(parts, 1003)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _mean_label_entropy(labels, parts, k):
    ent = []
    for p in parts:
        c = np.bincount(labels[p], minlength=k) / len(p)
        c = c[c > 0]
        ent.append(-(c * np.log(c)).sum())
    return float(np.mean(ent))


def test_dirichlet_covers_once_and_alpha_controls_skew(gen):
    seed = gen.initial_seed()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=4000)
    skewed = partition_dirichlet(labels, 10, alpha=0.05, seed=seed)
    near_iid = partition_dirichlet(labels, 10, alpha=1000.0, seed=seed)
    _covers_once(skewed, 4000)
    _covers_once(near_iid, 4000)
    # IID clients see ~all 10 classes (entropy near log 10 = 2.30); alpha=0.05 clients see ~1-2.
    h_skew, h_iid = _mean_label_entropy(labels, skewed, 10), _mean_label_entropy(labels, near_iid, 10)
    assert h_iid > 2.2 and h_skew < 1.2, (seed, h_skew, h_iid)


def test_partition_errors():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(np.zeros(10, dtype=int), 2, alpha=0)
    with pytest.raises(ValueError, match="at least one sample"):
        partition_iid(np.zeros(3, dtype=int), 5)


def test_prepare_default_data_disjoint():
    d = prepare_data("digits", num_clients=3, partition="iid", public_classes=[0, 1, 2, 3, 4], seed=1)
    assert d.public is not None and set(d.public.y.unique().tolist()) <= {0, 1, 2, 3, 4}
    assert sum(len(c) for c in d.clients) == d.info["private"]
    # every image lands in exactly one place: public, dropped (public but not a public class), a client, test
    n = d.info["public"] + d.info["public_dropped"] + d.info["private"] + d.info["test"]
    assert n == 1797
    assert sum(len(c) for c in d.clients) + len(d.test) + len(d.public) + d.info["public_dropped"] == 1797
