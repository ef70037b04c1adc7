"""Data sets for training: MNIST, Fashion-MNIST, sklearn digits, CIFAR-10 and a synthetic set.

Every set is loaded whole into memory as float tensors (normalised with the training split's
mean and standard deviation) and split into train / validation (10% of train, fixed seed, as in
Dettmers & Zettlemoyer 2019) / test. Batches come from ``batches``, a seeded generator that also
shards across distributed ranks; no DataLoader workers, so runs are reproducible bit for bit.

Files are read from ``data_dir/<name>`` (default: the user cache, see ``default_data_dir``);
``sparsify data fetch`` puts them there.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "synthetic")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
VAL_SPLIT_SEED = 20190710  # fixed, so every training seed sees the same validation set


def default_data_dir() -> Path:
    """The per-user cache directory that ``sparsify data fetch`` fills."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("sparsify")) / "data"


@dataclass
class Split:
    """Images [N, C, H, W] (float32, normalised) and integer labels [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    """A data set ready for training: train / validation / test splits and what was adapted."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    notes: list[str]


def _fetch_hint(name: str) -> str:
    return f"run `sparsify data fetch {name}`"


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and fetch the data set again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; delete it and fetch the data set again")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes); fetch the data set again")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_set(name: str, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = {}
    for key, stem in IDX_FILES.items():
        p = _find(folder, stem)
        if p is None:
            raise DataError(f"data set {name!r} not found: {folder / stem}[.gz] is missing; {_fetch_hint(name)} "
                            f"or pass --data-dir pointing to the IDX files")
        paths[key] = p
    xtr, ytr = _read_idx(paths["train_images"]), _read_idx(paths["train_labels"])
    xte, yte = _read_idx(paths["test_images"]), _read_idx(paths["test_labels"])
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise DataError(f"{folder}: image and label counts differ; fetch the data set again")
    return xtr[:, None], ytr, xte[:, None], yte


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).astype(np.float32)[:, None]  # 0..16 -> 0..255, [N, 1, 8, 8]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _load_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # The standard CIFAR-10 "python version" stores plain arrays with pickle; we only read the
    # user's own files from their data directory, with encoding="bytes" as the format requires.
    import pickle

    base = folder / "cifar-10-batches-py" if (folder / "cifar-10-batches-py").is_dir() else folder
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise DataError(f"data set 'cifar10' not found: {base / missing[0]} is missing; no registry here carries "
                        f"CIFAR-10, so put the python batches (cifar-10-batches-py) there or pass --data-dir")
    arrays = []
    for n in names:
        try:
            with open(base / n, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            arrays.append((np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                           np.asarray(d[b"labels"], dtype=np.int64)))
        except Exception as e:  # corrupt or foreign file
            raise DataError(f"{base / n} is not a CIFAR-10 python batch ({e}); replace it") from None
    xtr = np.concatenate([a[0] for a in arrays[:5]])
    ytr = np.concatenate([a[1] for a in arrays[:5]])
    return xtr, ytr, arrays[5][0], arrays[5][1]


def _synthetic(shape: tuple[int, int, int], num_classes: int, n_train: int, n_test: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class prototypes plus noise: separable, learnable in a few steps, any image shape."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(num_classes,) + tuple(shape)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        x = protos[y] + 0.8 * rng.normal(size=(n,) + tuple(shape)).astype(np.float32)
        return x, y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte


def _adapt(x: torch.Tensor, shape: tuple[int, int, int], name: str, notes: list[str]) -> torch.Tensor:
    """Resize (bilinear) and replicate grey channels so images match the model's input shape."""
    c, h, w = shape
    if x.shape[2:] != (h, w):
        notes.append(f"{name}: resizing {x.shape[2]}x{x.shape[3]} images to {h}x{w} (bilinear) to fit the model")
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            notes.append(f"{name}: replicating the grey channel to {c} channels to fit the model")
            x = x.expand(-1, c, -1, -1).contiguous()
        else:
            raise DataError(f"data set {name!r} has {x.shape[1]}-channel images but the model takes {c} channels; "
                            f"choose a data set that matches the model")
    return x


def load_dataset(name: str, input_shape: tuple[int, ...], *, data_dir: str | Path | None = None,
                 num_classes: int | None = None, val_fraction: float = 0.1, train_limit: int | None = None,
                 synthetic_size: tuple[int, int] = (512, 256)) -> DataBundle:
    """Load data set ``name`` shaped for a model taking ``input_shape`` (N, C, H, W) or (N, F)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if len(input_shape) >= 3:
        shape: tuple[int, int, int] | None = tuple(int(d) for d in input_shape[-3:])  # type: ignore[assignment]
    elif len(input_shape) == 2:
        shape = None  # a vector model: images keep their shape and are flattened per batch
    else:
        raise DataError(f"the model's input shape {tuple(input_shape)} is neither (N, C, H, W) nor (N, F)")
    folder = Path(data_dir) / name if data_dir is not None else default_data_dir() / name
    if data_dir is not None and not (Path(data_dir) / name).is_dir() and name in ("mnist", "fashion-mnist", "cifar10"):
        folder = Path(data_dir)  # allow --data-dir to point straight at the files
    if name in ("mnist", "fashion-mnist"):
        xtr, ytr, xte, yte = _load_idx_set(name, folder)
    elif name == "digits":
        xtr, ytr, xte, yte = _load_digits()
    elif name == "cifar10":
        xtr, ytr, xte, yte = _load_cifar10(folder)
    else:
        xtr, ytr, xte, yte = _synthetic(shape or (1, 1, int(input_shape[-1])), num_classes or 10, *synthetic_size)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    if num_classes is not None and n_classes > num_classes:
        raise DataError(f"data set {name!r} has {n_classes} classes but the model outputs {num_classes}; "
                        f"choose a data set with at most {num_classes} classes")

    notes: list[str] = []
    x_train = torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32))
    x_test = torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32))
    y_train, y_test = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))

    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    n_val = int(round(val_fraction * len(y_train)))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    if train_limit is not None:
        tr_idx = tr_idx[:train_limit]
    mean, std = x_train[tr_idx].mean(), x_train[tr_idx].std().clamp_min(1e-6)

    def prep(x: torch.Tensor, record: bool) -> torch.Tensor:
        x = (x - mean) / std
        return x if shape is None else _adapt(x, shape, name, notes if record else [])

    return DataBundle(
        name=name,
        train=Split(prep(x_train[tr_idx], True), y_train[tr_idx]),
        val=Split(prep(x_train[val_idx], False), y_train[val_idx]),
        test=Split(prep(x_test, False), y_test),
        num_classes=n_classes,
        notes=notes,
    )


def batches(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
            world_size: int = 1, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``split``; the order depends only on (seed, epoch), shards are disjoint per rank."""
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size  # equal shard sizes keep DDP ranks in lock step
        order = order[rank : per_rank * world_size : world_size]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield split.x[idx], split.y[idx]


def num_batches(split: Split, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """How many batches ``batches`` yields per epoch for one rank."""
    n = len(split) // world_size if world_size > 1 else len(split)
    return n // batch_size if drop_last else -(-n // batch_size)

