"""From a data set name or path to what a federated run needs: a public split (for the non-private
pretraining of the small default backbone), one private training shard per client, and a test set."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .datasets import ArrayDataset, load_digits, load_image_folder, load_npz
from .partition import partition_dirichlet, partition_iid


@dataclass
class FedData:
    public: ArrayDataset | None
    clients: list[ArrayDataset]
    test: ArrayDataset
    info: dict = field(default_factory=dict)
    val: ArrayDataset | None = None   # public validation split (all classes, never a client's or pretrained on)

    @property
    def num_classes(self) -> int:
        return self.test.num_classes


def _concat(parts: list[ArrayDataset], name: str) -> ArrayDataset:
    return ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].classes, name)


def load_dataset(spec: str, image_size: int = 32, mode: str = "RGB") -> dict[str, ArrayDataset]:
    """'digits' -> the bundled default; a folder -> image-folder loader; a .npz -> MedMNIST loader.
    Every source is resized to image_size x image_size; `mode` applies to image folders (a .npz keeps
    the channels it stores)."""
    if spec in ("digits", "sklearn-digits", "default"):
        return {"all": load_digits(image_size)}
    if os.path.isdir(spec):
        return load_image_folder(spec, image_size=image_size, mode=mode)
    if spec.endswith(".npz"):
        return load_npz(spec, image_size=image_size)
    raise ValueError(f"data set {spec!r} is neither 'digits', an image folder nor a .npz file")


def prepare_data(dataset: str = "digits", *, num_clients: int = 4, partition: str = "dirichlet",
                 alpha: float = 0.5, seed: int = 0, image_size: int = 16, mode: str = "RGB",
                 public_fraction: float = 0.5, public_classes: list[int] | None = None,
                 test_fraction: float = 0.25, val_fraction: float = 0.0, max_train: int | None = None) -> FedData:
    """Split a data set for a federated run.

    Without a test (or val) split, test_fraction of the data is held out for testing. A
    public_fraction of the remaining data (optionally restricted to public_classes) is set aside as
    the public split the default backbone is pretrained on, non-privately; the rest is private and is
    partitioned across num_clients by `partition` ('iid' or 'dirichlet' with `alpha`). Splits are
    disjoint; public images that are not in public_classes are dropped from training and reported.
    val_fraction > 0 first holds out that share of the training data (all classes) as a public
    validation split, for model selection that does not look at private records or the test split.
    """
    splits = load_dataset(dataset, image_size, mode)
    rng = np.random.default_rng(seed)
    info = {"dataset": dataset}
    if "test" in splits or "val" in splits:
        test = splits.get("test") or splits["val"]
        pool = [s for k, s in splits.items() if k not in ("test",) and s is not test]
        if not pool:
            raise ValueError(f"{dataset!r} has only a test split: a training split is needed too")
        train = _concat(pool, "train")
    else:
        full = splits["all"]
        perm = rng.permutation(len(full))
        n_test = int(round(test_fraction * len(full)))
        if not 0 < n_test < len(full):
            raise ValueError(f"test_fraction={test_fraction} leaves no test or no training data for {len(full)} samples")
        test, train = full.subset(perm[:n_test], "test"), full.subset(perm[n_test:], "train")
    info["note"] = next(iter(splits.values())).info.get("note", "")
    val = None
    if val_fraction > 0:
        perm = rng.permutation(len(train))
        n_val = int(round(val_fraction * len(train)))
        if not 0 < n_val < len(train):
            raise ValueError(f"val_fraction={val_fraction} leaves no validation or no training data for {len(train)} samples")
        val, train = train.subset(np.sort(perm[:n_val]), "val"), train.subset(np.sort(perm[n_val:]), "train")
    public = None
    if public_fraction > 0:
        perm = rng.permutation(len(train))
        n_pub = int(round(public_fraction * len(train)))
        pub_idx, priv_idx = perm[:n_pub], perm[n_pub:]
        if public_classes is not None:
            keep = np.isin(train.y[pub_idx].numpy(), np.asarray(public_classes))
            info["public_dropped"] = int((~keep).sum())
            pub_idx = pub_idx[keep]
        public = train.subset(np.sort(pub_idx), "public")
        train = train.subset(np.sort(priv_idx), "private")
    if max_train is not None and len(train) > max_train:
        train = train.subset(np.sort(rng.permutation(len(train))[:max_train]), "private")
    labels = train.y.numpy()
    if partition == "iid":
        parts = partition_iid(labels, num_clients, seed)
    elif partition == "dirichlet":
        parts = partition_dirichlet(labels, num_clients, alpha, seed, min_size=2)
    else:
        raise ValueError(f"partition must be 'iid' or 'dirichlet', got {partition!r}")
    clients = [train.subset(p, f"client{k}") for k, p in enumerate(parts)]
    info.update({"public": 0 if public is None else len(public), "private": len(train), "test": len(test),
                 "val": 0 if val is None else len(val),
                 "client_sizes": [len(c) for c in clients], "partition": partition,
                 "alpha": alpha if partition == "dirichlet" else None})
    return FedData(public, clients, test, info, val)
