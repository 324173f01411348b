"""Data sets for federated fine-tuning: image folders (Kvasir-v2 / OCT-C8 layouts), MedMNIST .npz
files, and the bundled default (scikit-learn's 8x8 digits, which ship inside the scikit-learn wheel).

Every loader returns `ArrayDataset`s: images as a float32 tensor (N, C, H, W) normalised to [-1, 1]
and integer labels (N,). Nothing is silently dropped: an empty class folder, a file that is not an
image, an image that cannot be decoded, or labels that do not match the images raise a ValueError
that names the offending path or key and says what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
SPLIT_NAMES = ("train", "val", "test")
# Folder names some distributions use for the validation split.
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


@dataclass
class ArrayDataset:
    """Images (N, C, H, W) float32 in [-1, 1], labels (N,) int64, class names in label order."""
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.name or 'data set'}: {self.x.shape[0]} images but {self.y.shape[0]} labels")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise ValueError(f"{self.name or 'data set'}: labels must lie in [0, {len(self.classes) - 1}] "
                             f"(one per class), got range [{int(self.y.min())}, {int(self.y.max())}]")

    def __len__(self):
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, idx, name: str | None = None) -> "ArrayDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(self.x[idx], self.y[idx], self.classes, name or self.name, dict(self.info))


def _to_tensor(images: np.ndarray, where: str) -> torch.Tensor:
    """uint8/float images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{where}: expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    elif x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"{where}: float images must lie in [0, 1] (or be uint8 in [0, 255]), got range "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return (x - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------
# Image folders: root/<class>/*.png or root/{train,val,test}/<class>/*.png
# ----------------------------------------------------------------------------------------------

def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _read_image(path: str, mode: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__}: {e}). Remove or replace the "
                         "file; deer does not skip unreadable images silently.") from e
    return arr


def _load_class_folders(root: str, mode: str, size: int, classes: list[str] | None, name: str) -> ArrayDataset:
    found = _subdirs(root)
    if not found:
        raise ValueError(f"{root!r} has no class folders: expected {root}/<class name>/<images>")
    if classes is not None and found != classes:
        raise ValueError(f"{root!r} has class folders {found}, but the other splits have {classes}: every "
                         "split needs the same class folders")
    images, labels = [], []
    for label, cls in enumerate(found):
        cdir = os.path.join(root, cls)
        files = sorted(f for f in os.listdir(cdir) if not f.startswith("."))
        if not files:
            raise ValueError(f"class folder {cdir!r} is empty: add images or remove the folder "
                             "(an empty class would make the label set disagree with the data)")
        for f in files:
            p = os.path.join(cdir, f)
            if os.path.isdir(p):
                raise ValueError(f"{p!r} is a folder inside class folder {cdir!r}: expected image files only")
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"{p!r} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}): "
                                 "move it out of the data folder")
            images.append(_read_image(p, mode, size))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {root!r} have different sizes {sorted(shapes)}: pass image_size to "
                         "resize them to one size")
    x = _to_tensor(np.stack(images), root)
    return ArrayDataset(x, torch.tensor(labels, dtype=torch.long), found, name, {"root": root})


def load_image_folder(root: str, image_size: int = 32, mode: str = "RGB") -> dict[str, ArrayDataset]:
    """Load a Kvasir-v2 / OCT-C8 style image folder.

    Layouts: `root/<class>/<img>` (returns {"all": ds}) or `root/<split>/<class>/<img>` with splits
    among train/val(valid, validation)/test (returns one entry per split present). Images are
    converted to `mode` ("RGB" or "L") and resized to image_size x image_size (0 keeps the size,
    which must then be the same for all images).
    """
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a folder")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L' (grayscale), got {mode!r}")
    dirs = _subdirs(root)
    split_dirs = {d: _SPLIT_ALIASES[d.lower()] for d in dirs if d.lower() in _SPLIT_ALIASES}
    if split_dirs:
        others = [d for d in dirs if d not in split_dirs]
        if others:
            raise ValueError(f"{root!r} mixes split folders {sorted(split_dirs)} with other folders {others}: "
                             "use either root/<split>/<class>/ or root/<class>/")
        if len(set(split_dirs.values())) != len(split_dirs):
            raise ValueError(f"{root!r} has two folders for the same split: {sorted(split_dirs)}")
        out, classes = {}, None
        for d in sorted(split_dirs, key=lambda d: SPLIT_NAMES.index(split_dirs[d])):
            ds = _load_class_folders(os.path.join(root, d), mode, image_size, classes,
                                     f"{os.path.basename(root.rstrip('/'))}/{split_dirs[d]}")
            classes = ds.classes
            out[split_dirs[d]] = ds
        return out
    return {"all": _load_class_folders(root, mode, image_size, None, os.path.basename(root.rstrip("/")))}


# ----------------------------------------------------------------------------------------------
# MedMNIST .npz: train_images, train_labels, val_images, val_labels, test_images, test_labels
# ----------------------------------------------------------------------------------------------

def load_npz(path: str, classes: list[str] | None = None) -> dict[str, ArrayDataset]:
    """Load a MedMNIST-style .npz (keys `<split>_images` and `<split>_labels` for each split present).
    Labels of shape (N,) or (N, 1) are single-label classes; multi-label (N, k > 1) is refused."""
    if not os.path.isfile(path):
        raise ValueError(f"npz file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a corrupt archive
        raise ValueError(f"cannot read {path!r} as a .npz archive ({type(e).__name__}: {e})") from e
    keys = set(z.files)
    splits = [s for s in SPLIT_NAMES if f"{s}_images" in keys or f"{s}_labels" in keys]
    if not splits:
        raise ValueError(f"{path!r} has keys {sorted(keys)}; expected MedMNIST keys such as train_images and "
                         "train_labels (and val_/test_)")
    raw = {}
    for s in splits:
        for k in (f"{s}_images", f"{s}_labels"):
            if k not in keys:
                raise ValueError(f"{path!r} has {s} data but no {k!r}: images and labels come in pairs")
        xs, ys = z[f"{s}_images"], z[f"{s}_labels"]
        if ys.ndim == 2 and ys.shape[1] == 1:
            ys = ys[:, 0]
        if ys.ndim != 1:
            raise ValueError(f"{path!r}: {s}_labels has shape {ys.shape}; deer trains single-label "
                             "classifiers (N,) or (N, 1), multi-label tasks are not supported")
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"{path!r}: {s}_images has {xs.shape[0]} images but {s}_labels has "
                             f"{ys.shape[0]} labels: they must match one to one")
        if not np.issubdtype(ys.dtype, np.integer):
            raise ValueError(f"{path!r}: {s}_labels must be integers, got dtype {ys.dtype}")
        raw[s] = (xs, ys.astype(np.int64))
    n_cls = int(max(int(ys.max()) for _, ys in raw.values() if ys.size)) + 1
    if classes is None:
        classes = [str(i) for i in range(n_cls)]
    elif len(classes) < n_cls:
        raise ValueError(f"{path!r}: labels go up to {n_cls - 1} but only {len(classes)} class names were given")
    name = os.path.splitext(os.path.basename(path))[0]
    return {s: ArrayDataset(_to_tensor(xs, f"{path}:{s}_images"), torch.from_numpy(ys), list(classes),
                            f"{name}/{s}", {"path": path}) for s, (xs, ys) in raw.items()}


# ----------------------------------------------------------------------------------------------
# Bundled default: scikit-learn's digits
# ----------------------------------------------------------------------------------------------

DEFAULT_DATASET_NOTE = (
    "scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the scikit-learn wheel, no "
    "download). No PyPI package in this environment ships real medical images inside its wheel "
    "(MedMNIST and the others download at run time), so the default run uses digits; point "
    "--data at a Kvasir-v2 / OCT-C8 image folder or a MedMNIST .npz for medical data.")


def load_digits(image_size: int = 16) -> ArrayDataset:
    from sklearn.datasets import load_digits as _ld
    import torch.nn.functional as F
    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel counts 0..16
    if image_size != 8:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return ArrayDataset(x, torch.tensor(d.target, dtype=torch.long), [str(i) for i in range(10)],
                        "sklearn-digits", {"note": DEFAULT_DATASET_NOTE})
