"""Image-folder and MedMNIST .npz loaders on small generated data, including bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from deer.data import load_image_folder, load_npz


def _write_images(folder, n, size, rng, mode="RGB"):
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(a, mode=mode).save(os.path.join(folder, f"img{i:03d}.png"))
        arrays.append(a)
    return arrays


@pytest.fixture
def rng(gen):
    return np.random.default_rng(gen.initial_seed())


def test_class_folders_flat_layout(tmp_path, rng):
    counts = {"polyp": 3, "normal": 5, "ulcer": 1}           # sorted: normal, polyp, ulcer
    written = {c: _write_images(tmp_path / c, n, 7, rng) for c, n in counts.items()}
    out = load_image_folder(str(tmp_path), image_size=0)
    ds = out["all"]
    assert set(out) == {"all"}
    assert ds.classes == ["normal", "polyp", "ulcer"]
    assert len(ds) == 9 and ds.x.shape == (9, 3, 7, 7)
    assert torch.bincount(ds.y).tolist() == [5, 3, 1]
    # pixel values are the written ones mapped to [-1, 1], class by class in file order
    first_polyp = ds.x[ds.y == 1][0]
    expect = torch.from_numpy(written["polyp"][0]).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(first_polyp, expect)


def test_split_layout_and_resize(tmp_path, rng):
    for split, n in (("train", 4), ("valid", 2), ("test", 3)):
        for c in ("CNV", "DME"):
            _write_images(tmp_path / split / c, n, 11, rng, mode="L")
    out = load_image_folder(str(tmp_path), image_size=5, mode="L")
    assert set(out) == {"train", "val", "test"}
    assert out["train"].x.shape == (8, 1, 5, 5) and len(out["val"]) == 4 and len(out["test"]) == 6
    assert out["test"].classes == ["CNV", "DME"]


def test_empty_class_folder_is_an_error(tmp_path, rng):
    _write_images(tmp_path / "a", 2, 4, rng)
    os.makedirs(tmp_path / "b")
    with pytest.raises(ValueError, match=r"class folder .*b.* is empty"):
        load_image_folder(str(tmp_path))


def test_unreadable_image_is_an_error(tmp_path, rng):
    _write_images(tmp_path / "a", 2, 4, rng)
    _write_images(tmp_path / "b", 2, 4, rng)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(str(tmp_path))


def test_stray_file_and_mismatched_splits_are_errors(tmp_path, rng):
    _write_images(tmp_path / "a", 2, 4, rng)
    (tmp_path / "a" / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match=r"labels\.csv.* is not an image file"):
        load_image_folder(str(tmp_path))
    root = tmp_path / "split"
    _write_images(root / "train" / "a", 2, 4, rng)
    _write_images(root / "train" / "b", 2, 4, rng)
    _write_images(root / "test" / "a", 2, 4, rng)
    with pytest.raises(ValueError, match="same class folders"):
        load_image_folder(str(root))


def test_npz_roundtrip(tmp_path, rng):
    tr_x = rng.integers(0, 256, size=(13, 6, 6), dtype=np.uint8)
    tr_y = rng.integers(0, 4, size=(13, 1))
    te_x = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    te_y = rng.integers(0, 4, size=(5,))
    p = tmp_path / "bloodmnist.npz"
    np.savez(p, train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)
    out = load_npz(str(p))
    assert set(out) == {"train", "test"}
    assert out["train"].x.shape == (13, 1, 6, 6) and out["test"].x.shape == (5, 3, 6, 6)
    assert out["train"].y.tolist() == tr_y[:, 0].tolist()
    torch.testing.assert_close(out["train"].x[3, 0], torch.from_numpy(tr_x[3]).float() / 255 * 2 - 1)


def test_npz_bad_input(tmp_path, rng):
    x = rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    p = tmp_path / "m.npz"
    np.savez(p, train_images=x, train_labels=np.arange(5))            # 6 images, 5 labels
    with pytest.raises(ValueError, match="6 images but train_labels has 5 labels"):
        load_npz(str(p))
    np.savez(p, train_images=x)
    with pytest.raises(ValueError, match="no 'train_labels'"):
        load_npz(str(p))
    np.savez(p, train_images=x, train_labels=np.zeros((6, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="multi-label"):
        load_npz(str(p))
    np.savez(p, images=x)
    with pytest.raises(ValueError, match="expected MedMNIST keys"):
        load_npz(str(p))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_npz(str(tmp_path / "bad.npz"))
