"""Data sets for federated fine-tuning: image folders (Kvasir-v2 / OCT-C8 layouts), MedMNIST .npz
files, and the bundled default (scikit-learn's 8x8 digits, which ship inside the scikit-learn wheel).

Every loader returns `ArrayDataset`s: images as a float32 tensor (N, C, H, W) normalised to [-1, 1]
and integer labels (N,). Nothing is silently dropped or mangled: an empty class folder, a file that is
not an image, an image that cannot be decoded or is larger than MAX_IMAGE_PIXELS, pixels of unknown
depth or outside their range (NaN/Inf included), labels that do not match the images or leave a class
without records, and a data set with fewer than two classes raise a ValueError that names the
offending path or key and says what to do.

Pixel depth: 8-bit pixels are divided by 255, 16-bit ones (16-bit PNG/TIFF, uint16 arrays) by 65535;
float pixels (32-bit float TIFF, float arrays) must be finite and lie in [0, 1] already. 32-bit
integer images (no known full-scale value) are refused.
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
SPLIT_NAMES = ("train", "val", "test")
# Largest image (width x height) an image folder may hold. Larger files are refused before they are
# decoded (a 14000 x 14000 PNG would take 0.6 GB as RGB before being resized to a few hundred pixels).
MAX_IMAGE_PIXELS = 50_000_000
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


class DataError(ValueError):
    """Bad input found by the loaders (a ValueError; passed through as is, never re-wrapped)."""


def _to_tensor(images: np.ndarray, where: str) -> torch.Tensor:
    """uint8/uint16/float images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{where}: expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if images.shape[-1] > 4:
        raise DataError(f"{where}: shape {images.shape} has {images.shape[-1]} channels on the last axis; "
                       "expected channels-last images (N, H, W) or (N, H, W, C) with C <= 4 as MedMNIST "
                       "stores them (transpose an (N, C, H, W) array with .transpose(0, 2, 3, 1))")
    if images.dtype == np.uint8:
        scale = 255.0
    elif images.dtype == np.uint16:
        scale = 65535.0
    elif np.issubdtype(images.dtype, np.floating):
        scale = None
        finite = np.isfinite(images)
        if not finite.all():
            bad = np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))
            raise DataError(f"{where}: {int((~finite).sum())} NaN/Inf pixels in {len(bad)} images (first in "
                           f"image {int(bad[0])}); pixels must be finite: fix or remove those images")
        if images.size and (float(images.min()) < 0 or float(images.max()) > 1):
            raise DataError(f"{where}: float images must lie in [0, 1] (or be uint8 in [0, 255] or uint16 in "
                           f"[0, 65535]), got range [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    else:
        raise DataError(f"{where}: pixels of dtype {images.dtype} have no known full-scale value; store "
                       "uint8 (0..255), uint16 (0..65535) or float in [0, 1]")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if scale is not None:
        x = x / scale
    return (x - 0.5) / 0.5


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 0:
        raise ValueError(f"image_size must be a whole number of pixels >= 0 (0 keeps the stored size), "
                         f"got {image_size!r}")
    return int(image_size)


# ----------------------------------------------------------------------------------------------
# Image folders: root/<class>/*.png or root/{train,val,test}/<class>/*.png
# ----------------------------------------------------------------------------------------------

def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _read_image(path: str, mode: str, size: int) -> np.ndarray:
    """One image as (H, W) for mode "L" or (H, W, 3) for "RGB": uint8 for 8-bit files, float32 in
    [0, 1] for 16-bit and float files (scaled by their own depth, resized at full depth)."""
    import warnings
    from PIL import Image, UnidentifiedImageError
    too_large = (f"image {path!r} is larger than the limit of {MAX_IMAGE_PIXELS:,} pixels "
                 "(deer.data.datasets.MAX_IMAGE_PIXELS): downscale it before loading")
    try:
        with warnings.catch_warnings():  # PIL warns from 89M pixels; deer refuses from its own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{too_large}; it is {w} x {h} = {w * h:,}")
            if im.mode.startswith("I;16"):                   # 16-bit grayscale PNG / TIFF
                arr = np.asarray(im).astype(np.float32) / 65535.0
            elif im.mode == "F":                             # 32-bit float TIFF
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise DataError(f"image {path!r} has NaN/Inf pixels: float images must be finite, in [0, 1]")
                if float(arr.min()) < 0 or float(arr.max()) > 1:
                    raise DataError(f"image {path!r} is a float image with pixels in [{float(arr.min()):.3g}, "
                                   f"{float(arr.max()):.3g}]; float images must lie in [0, 1]: rescale it or "
                                   "save it as an 8- or 16-bit image")
            elif im.mode.startswith("I"):                    # 32-bit integers: no known full scale
                raise DataError(f"image {path!r} has 32-bit integer pixels (mode {im.mode}), whose full-scale "
                               "value deer cannot know: save it as an 8- or 16-bit image or as floats in [0, 1]")
            else:                                            # 8-bit: 1, L, P, LA, RGB, RGBA, CMYK, ...
                im = im.convert(mode)
                if size:
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{too_large} ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path!r} ({type(e).__name__}: {e}). Remove or replace the "
                       "file; deer does not skip unreadable images silently.") from e
    if size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.float32)
        arr = np.clip(arr, 0.0, 1.0)
    return np.repeat(arr[..., None], 3, axis=2) if mode == "RGB" else arr


def _class_dirs(root: str) -> list[tuple[str, str]]:
    """(class name, folder name) pairs sorted by class name. Class names are NFC-normalised Unicode so
    that a folder written in decomposed form (macOS) names the same class as a composed one."""
    pairs = sorted((unicodedata.normalize("NFC", d), d) for d in _subdirs(root))
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{root!r} has several folders for the class name(s) {dup} (the same text in "
                         "different Unicode forms): merge them into one folder")
    return pairs


def _load_class_folders(root: str, mode: str, size: int, classes: list[str] | None, name: str) -> ArrayDataset:
    pairs = _class_dirs(root)
    found = [n for n, _ in pairs]
    if not found:
        raise ValueError(f"{root!r} has no class folders: expected {root}/<class name>/<images>")
    if classes is not None and found != classes:
        raise ValueError(f"{root!r} has class folders {found}, but the other splits have {classes}: every "
                         "split needs the same class folders")
    if len(found) < 2:
        raise ValueError(f"{root!r} has one class folder ({found[0]!r}): a classifier needs at least two "
                         f"classes, add a folder of images for each other class ({root}/<class name>/)")
    images, labels = [], []
    for label, (_, folder) in enumerate(pairs):
        cdir = os.path.join(root, folder)
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
    if any(a.dtype != np.uint8 for a in images):   # some 16-bit / float files: all to float in [0, 1]
        images = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in images]
    x = _to_tensor(np.stack(images), root)
    return ArrayDataset(x, torch.tensor(labels, dtype=torch.long), found, name, {"root": root})


def load_image_folder(root: str, image_size: int = 32, mode: str = "RGB") -> dict[str, ArrayDataset]:
    """Load a Kvasir-v2 / OCT-C8 style image folder.

    Layouts: `root/<class>/<img>` (returns {"all": ds}) or `root/<split>/<class>/<img>` with splits
    among train/val(valid, validation)/test (returns one entry per split present). Images are
    converted to `mode` ("RGB" or "L": grayscale images are replicated to three channels, colour ones
    reduced to luma, alpha dropped) and resized to image_size x image_size (0 keeps the size, which
    must then be the same for all images). Files whose names start with "." are ignored; any other
    file must be an image with one of IMAGE_EXTENSIONS. Class names are the folder names (Unicode,
    NFC-normalised); at least two classes are required.
    """
    image_size = _check_image_size(image_size)
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

def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear with antialiasing (as PIL's resize), in chunks."""
    import torch.nn.functional as F
    if not size or tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    for i in range(0, x.shape[0], 4096):
        out[i:i + 4096] = F.interpolate(x[i:i + 4096], size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0)


def load_npz(path: str, classes: list[str] | None = None, image_size: int = 0) -> dict[str, ArrayDataset]:
    """Load a MedMNIST-style .npz (keys `<split>_images` and `<split>_labels` for each split present).

    Images are channels-last (N, H, W) or (N, H, W, C), uint8, uint16 or float in [0, 1] (finite),
    with the same number of channels in every split (kept as stored: a grayscale file gives 1 channel,
    an RGB one 3); image_size > 0 resizes them to image_size x image_size (0 keeps the stored size).
    Labels of shape (N,) or (N, 1) are single-label classes; multi-label (N, k > 1) is refused.
    Labels are class indices: without `classes` the number of classes is the largest label + 1, and
    every class 0..K-1 must have a record in some split (so K can never exceed the number of records);
    with `classes` the labels must lie in [0, len(classes)) and again leave no class without records.
    At least two classes are required."""
    image_size = _check_image_size(image_size)
    if not os.path.isfile(path):
        raise ValueError(f"npz file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a corrupt archive
        raise ValueError(f"cannot read {path!r} as a .npz archive ({type(e).__name__}: {e})") from e
    if not hasattr(z, "files"):
        raise ValueError(f"{path!r} holds a single array, not a .npz archive of named arrays "
                         "(train_images, train_labels, ...)")

    def read(key):
        try:
            return z[key]
        except Exception as e:  # object arrays (would need unpickling), a damaged member, ...
            raise ValueError(f"{path!r}: cannot read {key!r} ({type(e).__name__}: {e}); arrays are loaded "
                             "without unpickling, so store plain numeric arrays") from e

    with z:
        keys = set(z.files)
        splits = [s for s in SPLIT_NAMES if f"{s}_images" in keys or f"{s}_labels" in keys]
        if not splits:
            raise ValueError(f"{path!r} has keys {sorted(keys)}; expected MedMNIST keys such as train_images "
                             "and train_labels (and val_/test_)")
        raw = {}
        for s in splits:
            for k in (f"{s}_images", f"{s}_labels"):
                if k not in keys:
                    raise ValueError(f"{path!r} has {s} data but no {k!r}: images and labels come in pairs")
            xs, ys = read(f"{s}_images"), read(f"{s}_labels")
            if ys.ndim == 2 and ys.shape[1] == 1:
                ys = ys[:, 0]
            if ys.ndim != 1:
                raise ValueError(f"{path!r}: {s}_labels has shape {ys.shape}; deer trains single-label "
                                 "classifiers (N,) or (N, 1), multi-label tasks are not supported")
            if xs.ndim == 0 or xs.shape[0] != ys.shape[0]:
                raise ValueError(f"{path!r}: {s}_images has {xs.shape[0] if xs.ndim else 'no'} images but "
                                 f"{s}_labels has {ys.shape[0]} labels: they must match one to one")
            if ys.shape[0] == 0:
                raise ValueError(f"{path!r}: {s}_images has no images: remove the empty {s} split or fill it")
            if not np.issubdtype(ys.dtype, np.integer):
                raise ValueError(f"{path!r}: {s}_labels must be integers, got dtype {ys.dtype}")
            lo = int(ys.min())  # Python ints: a uint64 label above 2**63 is not wrapped
            if lo < 0:
                raise ValueError(f"{path!r}: {s}_labels has the label {lo}; labels are class indices >= 0")
            raw[s] = (xs, ys)

    n_records = sum(len(ys) for _, ys in raw.values())
    hi, hi_key = max((int(ys.max()), f"{s}_labels") for s, (_, ys) in raw.items())
    if classes is None:
        if hi + 1 > n_records:
            raise ValueError(f"{path!r}: {hi_key} has the label {hi}, which would mean {hi + 1:,} classes, but "
                             f"the file has only {n_records:,} records: labels must be class indices 0..K-1 "
                             "with every class present")
        n_cls = hi + 1
    else:
        n_cls = len(classes)
        if hi >= n_cls:
            raise ValueError(f"{path!r}: {hi_key} has the label {hi}, but only {n_cls} class names were given "
                             f"(labels must lie in [0, {n_cls - 1}])")
    if n_cls < 2:
        raise ValueError(f"{path!r}: every label is 0, i.e. one class: a classifier needs at least two classes")
    counts = np.bincount(np.concatenate([ys.astype(np.int64) for _, ys in raw.values()]), minlength=n_cls)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        shown = empty[:10].tolist()
        raise ValueError(f"{path!r}: class(es) {shown}{' ...' if empty.size > 10 else ''} have no records in "
                         f"any split ({empty.size} of {n_cls} classes empty): relabel to consecutive indices "
                         "0..K-1 (or give the class names of the classes present)")
    if classes is None:
        classes = [str(i) for i in range(n_cls)]

    name = os.path.splitext(os.path.basename(path))[0]
    xt = {s: _resize(_to_tensor(xs, f"{path!r}: {s}_images"), image_size) for s, (xs, _) in raw.items()}
    layouts = {s: tuple(x.shape[1:]) for s, x in xt.items()}
    chans = {s: c for s, (c, _, _) in layouts.items()}
    if len(set(chans.values())) > 1:
        desc = ", ".join(f"{s}_images {c} channel{'s' * (c > 1)}" for s, c in chans.items())
        raise ValueError(f"{path!r}: the splits differ in channels ({desc}); store every split as grayscale "
                         "or every split as RGB")
    if len(set(layouts.values())) > 1:
        desc = ", ".join(f"{s}_images {h}x{w}" for s, (_, h, w) in layouts.items())
        raise ValueError(f"{path!r}: the splits differ in image size ({desc}); pass image_size > 0 to "
                         "resize them to one size")
    return {s: ArrayDataset(xt[s], torch.from_numpy(ys.astype(np.int64)), list(classes), f"{name}/{s}",
                            {"path": path}) for s, (_, ys) in raw.items()}


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
