"""A user's own data: an image folder (ImageFolder layout, decoded lazily) and .npz arrays; augmentation."""
from __future__ import annotations

import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsify.errors import DataError
from sparsify.train.data import (ImageFolderSplit, Split, augment_batch, augment_generator, batches,
                                 decode_image, load_dataset)

COLOURS = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]


def make_folder(root, per_class=10, size=(14, 10), split_dirs=False, seed=0):
    """Three classes of noisy single-colour images of ``size`` (width, height), PNG."""
    rng = np.random.default_rng(seed)
    parts = {"train": per_class, "test": max(2, per_class // 3)} if split_dirs else {"": per_class}
    for part, n in parts.items():
        for c, colour in enumerate(COLOURS):
            d = root / part / f"class{c}" if part else root / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_flat_folder_is_split_resized_and_lazy(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=10)
    (tmp_path / "imgs" / "class0" / "notes.txt").write_text("not an image")  # ignored, like ImageFolder does
    b = load_dataset(str(root), (1, 3, 8, 8), val_fraction=0.1)
    assert b.kind == "folder" and b.augment and b.class_names == ["class0", "class1", "class2"]
    assert len(b.train) + len(b.val) + len(b.test) == 30 and len(b.test) == 3
    assert isinstance(b.train, ImageFolderSplit) and not hasattr(b.train, "x")  # file names, not pixels
    assert any("14x10" in n and "8x8" in n for n in b.notes), b.notes
    assert any("held out as the test split" in n for n in b.notes), b.notes
    x, y = b.train.take(torch.arange(len(b.train)))
    assert x.shape == (len(b.train), 3, 8, 8) and x.dtype == torch.float32
    # per-channel normalisation from the training images: the red class is red after it too
    red = x[y == 0].mean(dim=(0, 2, 3))
    assert red[0] > red[1] and red[0] > red[2]


def test_train_test_subfolders_are_used_and_grey_models_get_grey(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=9, split_dirs=True)
    b = load_dataset(str(root), (1, 1, 6, 6))
    assert len(b.test) == 9 and len(b.train) + len(b.val) == 27
    x, _ = b.test.take(torch.arange(3))
    assert x.shape == (3, 1, 6, 6)
    assert not any("held out" in n for n in b.notes)


def test_grey_images_among_colour_ones_are_noted_for_a_colour_model(tmp_path):
    # a grey image in a folder for a 3-channel model was replicated to RGB without a word (a grey
    # model's note says "converted to grey")
    root = make_folder(tmp_path / "imgs", per_class=10)
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert not any("replicated" in n for n in b.notes), b.notes
    for i in range(2):
        Image.open(root / "class1" / f"{i}.png").convert("L").save(root / "class1" / f"{i}.png")
    Image.open(root / "class2" / "0.png").convert("LA").save(root / "class2" / "0.png")
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert any("the 3 grey images among them replicated to 3 channels" in n for n in b.notes), b.notes
    x, y = b.train.take(torch.arange(len(b.train)))
    assert x.shape[1] == 3


def test_worker_processes_give_the_same_batches(tmp_path):
    b = load_dataset(str(make_folder(tmp_path / "imgs", per_class=8)), (1, 3, 8, 8))
    inline = list(batches(b.train, 5, shuffle=True, seed=3, epoch=2, workers=0))
    worker = list(batches(b.train, 5, shuffle=True, seed=3, epoch=2, workers=1))
    assert len(inline) == len(worker) > 1
    for (xa, ya), (xb, yb) in zip(inline, worker):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_damaged_image_is_one_data_error_from_a_worker_too(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=8)
    b = load_dataset(str(root), (1, 3, 8, 8))
    (tmp_path / "imgs" / "class1" / "3.png").write_bytes(b"not a png")
    for workers in (0, 1):
        with pytest.raises(DataError, match=r"3\.png cannot be read as an image") as e:
            list(batches(b.train, 4, shuffle=False, workers=workers)) + list(batches(b.val, 4, shuffle=False)) \
                + list(batches(b.test, 4, shuffle=False))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["test/class1/2.png", "train/class0/5.png"])
def test_a_damaged_image_anywhere_is_found_before_training(tmp_path, where):
    # one in the test split was found only after the last epoch (the statistics decode a sample)
    root = make_folder(tmp_path / "imgs", per_class=9, split_dirs=True)
    (root / where).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{where.split('/')[-1]} cannot be read as an image") as e:
        load_dataset(str(root), (1, 3, 8, 8))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout, message", [
    ("empty", "no images in class subfolders"),
    ("one-class", "found one class"),
])
def test_folders_that_cannot_train(tmp_path, layout, message):
    root = tmp_path / "imgs"
    root.mkdir()
    if layout == "one-class":
        (root / "cats").mkdir()
        Image.new("RGB", (4, 4)).save(root / "cats" / "a.png")
    with pytest.raises(DataError, match=message):
        load_dataset(str(root), (1, 3, 8, 8))


def test_more_folder_classes_than_model_outputs(tmp_path):
    with pytest.raises(DataError, match="3 classes but the model outputs 2"):
        load_dataset(str(make_folder(tmp_path / "imgs", per_class=3)), (1, 3, 8, 8), num_classes=2)


def test_torchvision_lists_the_folder_where_it_is_importable(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", per_class=4)
    calls = []

    def find_classes(directory):
        calls.append(directory)
        return ["class0", "class1", "class2"], {"class0": 0, "class1": 1, "class2": 2}

    folder = types.ModuleType("torchvision.datasets.folder")
    folder.find_classes = find_classes
    for name in ("torchvision", "torchvision.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchvision.datasets.folder", folder)
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert calls == [str(root)] and len(b.train) + len(b.val) + len(b.test) == 12


def _labels_by_folder(split, classes, depth=1):
    """Each example's label beside the index of the class its file's folder names."""
    return [(int(y), classes.index(Path(f).parents[depth - 1].name)) for f, y in zip(split.files, split.y)]


@pytest.mark.parametrize("split", ["test", "val", "Test", "valid", "Validation"])
def test_a_test_folder_of_classes_beside_class_folders_is_the_test_split(tmp_path, split):
    """ROOT/<class>/ with ROOT/test/<class>/ and no ROOT/train/: "test" was trained as a fourth class
    (its images labelled "test") and 10% of the training images were held out as the test split."""
    root = make_folder(tmp_path / "imgs", per_class=10)
    make_folder(root / split, per_class=3, seed=1)
    b = load_dataset(str(root), (1, 3, 8, 8), num_classes=3)
    assert b.class_names == ["class0", "class1", "class2"] and b.num_classes == 3
    assert len(b.test) == 9 and len(b.train) + len(b.val) == 30
    assert all(Path(f).parent.parent.name == split for f in b.test.files)
    for part in (b.train, b.val, b.test):
        assert all(y == want for y, want in _labels_by_folder(part, b.class_names))
    assert not any("held out" in n for n in b.notes), b.notes


def test_split_folders_match_in_any_case_and_by_synonym(tmp_path):
    """ROOT/Training/<class>/ with ROOT/valid/<class>/ (Kaggle's layout): Training holds the classes
    and valid/ is the test split (it was ignored, unnamed); a class folder named "dev" with images
    of its own stays a class."""
    root = tmp_path / "kaggle"
    make_folder(root / "Training", per_class=6)
    make_folder(root / "valid", per_class=2, seed=1)
    b = load_dataset(str(root), (1, 3, 8, 8), num_classes=3)
    assert b.class_names == ["class0", "class1", "class2"] and len(b.test) == 6
    assert all(Path(f).parent.parent.name == "valid" for f in b.test.files)
    flat = make_folder(tmp_path / "flat", per_class=6)
    (flat / "class2").rename(flat / "dev")
    assert load_dataset(str(flat), (1, 3, 8, 8), num_classes=3).class_names == ["class0", "class1", "dev"]


def test_held_out_splits_are_stratified(tmp_path):
    """Three classes of 53 images and one of a single image: a plain random split put the single
    image in the test or validation split, so its class was never trained on. Stratified, every
    class keeps an image to train on and the big classes share the held-out images evenly."""
    root = make_folder(tmp_path / "imgs", per_class=53)
    make_folder(tmp_path / "one", per_class=1, seed=3)
    (tmp_path / "one" / "class0").rename(root / "z")
    b = load_dataset(str(root), (1, 3, 8, 8), num_classes=4)
    assert b.class_names[-1] == "z"
    counts = {name: np.bincount(np.asarray(part.y), minlength=4) for name, part in
              (("train", b.train), ("val", b.val), ("test", b.test))}
    assert counts["train"][3] == 1 and counts["test"][3] == 0 and counts["val"][3] == 0
    assert len(b.test) == 16 and max(counts["test"][:3]) - min(counts["test"][:3]) <= 1
    assert max(counts["val"][:3]) - min(counts["val"][:3]) <= 1


def test_a_test_folder_whose_classes_differ_is_refused_naming_the_difference(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=6)
    make_folder(root / "test", per_class=2)
    (root / "test" / "class2").rename(root / "test" / "classX")
    with pytest.raises(DataError, match=r"test/ has classX that .* has not; test/ lacks class2") as e:
        load_dataset(str(root), (1, 3, 8, 8))
    assert "\n" not in str(e.value)


def test_a_test_folder_of_unlabelled_images_beside_class_folders_is_refused(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=6)
    (root / "test").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "0.png")
    with pytest.raises(DataError, match="test/ holds images but no class subfolders") as e:
        load_dataset(str(root), (1, 3, 8, 8))
    assert "\n" not in str(e.value)


def test_folders_named_like_splits_are_not_taken_as_classes(tmp_path):
    # training/ and testing/ were refused (each would have been one class); they are the splits
    root = tmp_path / "imgs"
    make_folder(root / "training", per_class=4)
    make_folder(root / "testing", per_class=2)
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert b.class_names == ["class0", "class1", "class2"] and len(b.test) == 6
    assert len(b.train) + len(b.val) == 12


def test_a_class_whose_images_are_in_subfolders_is_one_class_with_a_note(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root / "animals", per_class=4)  # animals/class0/, animals/class1/, animals/class2/
    make_folder(root / "cars", per_class=4)
    for f in (root / "cars").glob("*/*.png"):
        f.rename(root / "cars" / f"{f.parent.name}-{f.name}")
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert b.class_names == ["animals", "cars"]
    files = b.train.files + b.val.files + b.test.files
    labels = torch.cat([b.train.y, b.val.y, b.test.y])
    assert all(int(y) == (0 if "/animals/" in f else 1) for f, y in zip(files, labels))
    assert any("animals" in n and "subfolders" in n and "labelled animals" in n for n in b.notes), b.notes


def test_linked_folders_that_loop_or_reach_another_class_are_not_entered(tmp_path):
    # class0/up -> .. labelled every class's images class0, 16 deep: 2460 "images" from 60 files,
    # the same file in train and test
    root = make_folder(tmp_path / "imgs", per_class=4)
    (root / "class0" / "up").symlink_to("..")
    (root / "class1" / "more").symlink_to(root / "class2")
    (root / "class2" / "self").symlink_to(root / "class2")
    (root / "class2" / "extra").mkdir()
    Image.new("RGB", (14, 10), COLOURS[2]).save(root / "class2" / "extra" / "e.png")
    (tmp_path / "shared").mkdir()  # a link out of the data set is followed, as ImageFolder does
    Image.new("RGB", (14, 10), COLOURS[1]).save(tmp_path / "shared" / "s.png")
    (root / "class1" / "outside").symlink_to(tmp_path / "shared")
    b = load_dataset(str(root), (1, 3, 8, 8), num_classes=3)
    files = b.train.files + b.val.files + b.test.files
    assert len(files) == 14 and len({Path(f).resolve() for f in files}) == 14
    labels = {Path(f).resolve(): int(y) for f, y in zip(files, torch.cat([b.train.y, b.val.y, b.test.y]))}
    assert all(y == int(f.parent.name[-1]) for f, y in labels.items() if f.parent.name.startswith("class"))
    assert labels[(root / "class2" / "extra" / "e.png").resolve()] == 2
    assert labels[(tmp_path / "shared" / "s.png").resolve()] == 1


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    """It was counted: 4 classes, "labels go up to 3", one output never a target."""
    root = make_folder(tmp_path / "imgs", per_class=6)
    (root / "c_empty").mkdir()
    with pytest.raises(DataError, match=r"class folder \S*c_empty has no images.*remove it") as e:
        load_dataset(str(root), (1, 3, 8, 8), num_classes=4)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- .npz


def test_npz_grey_images_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (50, 12, 12)).astype(np.uint8), y=rng.integers(0, 4, 50))
    b = load_dataset(str(tmp_path / "d.npz"), (1, 3, 16, 16))
    assert b.kind == "npz" and not b.augment and isinstance(b.train, Split)
    assert len(b.test) == 5 and len(b.train) + len(b.val) == 45
    assert b.train.x.shape[1:] == (3, 16, 16)
    assert any("resizing 12x12 images to 16x16" in n for n in b.notes)
    assert any("replicating the grey channel" in n for n in b.notes)


def test_npz_channels_last_with_test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((20, 8, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 3, x_test=x[:6], y_test=np.arange(6) % 3)
    b = load_dataset(str(tmp_path / "d.npz"), (1, 3, 8, 8), val_fraction=0.0)
    assert len(b.test) == 6 and len(b.train) == 20 and b.notes == []
    # the channel axis moved: example 0's red plane is its [..., 0] slice, normalised
    mean, std = torch.from_numpy(x).mean(), torch.from_numpy(x).std()
    ex0 = (torch.from_numpy(x[0, :, :, 0]) - mean) / std
    assert any(torch.allclose(b.train.x[i, 0], ex0) for i in range(len(b.train)))


def test_npz_channels_last_with_four_channels_keeps_them_for_a_four_channel_model(tmp_path):
    """RGB + depth, [N, H, W, 4]: every channel reaches a model taking 4; only a 3-channel model
    (image or vector) has the 4th dropped as alpha, and is told."""
    rng = np.random.default_rng(2)
    x = rng.random((20, 8, 8, 4)).astype(np.float32)
    x[..., 3] += 5.0  # the depth plane: unlike the others
    np.savez(tmp_path / "rgbd.npz", x=x, y=np.arange(20) % 3, x_test=x[:6], y_test=np.arange(6) % 3)
    b = load_dataset(str(tmp_path / "rgbd.npz"), (1, 4, 8, 8), val_fraction=0.0)
    assert b.train.x.shape[1:] == (4, 8, 8) and b.test.x.shape[1:] == (4, 8, 8) and b.notes == []
    mean, std = torch.from_numpy(x).mean(), torch.from_numpy(x).std()
    depth0 = (torch.from_numpy(x[0, :, :, 3]) - mean) / std
    assert any(torch.allclose(b.train.x[i, 3], depth0) for i in range(len(b.train)))
    for shape in ((1, 3, 8, 8), (1, 3 * 8 * 8)):
        rgb = load_dataset(str(tmp_path / "rgbd.npz"), shape, val_fraction=0.0)
        assert rgb.train.x.shape[1:] == (3, 8, 8) and rgb.test.x.shape[1:] == (3, 8, 8)
        assert rgb.notes == ["rgbd.npz: x: dropping the 4th (alpha) channel of its [N, H, W, 4] images for a "
                             "model that takes 3 channels"]
    assert load_dataset(str(tmp_path / "rgbd.npz"), (1, 4 * 8 * 8), val_fraction=0.0).train.x.shape[1:] == (4, 8, 8)


def test_npz_shaped_as_the_models_input_is_taken_as_it_is(tmp_path):
    """A 4-channel signal model taking [N, 4, 64, 1]: x of exactly that shape was read as channels
    last (its last axis of 1), transposed to [N, 1, 4, 64], resized and replicated: 37% accuracy
    where plain PyTorch reached 100%."""
    rng = np.random.default_rng(3)
    x = rng.random((20, 4, 64, 1)).astype(np.float32)
    np.savez(tmp_path / "sig.npz", x=x, y=np.arange(20) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
    b = load_dataset(str(tmp_path / "sig.npz"), (1, 4, 64, 1), val_fraction=0.0)
    assert b.train.x.shape[1:] == (4, 64, 1) and b.notes == [], b.notes
    mean, std = torch.from_numpy(x).mean(), torch.from_numpy(x).std()
    assert any(torch.allclose(b.train.x[i], (torch.from_numpy(x[0]) - mean) / std) for i in range(len(b.train)))


@pytest.mark.parametrize("kind", ["16-bit png", "float tiff"])
def test_16_bit_and_float_images_keep_their_values(tmp_path, kind):
    """Pillow's convert("L") clipped them to 255: every 16-bit pixel >= 255 decoded as 1.0, both
    classes alike (33% accuracy), a float TIFF in [0, 1] to {0, 1/255}."""
    rng = np.random.default_rng(4)
    for c, level in enumerate((0.25, 0.75)):
        d = tmp_path / "imgs" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(6):
            a = np.clip(level + rng.normal(0, 0.05, (8, 8)), 0, 1)
            if kind == "16-bit png":
                Image.fromarray((a * 65535).astype(np.uint16)).save(d / f"{i}.png")
            else:
                Image.fromarray(a.astype(np.float32), mode="F").save(d / f"{i}.tif")
    b = load_dataset(str(tmp_path / "imgs"), (1, 1, 8, 8), val_fraction=0.0, normalize=False)
    x, y = b.train.take(torch.arange(len(b.train)))
    dark, bright = float(x[y == 0].mean()), float(x[y == 1].mean())
    assert abs(dark - 0.25) < 0.03 and abs(bright - 0.75) < 0.03, (dark, bright)
    rgb = load_dataset(str(tmp_path / "imgs"), (1, 3, 8, 8), val_fraction=0.0, normalize=False)
    x3, _ = rgb.train.take(torch.arange(2))
    assert x3.shape == (2, 3, 8, 8) and torch.equal(x3[:, 0], x3[:, 2])


def test_16_bit_pgm_reads_its_range_and_32_bit_integer_tiff_is_refused(tmp_path):
    """Pillow opens a 16-bit PGM in mode "I" (rescaled to 16 bits) and a 32-bit integer TIFF in the
    same mode: the PGM was right by luck of the 65535 divisor, the TIFF (values up to 2**31) read
    as values far above 1, with no word."""
    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    a = np.full((8, 8), 49151, dtype=">u2")  # 0.75 of 65535
    (d / "x.pgm").write_bytes(b"P5\n8 8\n65535\n" + a.tobytes())
    (tmp_path / "imgs" / "b" / "y.pgm").write_bytes(b"P5\n8 8\n65535\n" + (a // 3).tobytes())
    assert abs(float(decode_image(str(d / "x.pgm"), (1, 8, 8)).mean()) - 0.75) < 1e-4
    Image.fromarray(np.full((8, 8), 3_000_000, dtype=np.int32)).save(tmp_path / "imgs" / "b" / "z.tif")
    with pytest.raises(DataError, match=r"z.tif holds 32-bit integer pixels.*save it as 8- or 16-bit") as e:
        load_dataset(str(tmp_path / "imgs"), (1, 1, 8, 8), val_fraction=0.0)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="32-bit integer pixels"):
        decode_image(str(tmp_path / "imgs" / "b" / "z.tif"), (1, 8, 8))


def test_npz_vectors_for_an_mlp(tmp_path):
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(0).random((30, 64)), y=np.arange(30) % 10)
    b = load_dataset(str(tmp_path / "v.npz"), (1, 64))
    assert b.train.x.shape[1:] == (64,)
    with pytest.raises(DataError, match="vectors of 64 values but the model takes images"):
        load_dataset(str(tmp_path / "v.npz"), (1, 1, 8, 8))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 8, 8))}, "needs x .images. and y"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, -1, 0])}, "negative label"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0.5, 1, 1, 0])}, "integer class labels"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 1])}, "x has 4 examples but y has 3"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 1, 0]), "x_test": np.zeros((2, 8, 8))}, "only one of x_test"),
    ({"x": np.array([{"a": 1}] * 4, dtype=object), "y": np.zeros(4, dtype=int)}, "not a readable .npz"),
])
def test_bad_npz_is_one_data_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(str(tmp_path / "bad.npz"), (1, 1, 8, 8))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arrays, val_fraction, message", [
    # one example: all of it would be the training split and none the test split
    ({"x": np.zeros((1, 8, 8)), "y": np.array([1])}, 0.1, r"1 example.*at least 2 examples"),
    ({"x": np.zeros((0, 8, 8)), "y": np.zeros(0, dtype=int)}, 0.1, r"0 examples.*at least 2 examples"),
    # validation takes the only training example: 3 -> 1 test + 2 val + 0 train
    ({"x": np.zeros((3, 8, 8)), "y": np.array([0, 1, 0])}, 0.9, r"at least \d+ examples"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((0, 8, 8)),
      "y_test": np.zeros(0, dtype=int)}, 0.1, "x_test"),
])
def test_too_few_examples_is_one_data_error(tmp_path, arrays, val_fraction, message):
    np.savez(tmp_path / "few.npz", **arrays)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(str(tmp_path / "few.npz"), (1, 1, 8, 8), val_fraction=val_fraction)
    assert "\n" not in str(e.value)


def test_the_smallest_npz_trains(tmp_path):
    np.savez(tmp_path / "two.npz", x=np.random.default_rng(0).random((2, 8, 8)), y=np.array([0, 1]))
    b = load_dataset(str(tmp_path / "two.npz"), (1, 1, 8, 8))
    assert (len(b.train), len(b.val), len(b.test)) == (1, 0, 1)


@pytest.mark.parametrize("with_test", [False, True])
def test_npz_of_one_class_is_refused_like_a_folder_of_one(tmp_path, with_test):
    """All labels 0 trained, and its test accuracy read 100%."""
    x = np.random.default_rng(0).random((30, 8, 8))
    extra = {"x_test": x[:6], "y_test": np.arange(6) % 2} if with_test else {}
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(30, dtype=int), **extra)
    with pytest.raises(DataError, match="one.npz: y holds one class .*two or more classes") as e:
        load_dataset(str(tmp_path / "one.npz"), (1, 1, 8, 8), num_classes=10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("labels, num_classes, noted", [
    (1 + np.arange(90) % 9, 10, True),     # 1..9 for 10 outputs: 1-based
    (np.arange(90) % 10, 10, False),       # 0..9: ordinary
    (1 + np.arange(90) % 3, 10, False),    # 1..3 for 10 outputs: 0 missing, but nothing says 1-based
    (np.arange(90) % 3, 10, False),        # 0..2 for 10 outputs: fewer classes (a note of its own)
])
def test_labels_that_look_1_based_get_a_note(tmp_path, labels, num_classes, noted):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((90, 8, 8)), y=labels)
    b = load_dataset(str(tmp_path / "d.npz"), (1, 1, 8, 8), num_classes=num_classes)
    hits = [n for n in b.notes if "label 0 never appears" in n]
    assert bool(hits) == noted, b.notes
    if noted:
        assert "1-based" in hits[0] and "0..9" in hits[0]


def test_1_based_labels_beyond_the_outputs_are_refused_with_the_hint(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((50, 8, 8)), y=1 + np.arange(50) % 10)
    with pytest.raises(DataError, match="model outputs 10.*label 0 never appears: are the labels 1-based") as e:
        load_dataset(str(tmp_path / "d.npz"), (1, 1, 8, 8), num_classes=10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("y, message", [
    ((np.arange(20) % 10) * 1e20, r"holds label 9e\+20, beyond any class index"),
    (np.full(20, 2.0 ** 63), r"holds label 9\.2\d*e\+18, beyond any class index"),
    (np.array([np.iinfo(np.uint64).max] + [1] * 19, dtype=np.uint64),
     r"holds label 1\.8\d*e\+19, beyond any class index"),
    (np.where(np.arange(20) == 3, np.inf, np.arange(20) % 2),
     r"holds NaN or infinite labels \(1 of 20, the first at index 3"),
    (np.where(np.arange(20) == 5, np.nan, np.arange(20) % 2), "holds NaN or infinite labels"),
    (np.where(np.arange(20) == 7, -np.inf, np.arange(20) % 2), "holds NaN or infinite labels"),
])
def test_labels_that_are_no_class_index_are_refused_naming_the_file(tmp_path, y, message):
    """Float labels beyond int64 were cast with a RuntimeWarning to -2**63 and failed in training,
    blamed on the model ("Target -9223372036854775808 is out of bounds")."""
    np.savez(tmp_path / "lab.npz", x=np.random.default_rng(0).random((20, 8, 8)), y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="lab.npz: y " + message) as e:
            load_dataset(str(tmp_path / "lab.npz"), (1, 1, 8, 8), num_classes=10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"garbage\n", "is not a NumPy .npz archive"),
    (b"", r"is not a NumPy .npz archive \(an empty file\)"),
    (None, "is a single .npy array, not an .npz archive"),
])
def test_a_file_that_is_no_npz_is_said_to_be_one(tmp_path, content, message):
    """numpy took it for a pickle: "This file contains pickled (object) data. If you trust the file
    you can load it unsafely using the `" (cut at 100 characters)."""
    path = tmp_path / "g.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(str(path), (1, 1, 8, 8))
    assert "pickled" not in str(e.value) and "numpy.savez(" in str(e.value) and "\n" not in str(e.value)


def test_the_first_line_of_a_reading_error_is_passed_on_whole(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8)), y=np.arange(4) % 2)
    long = "a reason " * 20 + "ends here."  # longer than the 100 characters it was cut to

    def failing_load(*args, **kwargs):
        raise ValueError(long + "\nsecond line")

    monkeypatch.setattr(np, "load", failing_load)
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "d.npz"), (1, 1, 8, 8))
    assert long in str(e.value) and "second line" not in str(e.value)


def test_split_size_messages_name_no_option_train_lacks(tmp_path):
    """They suggested "(with --val-fraction 0.1)"; `sparsify train` has no such option (val_fraction
    is a study's [train] key): it is named only when lowering it would let the set train."""
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 8, 8)), y=np.array([1]))
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "one.npz"), (1, 1, 8, 8))
    assert "at least 2 examples" in str(e.value) and "val" not in str(e.value).replace("validat", "")
    np.savez(tmp_path / "three.npz", x=np.zeros((3, 8, 8)), y=np.array([0, 1, 0]))
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "three.npz"), (1, 1, 8, 8), val_fraction=0.9)
    assert "--val-fraction" not in str(e.value) and "a val_fraction below 0.9" in str(e.value)
    for fraction in (0.0, 0.5):  # the suggestion is right: it trains
        load_dataset(str(tmp_path / "three.npz"), (1, 1, 8, 8), val_fraction=fraction)


def test_a_folder_too_small_to_split_is_one_data_error(tmp_path):
    # (one image in two classes was this test's case; a class folder without images is now refused
    # as such, test_an_empty_class_folder_is_refused_by_name)
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / c / "0.png")
    (root / "b" / "note.txt").write_text("no image")
    with pytest.raises(DataError, match=r"2 images, too few.*at least \d+ images") as e:
        load_dataset(str(root), (1, 3, 8, 8), val_fraction=0.9)
    assert "\n" not in str(e.value)


def test_unknown_name_or_missing_file():
    with pytest.raises(DataError, match="folder of images in class subfolders or an .npz"):
        load_dataset("no-such-set", (1, 1, 8, 8))
    with pytest.raises(DataError, match="no such file"):
        load_dataset("missing.npz", (1, 1, 8, 8))


# ---------------------------------------------------------------- augmentation


def test_augment_batch_is_seeded_crops_and_flips():
    x = torch.randn(16, 3, 8, 8)
    a = augment_batch(x, augment_generator(0, 1, 0))
    assert a.shape == x.shape and torch.equal(a, augment_batch(x, augment_generator(0, 1, 0)))
    assert not torch.equal(a, augment_batch(x, augment_generator(0, 2, 0)))
    # every output is a shifted (zero-padded) and possibly mirrored copy of its input
    for i in range(16):
        found = False
        for img in (x[i], x[i].flip(-1)):
            padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
            for dy in range(3):
                for dx in range(3):
                    found |= torch.equal(padded[:, dy:dy + 8, dx:dx + 8], a[i])
        assert found, i
    no_flip = augment_batch(x, augment_generator(0, 1, 0), flip=False)
    assert not torch.equal(no_flip, a)


def test_npz_normalisation_is_recorded_and_can_be_turned_off(tmp_path):
    """What the examples went through is recorded (the deployed model needs the same); with
    normalize=False they are fed as stored."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4, x_test=x[:8], y_test=np.arange(8) % 4)
    b = load_dataset(str(tmp_path / "d.npz"), (1, 3, 8, 8), val_fraction=0.0)
    mean, std = float(x.astype(np.float32).mean()), float(x.astype(np.float32).std(ddof=1))
    norm = b.normalization
    assert norm["units"] == "as stored" and norm["mean"] == pytest.approx([mean]) and norm["std"] == pytest.approx([std])
    torch.testing.assert_close(b.test.x, (torch.from_numpy(x[:8]).float() - mean) / std)
    assert f"{mean:.4g}" in norm["text"]
    raw = load_dataset(str(tmp_path / "d.npz"), (1, 3, 8, 8), val_fraction=0.0, normalize=False)
    assert raw.normalization is None
    torch.testing.assert_close(raw.test.x, torch.from_numpy(x[:8]).float())


def test_folder_normalisation_is_per_channel_pixels_in_unit_range(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=6)
    b = load_dataset(str(root), (1, 3, 8, 8))
    norm = b.normalization
    assert norm["units"] == "pixels scaled to [0, 1]" and len(norm["mean"]) == len(norm["std"]) == 3
    assert all(0 < m < 1 for m in norm["mean"])
    raw = load_dataset(str(root), (1, 3, 8, 8), normalize=False)
    x, _ = raw.train.take(torch.arange(4))
    assert raw.normalization is None and 0 <= float(x.min()) and float(x.max()) <= 1
    xn, _ = b.train.take(torch.arange(4))
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    torch.testing.assert_close(xn, (x - mean[:, None, None]) / std[:, None, None], atol=1e-5, rtol=1e-5)


def test_a_negative_mean_reads_as_a_sum():
    from sparsify.train.data import input_normalization

    assert input_normalization(torch.tensor(-0.0291), torch.tensor(1.5), "as stored")["text"] == \
        "(x + 0.0291) / 1.5, x as stored"


def test_numbered_class_folders_note_their_text_order(tmp_path):
    # Folders 0 .. 11: "10" is class 2 (text order, as torchvision's ImageFolder has it), which a
    # model trained with labels by value read as a permutation: 27% for one at 100%, without a word
    root = tmp_path / "nums"
    make_folder(root, per_class=4)
    for c in range(3, 12):
        (root / str(c)).mkdir()
        for f in sorted((root / "class0").glob("*.png"))[:4]:
            (root / str(c) / f.name).write_bytes(f.read_bytes())
    for c in range(3):
        (root / f"class{c}").rename(root / str(c))
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert b.class_names[:4] == ["0", "1", "10", "11"]
    (note,) = [n for n in b.notes if "text order" in n]
    assert "folder 10 is class 2" in note and "zero-pad the names (00, 01, 02, ...)" in note, note
    for c in range(3, 10):  # 0 .. 9: text order is numeric order, no note
        shutil.rmtree(root / str(c + 2))
    assert not [n for n in load_dataset(str(root), (1, 3, 8, 8)).notes if "text order" in n]


def test_an_archivers_macos_folder_is_no_class_and_same_size_images_are_not_said_resized(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4, size=(8, 8))
    (root / "__MACOSX" / "class0").mkdir(parents=True)  # a zip made on macOS unpacks this beside the classes
    Image.new("RGB", (8, 8)).save(root / "__MACOSX" / "class0" / "._0.png")
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert b.class_names == ["class0", "class1", "class2"]
    (note,) = [n for n in b.notes if "images (e.g." in n]
    assert "are the model's size" in note and "resized to the model's" not in note, note
    assert any("resized to the model's 6x6" in n for n in load_dataset(str(root), (1, 3, 6, 6)).notes)
    # a copy to a foreign disk leaves ._NAME AppleDouble files beside the images: not images (they
    # stopped training as unreadable)
    (root / "class1" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    b = load_dataset(str(root), (1, 3, 8, 8))
    assert not any("._x.png" in f for f in b.train.files + b.val.files + b.test.files)


def test_an_image_too_large_to_decode_is_one_line(tmp_path, monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS with DecompressionBombError, which
    went past the unreadable-image check as a traceback."""
    root = make_folder(tmp_path / "imgs", per_class=4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    Image.new("L", (30, 30)).save(root / "class1" / "big.png")
    with pytest.raises(DataError, match=r"big.png is too large to decode safely .*resize it or remove it") as e:
        load_dataset(str(root), (1, 3, 8, 8))
    assert "\n" not in str(e.value)


def test_a_folder_named_like_a_built_in_set_is_noted(tmp_path, monkeypatch):
    """--data digits with a folder ./digits beside: the built-in set is trained on (it was, silently)."""
    make_folder(tmp_path / "digits", per_class=4)
    monkeypatch.chdir(tmp_path)
    b = load_dataset("digits", (1, 1, 8, 8))
    assert b.num_classes == 10 and any("give --data ./digits" in n for n in b.notes), b.notes
    assert load_dataset("./digits", (1, 3, 8, 8)).class_names == ["class0", "class1", "class2"]


def test_data_paths_are_made_absolute_where_they_exist(tmp_path, monkeypatch):
    """One rule for a run's config and a study spec's [train]: a relative data folder / .npz and
    data_dir become absolute (next to the spec first, else the current directory); set names, empty
    and missing paths stay as given."""
    from sparsify.train.data import absolute_data_paths

    spec_dir, cwd = tmp_path / "spec", tmp_path / "cwd"
    (spec_dir / "imgs").mkdir(parents=True)
    (cwd / "imgs").mkdir(parents=True)
    (cwd / "cache").mkdir()
    monkeypatch.chdir(cwd)
    got = absolute_data_paths({"data": "imgs", "data_dir": "cache", "lr": 0.1}, spec_dir)
    assert got == {"data": str((spec_dir / "imgs").resolve()), "data_dir": str((cwd / "cache").resolve()), "lr": 0.1}
    assert absolute_data_paths({"data": "imgs"}) == {"data": str((cwd / "imgs").resolve())}
    for kept in ({"data": "mnist"}, {"data": ""}, {"data": "nowhere.npz"}, {"data_dir": None}, {}):
        assert absolute_data_paths(kept, spec_dir) == kept


def test_data_fingerprint_follows_what_a_data_path_holds(tmp_path):
    from sparsify.train.data import data_fingerprint

    assert data_fingerprint("digits") is None and data_fingerprint(str(tmp_path / "missing.npz")) is None
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8)), y=np.arange(4))
    first = data_fingerprint(str(tmp_path / "d.npz"))
    assert first == data_fingerprint(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 8, 8)), y=np.arange(4))
    assert data_fingerprint(str(tmp_path / "d.npz")) != first
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "a" / "0.png")
    before = data_fingerprint(str(folder))
    assert before == data_fingerprint(str(folder))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "a" / "1.png")
    assert data_fingerprint(str(folder)) != before


def test_data_fingerprint_sees_pixels_rewritten_at_the_same_size(tmp_path):
    """PGM files of one size keep their byte count when their pixels change: a folder's list of
    sizes alone read them as the same data."""
    import os

    from sparsify.train.data import data_fingerprint

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a" / "0.pgm")
    before = data_fingerprint(str(tmp_path))
    size = (tmp_path / "a" / "0.pgm").stat().st_size
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(tmp_path / "a" / "0.pgm")
    st = (tmp_path / "a" / "0.pgm").stat()
    os.utime(tmp_path / "a" / "0.pgm", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock
    assert (tmp_path / "a" / "0.pgm").stat().st_size == size and data_fingerprint(str(tmp_path)) != before


def test_an_npz_says_what_it_does_not_read_and_what_cannot_be_learned(tmp_path):
    """An extra array was ignored, a class only in y_test went unnoticed, and constant x was divided
    by a 1e-6 floor (the deployed model then saw inputs a million times larger): each now a note."""
    r = np.random.default_rng(0)
    x = r.standard_normal((120, 8, 32)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(120) % 3, lengths=np.full(120, 32),
             x_test=x[:30], y_test=np.arange(30) % 4)
    notes = load_dataset(str(tmp_path / "s.npz"), (1, 8, 32)).notes
    assert any("array lengths not read" in n for n in notes), notes
    assert any("label 3 appears in y_test only" in n for n in notes), notes
    np.savez(tmp_path / "c.npz", x=np.full((120, 8, 32), 2.5, np.float32), y=np.arange(120) % 3)
    data = load_dataset(str(tmp_path / "c.npz"), (1, 8, 32))
    assert any("constant (every value 2.5)" in n and "not scaled" in n for n in data.notes), data.notes
    assert float(data.train.x.abs().max()) == 0.0 and data.normalization["std"] == [1.0]
