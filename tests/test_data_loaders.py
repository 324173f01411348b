"""Image-folder and MedMNIST .npz loaders on small generated data, including bad input."""
import os
import re

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
    _write_images(tmp_path / "b", 2, 4, rng)
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
    tr_y = rng.permutation(np.arange(13) % 4)[:, None]     # every class present
    te_x = rng.integers(0, 256, size=(5, 6, 6, 1), dtype=np.uint8)
    te_y = rng.integers(0, 4, size=(5,))
    p = tmp_path / "octmnist.npz"
    np.savez(p, train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)
    out = load_npz(str(p))
    assert set(out) == {"train", "test"}
    assert out["train"].x.shape == (13, 1, 6, 6) and out["test"].x.shape == (5, 1, 6, 6)
    assert out["train"].y.tolist() == tr_y[:, 0].tolist() and out["train"].classes == ["0", "1", "2", "3"]
    torch.testing.assert_close(out["train"].x[3, 0], torch.from_numpy(tr_x[3]).float() / 255 * 2 - 1)
    rgb = rng.integers(0, 256, size=(6, 6, 6, 3), dtype=np.uint8)      # RGB (e.g. BloodMNIST): 3 channels
    np.savez(tmp_path / "bloodmnist.npz", train_images=rgb, train_labels=np.arange(6) % 2)
    out = load_npz(str(tmp_path / "bloodmnist.npz"))
    assert out["train"].x.shape == (6, 3, 6, 6)
    torch.testing.assert_close(out["train"].x[2], torch.from_numpy(rgb[2]).permute(2, 0, 1).float() / 255 * 2 - 1)


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


# ----------------------------------------------------------------------------------------------
# Data the loaders used to mangle silently: each case is refused (naming the file) or handled.
# ----------------------------------------------------------------------------------------------

def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels (the pixel data is a stub): enough for the size check,
    which must fire before anything is decoded."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_npz_nonfinite_pixels_are_refused(tmp_path, rng):
    y = np.arange(6) % 2
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.random((6, 4, 4)).astype(np.float32)
        x[4, 1, 2] = bad
        p = tmp_path / "nonfinite.npz"
        np.savez(p, train_images=rng.random((6, 4, 4)).astype(np.float32), train_labels=y,
                 test_images=x, test_labels=y)
        with pytest.raises(ValueError, match=r"nonfinite\.npz.*test_images.*NaN/Inf") as e:
            load_npz(str(p))
        assert "image 4" in _one_line(e)


def test_npz_pixel_dtypes_and_channels(tmp_path, rng):
    y = np.arange(6) % 2
    p = tmp_path / "px.npz"
    x16 = rng.integers(0, 65536, size=(6, 4, 4), dtype=np.uint16)
    np.savez(p, train_images=x16, train_labels=y)
    torch.testing.assert_close(load_npz(str(p))["train"].x[:, 0], torch.from_numpy(x16.astype(np.float32)) / 65535 * 2 - 1)
    np.savez(p, train_images=x16.astype(np.int64), train_labels=y)          # no known bit depth
    with pytest.raises(ValueError, match=r"px\.npz.*train_images.*int64.*uint8"):
        load_npz(str(p))
    np.savez(p, train_images=rng.integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8), train_labels=y)
    with pytest.raises(ValueError, match=r"px\.npz.*train_images.*channels-last"):
        load_npz(str(p))
    # one split grayscale, the other RGB: the model would see two input layouts
    np.savez(p, train_images=rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8), train_labels=y,
             test_images=rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8), test_labels=y)
    with pytest.raises(ValueError, match=r"px\.npz.*1 channel.*3 channel"):
        load_npz(str(p))
    np.savez(p, train_images=np.zeros((0, 4, 4), np.uint8), train_labels=np.zeros(0, np.int64),
             test_images=rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8), test_labels=y)
    with pytest.raises(ValueError, match=r"px\.npz.*train_images has no images"):
        load_npz(str(p))
    np.savez(p, train_images=np.array([None] * 6, dtype=object), train_labels=y)   # would need unpickling
    with pytest.raises(ValueError, match=r"px\.npz.*train_images"):
        load_npz(str(p))


def _write_high_depth(path, array, mode):
    Image.fromarray(array).save(path)                  # uint16 -> I;16, float32 -> F, int32 -> I
    with Image.open(path) as im:                        # the file really has that depth
        assert im.mode == mode


def test_16bit_png_and_float_tiff_are_scaled_by_their_depth(tmp_path, rng):
    a16 = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    a16[0, 0], a16[0, 1] = 65535, 300                   # 300 saturated to 255 (white) before
    af = rng.random((5, 6)).astype(np.float32)
    af[0, 0] = 0.9                                      # became 0 before (float -> "L" truncates)
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    _write_high_depth(tmp_path / "a" / "deep.png", a16, "I;16")
    _write_high_depth(tmp_path / "b" / "float.tif", af, "F")
    for mode, c in (("L", 1), ("RGB", 3)):
        ds = load_image_folder(str(tmp_path), image_size=0, mode=mode)["all"]
        assert ds.x.shape == (2, c, 5, 6)
        for k in range(c):
            torch.testing.assert_close(ds.x[0, k], torch.from_numpy(a16.astype(np.float32) / 65535) * 2 - 1)
            torch.testing.assert_close(ds.x[1, k], torch.from_numpy(af) * 2 - 1)
    ds = load_image_folder(str(tmp_path), image_size=3, mode="L")["all"]    # resized at full depth
    assert ds.x.shape == (2, 1, 3, 3) and float(ds.x.min()) >= -1 and float(ds.x.max()) <= 1
    assert len(torch.unique(ds.x[0])) > 2
    # float pixels outside [0, 1], non-finite, or 32-bit integers: refused, the file named
    for name, arr, mode, why in (("big.tif", af * 3, "F", r"\[0, 1\]"), ("nan.tif", np.full((5, 6), np.nan, np.float32), "F", "NaN"),
                                 ("int32.tif", a16.astype(np.int32), "I", "32-bit integer")):
        _write_high_depth(tmp_path / "b" / name, arr, mode)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}.*{why}") as e:
            load_image_folder(str(tmp_path), image_size=0, mode="L")
        _one_line(e)
        os.remove(tmp_path / "b" / name)


def test_npz_labels_are_checked_against_the_class_list(tmp_path, rng):
    x = rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    p = tmp_path / "labels.npz"
    # a label far above the number of records would build a gigantic head (10**9: a MemoryError before)
    for big in (2 * 10**6, 10**9, 2**63 + 5):
        y = np.array([0, 1, 0, 1, 0, big], dtype=np.uint64)
        np.savez(p, train_images=x, train_labels=y)
        with pytest.raises(ValueError, match=rf"labels\.npz.*train_labels.*{big}.*6 records") as e:
            load_npz(str(p))
        _one_line(e)
    np.savez(p, train_images=x, train_labels=np.array([0, 1, 0, 1, 0, -3]))
    with pytest.raises(ValueError, match=r"labels\.npz.*train_labels.*-3"):
        load_npz(str(p))
    np.savez(p, train_images=x, train_labels=np.array([0, 2, 0, 2, 3, 3]))     # class 1 has no records
    with pytest.raises(ValueError, match=r"labels\.npz.*class\(es\) \[1\] have no records"):
        load_npz(str(p))
    np.savez(p, train_images=x, train_labels=np.array([0, 1, 0, 1, 2, 2]),
             test_images=x[:2], test_labels=np.array([0, 3]))                  # 3 lies outside the 3 names
    with pytest.raises(ValueError, match=r"labels\.npz.*test_labels.*3.*3 class names"):
        load_npz(str(p), classes=["a", "b", "c"])
    ds = load_npz(str(p))                               # inferred: 4 classes, every one present somewhere
    assert ds["train"].classes == ["0", "1", "2", "3"] and ds["test"].y.tolist() == [0, 3]


def test_oversized_image_is_refused_naming_the_limit(tmp_path, rng):
    from deer.data.datasets import MAX_IMAGE_PIXELS
    _write_images(tmp_path / "a", 2, 4, rng)
    _write_images(tmp_path / "b", 2, 4, rng)
    for w, h in ((14000, 14000), (8000, 7000)):         # above PIL's bomb limit; above deer's limit only
        assert w * h > MAX_IMAGE_PIXELS
        _png_header_only(tmp_path / "b" / "huge.png", w, h)
        with pytest.raises(ValueError, match=rf"huge\.png.*{MAX_IMAGE_PIXELS:,}") as e:
            load_image_folder(str(tmp_path), image_size=4)
        _one_line(e)


def test_npz_is_resized_to_the_configured_image_size(tmp_path, rng):
    from deer.data import prepare_data
    x = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    x[0] = 200                                          # a flat image stays flat after resizing
    y = np.arange(40) % 4
    p = tmp_path / "octmnist.npz"
    np.savez(p, train_images=x, train_labels=y, test_images=x[:8], test_labels=y[:8])
    out = load_npz(str(p), image_size=8)
    assert out["train"].x.shape == (40, 1, 8, 8) and out["test"].x.shape == (8, 1, 8, 8)
    torch.testing.assert_close(out["train"].x[0], torch.full((1, 8, 8), 200 / 255 * 2 - 1))
    assert load_npz(str(p))["train"].x.shape == (40, 1, 28, 28)               # 0 keeps the native size
    # the path a run takes (--data x.npz, image_size from the config)
    data = prepare_data(str(p), num_clients=2, partition="iid", image_size=12, public_fraction=0.0)
    assert data.test.x.shape[-2:] == (12, 12) and data.clients[0].x.shape[-2:] == (12, 12)


def test_bad_files_in_image_folders_are_refused(tmp_path, rng):
    _write_images(tmp_path / "a", 2, 4, rng)
    _write_images(tmp_path / "b", 2, 4, rng)
    good = (tmp_path / "b" / "img000.png").read_bytes()
    for name, content, why in (("empty.png", b"", "cannot read image"),
                               ("cut.png", good[: len(good) // 2], "cannot read image"),
                               ("notes.txt", b"hello", "is not an image file")):
        (tmp_path / "b" / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(name)) as e:
            load_image_folder(str(tmp_path))
        msg = _one_line(e)
        assert name in msg and why in msg
        os.remove(tmp_path / "b" / name)


def test_mixed_modes_and_unicode_class_names(tmp_path, rng):
    import unicodedata
    ca, cb = "Ödem", "胃"
    rgb = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
    os.makedirs(tmp_path / ca)
    os.makedirs(tmp_path / cb)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / ca / "rgb.png")
    Image.fromarray(gray, mode="L").save(tmp_path / ca / "x_gray.png")
    Image.fromarray(np.dstack([rgb, np.full((4, 4), 255, np.uint8)]), mode="RGBA").save(tmp_path / cb / "rgba.png")
    Image.fromarray(gray, mode="L").convert("P").save(tmp_path / cb / "x_palette.gif")
    ds = load_image_folder(str(tmp_path), image_size=0, mode="RGB")["all"]
    assert ds.classes == [ca, cb] and ds.x.shape == (4, 3, 4, 4)
    as_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255 * 2 - 1)   # noqa: E731
    torch.testing.assert_close(ds.x[0], as_x(rgb).permute(2, 0, 1))
    torch.testing.assert_close(ds.x[1], as_x(gray).expand(3, 4, 4))          # gray replicated to 3 channels
    torch.testing.assert_close(ds.x[2], as_x(rgb).permute(2, 0, 1))          # alpha dropped
    ds = load_image_folder(str(tmp_path), image_size=0, mode="L")["all"]
    assert ds.x.shape == (4, 1, 4, 4)
    torch.testing.assert_close(ds.x[0, 0], as_x(np.asarray(Image.fromarray(rgb).convert("L"))))
    # one split written with composed, the other with decomposed Unicode (macOS): the same class
    root = tmp_path / "split"
    for split, form in (("train", "NFC"), ("test", "NFD")):
        for c in (ca, cb):
            _write_images(root / split / unicodedata.normalize(form, c), 2, 4, rng)
    assert unicodedata.normalize("NFD", ca) != ca and len(os.listdir(root / "test")) == 2
    out = load_image_folder(str(root), image_size=0)
    assert out["train"].classes == out["test"].classes == [ca, cb]


def test_one_class_data_sets_are_refused(tmp_path, rng):
    _write_images(tmp_path / "flat" / "polyp", 3, 4, rng)
    with pytest.raises(ValueError, match=r"flat.*one class folder.*polyp.*at least two classes") as e:
        load_image_folder(str(tmp_path / "flat"))
    _one_line(e)
    for s in ("train", "test"):
        _write_images(tmp_path / "split" / s / "CNV", 2, 4, rng)
    with pytest.raises(ValueError, match=r"train.*one class folder.*CNV"):
        load_image_folder(str(tmp_path / "split"))
    p = tmp_path / "one.npz"
    x = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    np.savez(p, train_images=x, train_labels=np.full(5, 0), test_images=x, test_labels=np.full(5, 0))
    with pytest.raises(ValueError, match=r"one\.npz.*one class.*at least two classes") as e:
        load_npz(str(p))
    _one_line(e)
