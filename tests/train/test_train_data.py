"""Data sets: IDX files (raw and gzip), CIFAR batches, digits adaptation, splits, batching, fetch errors."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from sparsify.errors import DataError
from sparsify.train.data import batches, load_dataset, num_batches
from sparsify.train.fetch import fetch


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(folder, gz: bool, n_train: int = 50, n_test: int = 20) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), gz)
    _write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_raw_and_gzip(tmp_path, gz):
    _fake_mnist(tmp_path / "mnist", gz)
    b = load_dataset("mnist", (1, 1, 28, 28), data_dir=tmp_path)
    assert (len(b.train), len(b.val), len(b.test)) == (45, 5, 20)
    assert b.train.x.shape == (45, 1, 28, 28) and b.train.x.dtype == torch.float32
    assert abs(float(b.train.x.mean())) < 1e-4 and b.notes == []


def test_validation_split_is_fixed_and_disjoint(tmp_path):
    _fake_mnist(tmp_path / "fashion-mnist", gz=True)
    a = load_dataset("fashion-mnist", (1, 1, 28, 28), data_dir=tmp_path)
    b = load_dataset("fashion-mnist", (1, 1, 28, 28), data_dir=tmp_path)
    assert torch.equal(a.val.x, b.val.x)
    rows_val = {tuple(r.tolist()) for r in a.val.x.flatten(1)[:, :20]}
    rows_train = {tuple(r.tolist()) for r in a.train.x.flatten(1)[:, :20]}
    assert not rows_val & rows_train


def test_missing_files_name_the_fetch_command(tmp_path):
    with pytest.raises(DataError, match="sparsify data fetch mnist") as e:
        load_dataset("mnist", (1, 1, 28, 28), data_dir=tmp_path)
    # both places it looks: DIR/mnist (where `data fetch --data-dir DIR` puts the files) and DIR;
    # the message named only DIR/train-images-idx3-ubyte[.gz]
    assert f"neither {tmp_path / 'mnist'} (where `data fetch` puts them) nor {tmp_path} holds" in str(e.value)


def test_truncated_idx_is_a_data_error(tmp_path):
    _fake_mnist(tmp_path / "mnist", gz=False)
    f = tmp_path / "mnist" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", (1, 1, 28, 28), data_dir=tmp_path)


def test_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet", (1, 3, 224, 224))


def test_digits_resized_and_replicated_for_the_model():
    b = load_dataset("digits", (1, 3, 28, 28))
    assert b.train.x.shape[1:] == (3, 28, 28)
    assert any("resizing 8x8" in n for n in b.notes) and any("replicating" in n for n in b.notes)
    assert len(b.notes) == 2  # said once, not per split
    assert b.num_classes == 10 and len(b.train) + len(b.val) + len(b.test) == 1797


def test_more_classes_than_model_outputs_is_refused():
    with pytest.raises(DataError, match="10 classes but the model outputs 5"):
        load_dataset("digits", (1, 1, 8, 8), num_classes=5)


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        (base / name).write_bytes(pickle.dumps(d))
    b = load_dataset("cifar10", (1, 3, 32, 32), data_dir=tmp_path, val_fraction=0.1)
    assert b.train.x.shape[1:] == (3, 32, 32) and len(b.test) == 4 and len(b.train) + len(b.val) == 20


def test_cifar10_missing_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", (1, 3, 32, 32), data_dir=tmp_path)


def test_batches_depend_on_seed_and_epoch_and_shard_disjointly():
    b = load_dataset("synthetic", (1, 1, 4, 4), num_classes=3, synthetic_size=(100, 10))
    order = lambda **kw: torch.cat([y for _, y in batches(b.train, 7, shuffle=True, **kw)])  # noqa: E731
    assert torch.equal(order(seed=1, epoch=1), order(seed=1, epoch=1))
    assert not torch.equal(order(seed=1, epoch=1), order(seed=1, epoch=2))
    xs = [torch.cat([x for x, _ in batches(b.train, 8, shuffle=True, seed=0, epoch=0, rank=r, world_size=2)])
          for r in (0, 1)]
    assert xs[0].shape == xs[1].shape
    assert not set(map(tuple, xs[0].flatten(1).tolist())) & set(map(tuple, xs[1].flatten(1).tolist()))
    assert num_batches(b.train, 8, world_size=2) == len(list(batches(b.train, 8, shuffle=False, rank=1, world_size=2)))


@pytest.mark.parametrize("n, size, world", [(33, 8, 1), (9, 8, 1), (67, 8, 2), (1, 8, 1), (8, 8, 1), (5, 1, 1)])
def test_a_last_batch_of_one_example_is_merged_into_the_one_before(n, size, world):
    from sparsify.train.data import Split

    split = Split(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))
    for rank in range(world):
        got = [y for _, y in batches(split, size, shuffle=True, seed=4, epoch=2, rank=rank, world_size=world,
                                     merge_single=True)]
        plain = [y for _, y in batches(split, size, shuffle=True, seed=4, epoch=2, rank=rank, world_size=world)]
        assert torch.equal(torch.cat(got), torch.cat(plain))  # the same examples in the same order
        assert len(got) == num_batches(split, size, world_size=world, merge_single=True)
        assert all(len(y) > 1 for y in got) or len(got) == 1 or size == 1
        if len(plain[-1]) == 1 and len(plain) > 1 and size > 1:
            assert len(got) == len(plain) - 1 and len(got[-1]) == size + 1


def test_vector_models_keep_image_shape():
    b = load_dataset("digits", (1, 64))
    assert b.train.x.shape[1:] == (1, 8, 8) and b.notes == []


def test_fetch_refuses_unfetchable_sets(tmp_path):
    with pytest.raises(DataError, match="digits is bundled"):
        fetch("digits", tmp_path)
    with pytest.raises(DataError, match="only mnist, fashion-mnist"):
        fetch("cifar10", tmp_path)


def test_fetch_uses_cache_when_files_present(tmp_path):
    from sparsify.train.fetch import MNIST_FILES

    dest = tmp_path / "mnist"
    dest.mkdir()
    for name, (size, _) in MNIST_FILES.items():
        with open(dest / name, "wb") as f:
            f.truncate(size)
    messages = []
    assert fetch("mnist", tmp_path, log=messages.append) == dest
    assert messages == [f"mnist already present in {dest}"]


def test_fetch_verifies_checksums(tmp_path):
    from sparsify.train import fetch as fetch_mod

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello")
    files = {"a": (5, "0" * 64)}
    with pytest.raises(DataError, match="sha256"):
        fetch_mod._install(files, src, tmp_path / "dest", lambda _m: None)
    assert not (tmp_path / "dest" / "a").exists()
