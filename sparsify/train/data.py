"""Data sets for training: built-in sets, a user's image folder or ``.npz`` arrays, and a synthetic set.

Built-in: MNIST, Fashion-MNIST, scikit-learn's digits, CIFAR-10 (loaded whole into memory as float
tensors, normalised with the training split's mean and standard deviation). A user's data:

- a folder of images in class subfolders (the ImageFolder layout: ``root/<class>/*.png``, or
  ``root/train/<class>/...``), with the test split in ``root/test/<class>/`` (or ``root/val/``)
  beside the class folders or beside ``train/`` (``_split_dirs``). A class folder without images,
  a test/ or val/ of images without class subfolders, and split-named folders of class subfolders
  (``root/training/``, ``root/testing/``) are refused (``_check_class_folders``). Only the file list is
  held in memory; each batch is decoded with Pillow when it is needed (``ImageFolderSplit``),
  resized (shorter side to the model's size, centre crop) and normalised per channel, in
  DataLoader worker processes when there are several cores. torchvision, where importable, lists
  the classes and files (``find_classes``/``make_dataset``) exactly as its ImageFolder does.
- an ``.npz`` file with ``x`` (images ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, or
  vectors ``[N, F]``) and integer labels ``y`` (class indices 0..C-1 of two or more classes; a note
  when they look 1-based), optionally ``x_test``/``y_test``. Channels last
  keeps every channel; only for a 3-channel model is the 4th of ``[N, H, W, 4]`` (alpha) dropped.

Every set is split into train / validation (``val_fraction`` of train, fixed seed, as in Dettmers &
Zettlemoyer 2019) / test; a user's set without a test part holds out ``TEST_FRACTION`` of it. A set
too small to leave one example to train on and one to test on (an ``.npz`` of one example) is a
DataError naming the smallest size that trains; the validation split may be empty. Images
are resized to the model's input and grey images replicated to its channels, and each adaptation
is reported once (``DataBundle.notes``). Batches come from ``batches``, whose order depends only
on (seed, epoch) and which shards across distributed ranks, so runs are reproducible bit for bit;
``augment_batch`` (random crop with padding, horizontal flip) draws from a generator seeded the
same way.

Files are read from ``data_dir/<name>`` (default: the user cache, see ``default_data_dir``);
``sparsify data fetch`` puts them there.
"""
from __future__ import annotations

import gzip
import os
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._io import file_sha256
from ..errors import DataError, name_list

DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "synthetic")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
VAL_SPLIT_SEED = 20190710  # fixed, so every training seed sees the same validation set
TEST_SPLIT_SEED = 20190711
TEST_FRACTION = 0.1        # held out as the test split of a user's set that has none
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
# folder names that mean a split of a data set, not a class (``_check_class_folders``)
ARCHIVE_FOLDERS = ("__MACOSX",)  # folders archivers add beside the class folders, never classes
TRAIN_SPLITS, TEST_SPLITS, VAL_SPLITS = ("train", "training"), ("test", "testing", "eval"), ("val", "valid", "validation", "dev")
SPLIT_NAMES = TRAIN_SPLITS + TEST_SPLITS + VAL_SPLITS  # matched in any case
STATS_SAMPLE = 256         # images decoded to estimate a folder's per-channel mean and std


def default_data_dir() -> Path:
    """The per-user cache directory that ``sparsify data fetch`` fills."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("sparsify")) / "data"


@dataclass
class Split:
    """Images [N, C, H, W] (float32, normalised) and integer labels [N], in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``idx`` as (x [B, C, H, W], y [B])."""
        return self.x[idx], self.y[idx]

    @property
    def example_numel(self) -> int:
        """Values per example (C*H*W)."""
        return int(self.x[0].numel()) if len(self) else 0

    lazy = False


@dataclass
class ImageFolderSplit:
    """Image files and their labels; ``take`` decodes, resizes and normalises a batch on demand.

    ``shape`` is the model's (C, H, W); ``mean``/``std`` are per channel, in [0, 1] pixel units.
    """

    files: list[str]
    y: torch.Tensor
    shape: tuple[int, int, int]
    mean: torch.Tensor
    std: torch.Tensor

    lazy = True

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([decode_image(self.files[int(i)], self.shape) for i in idx])
        return (x - self.mean[:, None, None]) / self.std[:, None, None], self.y[idx]

    @property
    def example_numel(self) -> int:
        c, h, w = self.shape
        return c * h * w


@dataclass
class DataBundle:
    """A data set ready for training: train / validation / test splits and what was adapted.

    ``kind`` is ``builtin``, ``folder`` or ``npz``; ``augment`` says whether training augments by
    default (image folders); ``class_names`` are the folder names of a folder set; ``normalization``
    the input normalisation applied (``input_normalization``), None when the examples are fed as they are.
    """

    name: str
    train: Split | ImageFolderSplit
    val: Split | ImageFolderSplit
    test: Split | ImageFolderSplit
    num_classes: int
    notes: list[str]
    kind: str = "builtin"
    augment: bool = False
    class_names: list[str] | None = None
    # What the examples went through before the model (``input_normalization``), None: as they are.
    normalization: dict[str, Any] | None = None


def _fetch_hint(name: str, data_dir: str | Path | None = None) -> str:
    """The command that fetches ``name`` to where the loader looks (``--data-dir`` given: there; the
    hint without it fetched into the cache and the same training failed again)."""
    where = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    return f"run `sparsify data fetch {name}{where}`"


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


def _load_idx_set(name: str, folder: Path, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = {}
    for key, stem in IDX_FILES.items():
        p = _find(folder, stem)
        if p is None:
            # `data fetch NAME --data-dir D` stores the files in D/NAME, which is read first
            where = (f"neither {Path(data_dir) / name} (where `data fetch` puts them) nor {folder} holds {stem}[.gz]"
                     if data_dir is not None and folder == Path(data_dir) else f"{folder / stem}[.gz] is missing")
            raise DataError(f"data set {name!r} not found: {where}; "
                            f"{_fetch_hint(name, data_dir)} or pass --data-dir pointing to the IDX files")
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


def _model_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(input_shape) >= 3:
        return tuple(int(d) for d in input_shape[-3:])  # type: ignore[return-value]
    if len(input_shape) == 2:
        return None  # a vector model: images keep their shape and are flattened per batch
    raise DataError(f"the model's input shape {tuple(input_shape)} is neither (N, C, H, W) nor (N, F)")


def is_user_data(name: str) -> bool:
    """True when ``name`` is not a built-in set but a path (a folder or an .npz file)."""
    return name not in DATASETS


def absolute_data_paths(config: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """``config`` (training settings) with a relative ``data`` folder / .npz and ``data_dir`` made
    absolute where they exist: under ``base_dir`` first (a study spec's folder, as model files are
    found), else in the current directory. A run trained on ``--data imgL`` could otherwise be
    resumed only from the directory it started in, and a study's job key would name two data sets
    alike when run from two directories. Built-in set names and missing paths are kept as given."""
    out = dict(config)
    for key in ("data", "data_dir"):
        value = out.get(key)
        if isinstance(value, os.PathLike):  # the API's data=Path("imgs")
            value = out[key] = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or (key == "data" and not is_user_data(value)):
            continue
        p = Path(value).expanduser()
        if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
            out[key] = str((base_dir / p).resolve())
        elif p.exists():
            out[key] = str(p.resolve())
    return out


def check_data_name(name: str) -> None:
    """UsageError-free check for TrainConfig.validate: DataError unless ``name`` is a set or an existing path."""
    if name in DATASETS:
        return
    if not name.strip():  # Path("") is ".": the current directory was read as an image folder
        raise DataError(f"--data is empty; choose one of {', '.join(DATASETS)}, or give a folder of images in class "
                        f"subfolders or an .npz file")
    p = Path(name).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"--data {name}: no such file; give an existing .npz file with arrays x and y")
        return
    if p.is_dir():
        return
    raise DataError(f"unknown data set {name!r} (no folder {p.absolute()} either); choose one of "
                    f"{', '.join(DATASETS)}, or give a folder of images in class subfolders or an .npz file with "
                    f"arrays x and y")


def data_fingerprint(name: str) -> str | None:
    """A checksum of what ``--data name`` reads, to tell when a user's data changed between two
    trainings that name it the same (a study resumed after the .npz was rebuilt): sha256 of an
    .npz file's bytes; of an image folder's file list with sizes and modification times (not the
    pixels: re-reading a large folder's images would cost minutes; PGM / BMP files of one size
    keep their byte count when their pixels change). A copy of the folder without its times reads
    as changed. None for the built-in sets and paths that do not exist."""
    import hashlib

    if name in DATASETS:
        return None
    p = Path(name).expanduser()
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    if p.is_dir():
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                full = Path(root) / f
                st = full.stat()
                h.update(f"{full.relative_to(p).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        return None
    return h.hexdigest()


def input_normalization(mean: torch.Tensor, std: torch.Tensor, units: str) -> dict[str, Any]:
    """The record of ``x -> (x - mean) / std`` applied to every example before the model.

    ``mean`` / ``std``: one value (the whole array) or one per channel; ``units``: what x is in
    ("as stored", "pixels scaled to [0, 1]"). ``text`` is the formula for messages (the numbers
    to 4 digits; per channel, they are only in ``mean`` / ``std``)."""
    m, s = [round(float(v), 6) for v in mean.reshape(-1)], [round(float(v), 6) for v in std.reshape(-1)]
    shift = f"x - {m[0]:.4g}" if m and m[0] >= 0 else f"x + {-m[0]:.4g}"
    text = f"({shift}) / {s[0]:.4g}" if len(m) == 1 else "(x - mean[c]) / std[c] per channel c"
    return {"mean": m, "std": s, "units": units, "text": f"{text}, x {units}"}


def load_dataset(name: str, input_shape: tuple[int, ...], *, data_dir: str | Path | None = None,
                 num_classes: int | None = None, val_fraction: float = 0.1, train_limit: int | None = None,
                 synthetic_size: tuple[int, int] = (512, 256), normalize: bool = True) -> DataBundle:
    """Load data set ``name`` shaped for a model taking ``input_shape`` (N, C, H, W) or (N, F).

    ``name`` is a built-in set (``DATASETS``), a folder of images in class subfolders, or an
    ``.npz`` file. ``normalize``: standardise the inputs with the training split's mean and standard
    deviation (one pair for arrays, one per channel for image folders, whose pixels are in [0, 1]);
    False feeds the values as they are (an image folder's pixels in [0, 1]). What was applied is
    ``DataBundle.normalization``. Raises DataError (one line) for anything that cannot be loaded.
    A built-in set's name wins over a folder of that name, with a note.
    """
    bundle = _load_dataset(name, input_shape, data_dir=data_dir, num_classes=num_classes, val_fraction=val_fraction,
                           train_limit=train_limit, synthetic_size=synthetic_size, normalize=normalize)
    if name in DATASETS and Path(name).exists():
        bundle.notes.append(f"--data {name} is the built-in set, not the folder ./{name} beside it; give "
                            f"--data ./{name} to train on the folder")
    return bundle


def _load_dataset(name: str, input_shape: tuple[int, ...], *, data_dir: str | Path | None, num_classes: int | None,
                  val_fraction: float, train_limit: int | None, synthetic_size: tuple[int, int],
                  normalize: bool) -> DataBundle:
    check_data_name(name)
    if len(input_shape) == 3:
        return _load_sequences(name, tuple(int(d) for d in input_shape), num_classes, val_fraction, train_limit,
                               synthetic_size, normalize)
    shape = _model_shape(input_shape)
    if is_user_data(name):
        p = Path(name).expanduser()
        if p.suffix == ".npz":
            xtr, ytr, xte, yte, notes = _load_npz(p, val_fraction, input_shape=input_shape)
            return _in_memory(str(p), xtr, ytr, xte, yte, shape, input_shape, num_classes, val_fraction,
                              train_limit, kind="npz", notes=notes, normalize=normalize)
        return _load_folder(p, shape, num_classes, val_fraction, train_limit, normalize)
    folder = Path(data_dir) / name if data_dir is not None else default_data_dir() / name
    if data_dir is not None and not (Path(data_dir) / name).is_dir() and name in ("mnist", "fashion-mnist", "cifar10"):
        folder = Path(data_dir)  # allow --data-dir to point straight at the files
    if name in ("mnist", "fashion-mnist"):
        xtr, ytr, xte, yte = _load_idx_set(name, folder, data_dir)
    elif name == "digits":
        xtr, ytr, xte, yte = _load_digits()
    elif name == "cifar10":
        xtr, ytr, xte, yte = _load_cifar10(folder)
    else:
        xtr, ytr, xte, yte = _synthetic(shape or (1, 1, int(input_shape[-1])), num_classes or 10, *synthetic_size)
    return _in_memory(name, xtr, ytr, xte, yte, shape, input_shape, num_classes, val_fraction, train_limit,
                      normalize=normalize)


def _check_classes(name: str, n_classes: int, num_classes: int | None, hint: str = "") -> None:
    """DataError when the labels go beyond the model's outputs; ``hint`` ends the message (a likely cause)."""
    if num_classes is not None and n_classes > num_classes:
        raise DataError(f"data set {name!r} has {n_classes} classes but the model outputs {num_classes} (its labels "
                        f"go up to {n_classes - 1}); choose a data set with at most {num_classes} classes (labels "
                        f"0..{num_classes - 1}) or a model with {n_classes} outputs{'; ' + hint if hint else ''}")


def _class_notes(name: str, n_classes: int, num_classes: int | None) -> list[str]:
    """A note when the data has fewer classes than the model has outputs (those are never a target)."""
    if num_classes is None or n_classes >= num_classes:
        return []
    return [f"{name}: {n_classes} classes for a model with {num_classes} outputs; outputs {n_classes}.."
            f"{num_classes - 1} are never a target (give the model {n_classes} outputs to train only those)"]


def _label_list(labels: list[int]) -> str:
    """Labels for a message, runs as ranges: [1, 2, 3, 4, 7] -> '1..4, 7'."""
    runs: list[list[int]] = []
    for v in labels:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return name_list([f"{a}..{b}" if b > a + 1 else f"{a}, {b}" if b == a + 1 else str(a) for a, b in runs], 4)


def _batch_shape(input_shape: tuple[int, ...]) -> str:
    """The model's input with its batch axis named, for messages: (1, 4, 100) -> '[N, 4, 100]'."""
    return "[N, " + ", ".join(str(d) for d in input_shape[1:]) + "]"


def _load_sequences(name: str, input_shape: tuple[int, ...], num_classes: int | None, val_fraction: float,
                    train_limit: int | None, synthetic_size: tuple[int, int], normalize: bool = True) -> DataBundle:
    """Data for a model taking rank-3 input ([N, C, L] signals, [N, T, F] sequences): taken as they are.

    Only ``synthetic`` and an ``.npz`` whose x is [N, *input_shape[1:]] fit; the image sets and
    image folders are refused (images are not resized into sequences).
    """
    want = _batch_shape(input_shape)
    if name == "synthetic":
        xtr, ytr, xte, yte = _synthetic(input_shape[1:], num_classes or 10, *synthetic_size)
        return _in_memory(name, xtr, ytr, xte, yte, None, input_shape, num_classes, val_fraction, train_limit,
                          normalize=normalize)
    p = Path(name).expanduser()
    if not (is_user_data(name) and p.suffix == ".npz"):
        what = f"data set {name!r} holds images" if not is_user_data(name) else f"--data {name} is not an .npz file"
        raise DataError(f"{what}, but the model takes {want} inputs (rank 3, e.g. Conv1d signals), which are "
                        f"read from an .npz only; give an .npz whose x is {want}, or --data synthetic")
    xtr, ytr, xte, yte, notes = _load_npz(p, val_fraction, images=False)
    return _in_memory(str(p), xtr, ytr, xte, yte, None, input_shape, num_classes, val_fraction, train_limit,
                      kind="npz", notes=notes, normalize=normalize)


def _val_split(labels: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation indices, training indices) of a training set of ``labels``: ``_n_val`` of them,
    stratified (``stratified_split``), fixed whatever the training seed. The training indices come
    in a fixed random order, so that a train_limit takes a sample of every class (a folder's files
    are listed class by class)."""
    held, rest = stratified_split(labels.numpy(), _n_val(len(labels), val_fraction), VAL_SPLIT_SEED)
    return torch.from_numpy(held), torch.from_numpy(np.random.default_rng(VAL_SPLIT_SEED).permutation(rest))


def stratified_split(labels: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out indices, the others), both sorted: ``n_held`` of ``labels`` taken class by class in
    proportion to the class sizes (largest remainders), leaving each class at least one example
    where the total allows (a class of one image, held out by a plain random split, was never
    trained on). scikit-learn's train_test_split(stratify=y) refuses classes of one example, which
    users' folders have. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    quota = n_held * counts / max(1, len(labels))
    keep_one = np.maximum(counts - 1, 0)
    alloc = np.minimum(np.floor(quota).astype(np.int64), keep_one)
    ties = rng.permutation(len(classes))
    order = sorted(range(len(classes)), key=lambda c: (-(quota[c] - np.floor(quota[c])), ties[c]))
    for cap in (keep_one, counts):  # one example of each class stays while the total allows
        while alloc.sum() < n_held and (alloc < cap).any():
            for c in order:
                if alloc.sum() < n_held and alloc[c] < cap[c]:
                    alloc[c] += 1
    held = [rng.permutation(np.flatnonzero(inverse == c))[:alloc[c]] for c in range(len(classes))]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), held_idx)
    return held_idx.astype(np.int64), rest.astype(np.int64)


def _in_memory(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
               shape: tuple[int, int, int] | None, input_shape: tuple[int, ...], num_classes: int | None,
               val_fraction: float, train_limit: int | None, kind: str = "builtin",
               notes: list[str] | None = None, normalize: bool = True) -> DataBundle:
    """Normalise (unless not ``normalize``), split and adapt arrays that fit in memory."""
    n_classes = int(max(ytr.max(), yte.max())) + 1
    # labels 1..N for an N-output model: output 0 never a target, and class N refused as out of range
    one_based = (num_classes is not None and n_classes >= num_classes and not (ytr == 0).any()
                 and not (yte == 0).any())
    hint = f"label 0 never appears: are the labels 1-based? sparsify expects 0..{num_classes - 1}" if one_based else ""
    _check_classes(name, n_classes, num_classes, hint)
    notes = list(notes or []) + _class_notes(name, n_classes, num_classes)
    absent = sorted(set(range(n_classes)) - set(np.unique(np.concatenate([ytr, yte])).tolist()))
    if absent and not (one_based and absent == [0]):  # labels {0, 5}: classes 1..4 were counted silently
        notes.append(f"{name}: labels {_label_list(absent)} below the largest ({n_classes - 1}) never appear; their "
                     f"outputs are never a target (relabel the classes 0..{n_classes - len(absent) - 1})")
    if one_based:
        notes.append(f"{name}: {hint} (subtract 1 from the labels); as they are, output 0 is never a target")
    x_train = torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32))
    x_test = torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32))
    y_train, y_test = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    if len(input_shape) == 3:  # signals / sequences: each example must be the model's input as it is
        for part, x in (("x", x_train), ("x_test", x_test)):
            if tuple(x.shape[1:]) != tuple(input_shape[1:]):
                want = _batch_shape(input_shape)
                raise DataError(f"{name}: {part} has examples of shape {list(x.shape[1:])} but the model takes "
                                f"{want} inputs; give {part} of shape {want}")
    elif shape is None and x_train[0].numel() != int(input_shape[-1]):
        raise DataError(f"the model takes vectors of {int(input_shape[-1])} values but {name} examples have "
                        f"{x_train[0].numel()}; choose a matching data set")
    if shape is not None and x_train.dim() != 4:
        raise DataError(f"{name} holds vectors of {x_train[0].numel()} values but the model takes images "
                        f"{'x'.join(map(str, shape))}; choose a matching data set")

    val_idx, tr_idx = _val_split(y_train, val_fraction)
    if train_limit is not None:
        tr_idx = tr_idx[:train_limit]
    normalization = None
    if normalize:
        mean, std = x_train[tr_idx].mean(), x_train[tr_idx].std()
        if not float(std) > 1e-6:  # dividing by the floor made deployed inputs 1e6 times larger
            std = torch.ones_like(std)
            notes.append(f"{name}: the training examples are constant (every value {float(mean):.4g}), so inputs "
                         "are centred but not scaled; check the data")
        normalization = input_normalization(mean, std, "as stored")

    def prep(x: torch.Tensor, record: bool) -> torch.Tensor:
        x = (x - mean) / std if normalize else x
        return x if shape is None else _adapt(x, shape, name, notes if record else [])

    return DataBundle(
        name=name,
        train=Split(prep(x_train[tr_idx], True), y_train[tr_idx]),
        val=Split(prep(x_train[val_idx], False), y_train[val_idx]),
        test=Split(prep(x_test, False), y_test),
        num_classes=n_classes,
        notes=notes,
        kind=kind,
        normalization=normalization,
    )


# ---------------------------------------------------------------- a user's .npz arrays


def _labels(y: Any, where: str) -> np.ndarray:
    """``y`` as int64 class indices; DataError (naming ``where``) for labels that are not such indices:
    non-integral, negative, NaN or infinite, or beyond int64 (a float 1e20 was cast to -2**63)."""
    y = np.asarray(y)
    if y.ndim != 1:  # (an empty y is judged by _check_split_sizes)
        raise DataError(f"{where} must be a 1-d array of integer class labels, got shape {list(y.shape)}")
    integer = np.issubdtype(y.dtype, np.integer)
    if not integer and not np.issubdtype(y.dtype, np.floating):
        raise DataError(f"{where} must hold integer class labels 0..C-1, got {y.dtype}")
    if not integer:
        bad = ~np.isfinite(y)
        if bad.any():
            raise DataError(f"{where} holds NaN or infinite labels ({int(bad.sum())} of {len(y)}, the first at "
                            f"index {int(np.argmax(bad))}); labels are class indices 0..C-1: repair or drop those "
                            f"examples")
        bad = y != np.floor(y)
        if bad.any():
            raise DataError(f"{where} must hold integer class labels 0..C-1, got {y.dtype} values such as "
                            f"{y[int(np.argmax(bad))]:g} (at index {int(np.argmax(bad))})")
    if y.size and y.min() < 0:
        raise DataError(f"{where} holds a negative label ({int(y.min())}); labels are class indices 0..C-1")
    if y.size and (int(y.max()) > np.iinfo(np.int64).max if integer else float(y.max()) >= 2.0 ** 63):
        raise DataError(f"{where} holds label {float(y.max()):g}, beyond any class index (int64); labels are "
                        f"class indices 0..C-1: give each example's class index")
    return y.astype(np.int64)


def _numeric(x: Any, where: str) -> np.ndarray:
    """``x`` as an array of real numbers with at least one example axis; DataError otherwise."""
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DataError(f"{where} must be a numeric array, got {x.dtype}")
    if x.ndim == 0:
        raise DataError(f"{where} must hold one example per row, got a single number")
    if np.issubdtype(x.dtype, np.floating) and x.size:  # (an empty x is judged by _check_split_sizes)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise DataError(f"{where} has NaN or infinite values in {int(bad.sum())} of its {len(x)} examples "
                            f"(the first is example {int(np.argmax(bad))}); repair or drop them: training on them "
                            "gives a NaN loss")
    return x


def _takes_rgb(input_shape: tuple[int, ...], h: int, w: int) -> bool:
    """Whether a model taking ``input_shape`` takes 3-channel images (of h x w, for a vector model)."""
    if len(input_shape) >= 4:
        return int(input_shape[-3]) == 3
    return len(input_shape) == 2 and int(input_shape[-1]) == 3 * h * w


def _images(x: Any, where: str, input_shape: tuple[int, ...] | None = None,
            notes: list[str] | None = None) -> np.ndarray:
    """[N, F], [N, H, W], [N, H, W, C] or [N, C, H, W] -> [N, F] or [N, C, H, W] (float32 for floats).

    Channels last (C of 1, 3 or 4) keeps every channel, but the 4th of RGBA images is dropped, with
    a note in ``notes``, for a model taking 3 channels (``input_shape``; None: never dropped). Images
    already shaped as the model's input (``input_shape[1:]``) are taken as they are.
    """
    x = _numeric(x, where)
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        as_given = input_shape is not None and len(input_shape) == 4 and tuple(x.shape[1:]) == tuple(input_shape[1:])
        if not as_given and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # channels last -> [N, C, H, W]
            if x.shape[1] == 4 and input_shape is not None and _takes_rgb(input_shape, x.shape[2], x.shape[3]):
                x = x[:, :3]
                if notes is not None:
                    notes.append(f"{where}: dropping the 4th (alpha) channel of its [N, H, W, 4] images for a model "
                                 f"that takes 3 channels")
        return x
    raise DataError(f"{where} must be [N, F], [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {list(x.shape)}")


def _load_npz(path: Path, val_fraction: float, images: bool = True,
              input_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                 list[str]]:
    """x, y (and x_test, y_test) from an .npz file; no pickled objects are read.

    ``images``: x is images or vectors (``_images``, for a model taking ``input_shape``); else the
    arrays are taken as they are.
    """
    save = "save it with numpy.savez(path, x=images, y=labels)"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e.strerror or e}); check the path") from None
    # np.load takes a file that is neither a zip nor an .npy for a pickle, and says so, cut at 100 characters
    if magic == b"\x93NUMPY":
        raise DataError(f"{path} is a single .npy array, not an .npz archive of x and y; {save}")
    if not magic.startswith(b"PK"):
        what = "an empty file" if not magic else "not a zip of .npy arrays"
        raise DataError(f"{path} is not a NumPy .npz archive ({what}); {save}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile / ValueError (object arrays) / OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable .npz of numeric arrays ({first}); {save}") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path} has arrays {', '.join(sorted(arrays)) or 'none'}; it needs x (images) and y "
                        f"(labels), and may have x_test and y_test")
    notes: list[str] = []
    extra = sorted(set(arrays) - {"x", "y", "x_test", "y_test"})
    if extra:
        notes.append(f"{path.name}: array{'s' if len(extra) > 1 else ''} {', '.join(extra)} not read (training reads "
                     "x, y, x_test and y_test)")

    def shaped(a: Any, where: str, record: bool = False) -> np.ndarray:
        return _images(a, where, input_shape, notes if record else None) if images else _numeric(a, where)

    x, y = shaped(arrays["x"], f"{path.name}: x", record=True), _labels(arrays["y"], f"{path.name}: y")
    if len(x) != len(y):
        raise DataError(f"{path.name}: x has {len(x)} examples but y has {len(y)} labels")
    if "x_test" in arrays or "y_test" in arrays:
        if "x_test" not in arrays or "y_test" not in arrays:
            raise DataError(f"{path.name} has only one of x_test and y_test; give both or neither")
        xte, yte = shaped(arrays["x_test"], f"{path.name}: x_test"), _labels(arrays["y_test"], f"{path.name}: y_test")
        if len(xte) != len(yte) or xte.shape[1:] != x.shape[1:]:
            raise DataError(f"{path.name}: x_test must have the shape of x per example and one label per example")
        _check_split_sizes(path.name, len(y), len(yte), val_fraction, held_out=False, test_part="x_test/y_test")
        _check_two_classes(path.name, y)
        unseen = sorted(set(np.unique(yte).tolist()) - set(np.unique(y).tolist()))
        if unseen:
            notes.append(f"{path.name}: label{'s' if len(unseen) > 1 else ''} {', '.join(map(str, unseen[:10]))} "
                         f"appear{'' if len(unseen) > 1 else 's'} in y_test only: the model never trains on "
                         f"{'them' if len(unseen) > 1 else 'it'}, so the test accuracy counts those examples wrong")
        return x, y, xte, yte, notes
    _check_split_sizes(path.name, len(y), None, val_fraction, held_out=True)
    _check_two_classes(path.name, y)
    test_idx, train_idx = _test_split(y)
    notes.append(f"{path.name}: no x_test/y_test, so {len(test_idx)} of its {len(y)} examples "
                 f"({TEST_FRACTION:.0%}) are held out as the test split")
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], notes


def _check_two_classes(name: str, y: np.ndarray) -> None:
    """DataError when the training labels ``y`` are all one class, as for an image folder of one class
    folder (it trained, and its test accuracy read 100%)."""
    classes = np.unique(y)
    if len(classes) == 1:
        raise DataError(f"{name}: y holds one class (every label is {int(classes[0])}); a classifier needs two or "
                        f"more classes: give examples of each, labelled 0..C-1")


def _n_test(n: int) -> int:
    """How many of ``n`` examples ``_test_split`` holds out: TEST_FRACTION, at least one (none of one)."""
    return max(1, int(round(TEST_FRACTION * n))) if n > 1 else 0


def _test_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, training indices): ``_n_test`` of ``labels``, stratified (``stratified_split``)."""
    return stratified_split(np.asarray(labels), _n_test(len(labels)), TEST_SPLIT_SEED)


def _n_val(n: int, val_fraction: float) -> int:
    """How many of ``n`` training examples ``_val_split`` takes for validation."""
    return int(round(val_fraction * n))


def _check_split_sizes(name: str, n: int, n_test: int | None, val_fraction: float, *, held_out: bool,
                       unit: str = "example", test_part: str = "the test part") -> None:
    """DataError unless ``n`` examples (and ``n_test`` given apart) leave one to train on and one to test on.

    ``held_out``: the test split is taken from the ``n`` (``_test_split``), else ``n_test`` were given
    apart. The validation split may be empty (training then goes without it). The message names
    the smallest set that trains with this ``val_fraction``.
    """
    def fit_split(m: int) -> tuple[int, int]:  # (train, validation) examples of m
        fit = m - (_n_test(m) if held_out else 0)
        return fit - _n_val(fit, val_fraction), _n_val(fit, val_fraction)

    if held_out:
        n_test = _n_test(n)
    assert n_test is not None
    n_train, n_val = fit_split(n)
    if n_train >= 1 and n_test >= 1:
        return
    if not held_out and n_test < 1:
        raise DataError(f"{name}: {test_part} is empty; give at least one test {unit} there, or leave it out to hold "
                        f"out {TEST_FRACTION:.0%} of the training {unit}s as the test split")
    need = next(m for m in range(2 if held_out else 1, 1_000_000) if fit_split(m)[0] >= 1)
    parts = f"{n_train} to train on, {n_val} to validate on" + (f" and {n_test} to test on" if held_out else "")
    # val_fraction is no option of `sparsify train` (a study's [train] key, a TrainConfig field): named
    # only when it is what leaves no example to train on, which its default (0.1) never does
    n_fit = n - (_n_test(n) if held_out else 0)
    lower = f", or a val_fraction below {val_fraction:g}" if n_val and n_fit >= 1 and n_test >= 1 else ""
    raise DataError(f"{name} has {n} {unit}{'' if n == 1 else 's'}{'' if held_out else ' for training'}, too few to "
                    f"split ({parts}); training needs one {unit} to train on and one to test on: give at least "
                    f"{need} {unit}s{'' if held_out else ' for training'} (validation takes {val_fraction:.0%} of the "
                    f"training {unit}s){lower}")


# ---------------------------------------------------------------- a user's image folder


def _subfolders(folder: Path) -> list[str]:
    """The sorted names of ``folder``'s subfolders (hidden ones left out), as class folders are listed."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` itself (not its subfolders) holds an image file."""
    try:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(folder))
    except OSError:
        return False


def _scan(root: Path, exclude: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names, but ``exclude``) and (file, class index) pairs, as torchvision's
    ImageFolder finds them, but for linked folders that loop (below). A class folder without images
    is listed among the classes with no file (the caller refuses it by name)."""
    try:
        from torchvision.datasets.folder import find_classes  # type: ignore[import-not-found]
    except Exception:  # not installed, or a build that does not import beside this torch
        find_classes = None
    if find_classes is not None:
        try:
            classes = [c for c in find_classes(str(root))[0] if c not in exclude]
        except (FileNotFoundError, OSError):
            return [], []
        if not classes:
            return [], []
    else:
        classes = [c for c in _subfolders(root) if c not in exclude]
    # Files as torchvision's make_dataset lists them (sorted walk, links followed), but a linked
    # folder that leads back to the data set's root, above it, to another class's folder or to one
    # already walked is not entered: a link "class0/up -> .." labelled every class's images class0,
    # up to 16 times each, in train and test alike.
    top = os.path.realpath(root)
    folders = {os.path.realpath(root / name) for name in classes}
    samples = []
    for c, name in enumerate(classes):
        seen = {top} | folders
        walked = []
        for dirpath, dirs, files in os.walk(root / name, followlinks=True):
            keep = []
            for d in sorted(dirs):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in seen or top.startswith(real + os.sep):
                    continue
                seen.add(real)
                keep.append(d)
            dirs[:] = keep  # os.walk enters only these
            walked.append((dirpath, files))
        for dirpath, files in sorted(walked):
            for f in sorted(files):
                # ._NAME: macOS's AppleDouble metadata beside each file copied to a foreign disk, no image
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("._"):
                    samples.append((os.path.join(dirpath, f), c))
    return classes, samples


def _split_dirs(root: Path) -> tuple[Path | None, list[str]]:
    """(the folder of training classes, the names of ``root``'s test/ and val/ folders that are splits).

    ``root/train/`` holds the classes when it exists, and test/ and val/ beside it are splits. Without
    it the classes are ``root``'s subfolders, but a test/ or val/ of class subfolders is a split, not a
    class (it was trained as one, its images labelled "test"); a test/ or val/ of images only is
    refused (an unlabelled test set, or a class named like a split). Names match in any case and
    with their synonyms (TRAIN_SPLITS, TEST_SPLITS, VAL_SPLITS: Test/, Kaggle's valid/, ...; the
    test-like folder is the test split, a val-like one the fallback). None: no folder of classes.
    """
    subs = _subfolders(root)

    def named(names: tuple[str, ...]) -> list[str]:  # any case: Test/, VALID/ ("Test" was trained as a class)
        return [d for d in subs if d.lower() in names][:1]

    train, held = named(TRAIN_SPLITS), named(TEST_SPLITS) + named(VAL_SPLITS)
    if train:
        return root / train[0], held
    splits = []
    for d in held:
        if _subfolders(root / d):
            splits.append(d)
        elif d.lower() in ("test", "val") and _holds_images(root / d) and len(subs) > 1:
            raise DataError(f"--data {root}: {d}/ holds images but no class subfolders; a {d} split needs "
                            f"{root / d}/<class>/<image> with the training classes' names (and without "
                            f"{root}/train/ its other folders are the classes); rename {d}/ if it is a class")
    return root, splits


def _check_class_folders(root: Path, train_root: Path, classes: list[str], samples: list[tuple[str, int]],
                         notes: list[str]) -> None:
    """DataError for class folders that cannot be classes; a note for a class made of several subfolders,
    and for numbered class folders whose text order (the labels') is not their numeric order.

    A class folder without images cannot be learned (it was counted, one more output that is never a
    target). Class folders named like splits (``root/training/<class>``, ``root/testing/<class>``)
    that hold subfolders and no image of their own are splits: each would be one class. Other
    classes whose images are all in subfolders are kept (torchvision's ImageFolder reads them so),
    with a note.
    """
    by_value = sorted(classes, key=int) if all(c.isdigit() for c in classes) else classes
    if by_value != classes:
        # labels follow the names' text order (torchvision's ImageFolder's too): weights trained with
        # folder "10" as class 10 read it as class 2 here (27% for a model at 100%), silently
        i = next(j for j, (a, b) in enumerate(zip(classes, by_value)) if a != b)
        width = max(len(c) for c in classes)
        notes.append(f"{root}: its class folders are numbers, and classes follow their names' text order "
                     f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}: folder {classes[i]} is class "
                     f"{i}), as torchvision's ImageFolder orders them; for labels by value, zero-pad the names "
                     f"({', '.join(c.zfill(width) for c in by_value[:3])}, ...)")
    counts = np.bincount(np.array([y for _, y in samples], dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        s = len(empty) > 1
        where = f"folders {name_list(empty)} in {train_root}" if s else f"folder {train_root / empty[0]}"
        raise DataError(f"--data {root}: class {where} {'have' if s else 'has'} no images; a class without images "
                        f"cannot be learned: remove {'them' if s else 'it'} or add {'their' if s else 'its'} images")
    nested = {c: _subfolders(train_root / c) for c in classes if not _holds_images(train_root / c)}
    nested = {c: inner for c, inner in nested.items() if inner}
    if len(nested) == len(classes) and all(c.lower() in SPLIT_NAMES for c in classes):
        raise DataError(f"--data {root}: its folders {name_list(classes)} are named like splits and hold subfolders "
                        f"({name_list(nested[classes[0]])}), so each would be one class; put the splits in "
                        f"{root}/train/<class>/ and {root}/test/<class>/, or give one split folder as --data")
    several = [c for c, inner in nested.items() if len(inner) >= 2]
    if len(several) == 1:
        c = several[0]
        notes.append(f"{root}: class {c}'s images are in its subfolders ({name_list(nested[c])}), all labelled {c}; "
                     f"to make those subfolders classes, move them up beside {c}/")
    elif several:
        c = several[0]
        notes.append(f"{root}: classes {name_list(several)} have their images in subfolders (e.g. {c}/{nested[c][0]}/, "
                     f"{c}/{nested[c][1]}/), each labelled with its class folder's name; to make those subfolders "
                     f"classes, move them up beside the class folders")


def _split_classes_differ(test_dir: Path, test_classes: list[str], train_root: Path, classes: list[str]) -> DataError:
    """The one line for a test split whose class subfolders are not the training classes."""
    extra = [c for c in test_classes if c not in classes]
    missing = [c for c in classes if c not in test_classes]
    parts = ([f"{test_dir.name}/ has {name_list(extra)} that {train_root} has not"] if extra else []) + \
        ([f"{test_dir.name}/ lacks {name_list(missing)}"] if missing else [])
    return DataError(f"{test_dir} does not hold the training classes ({'; '.join(parts)}); the splits must have "
                     f"the same class subfolders: rename, add or remove folders so that they match")


def _unreadable(file: str, e: BaseException) -> DataError:
    """The one line for an image file Pillow cannot read (its header at load, its pixels per batch)."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):  # over twice Pillow's MAX_IMAGE_PIXELS: a traceback
        return DataError(f"{file} is too large to decode safely ({e}); resize it or remove it")
    return DataError(f"{file} cannot be read as an image ({type(e).__name__}); remove or replace it")


def _full_scale(im: Any, file: str) -> float | None:
    """The pixel value that reads 1.0 for an image Pillow opened in a grey mode of more than 8 bits
    (65535 for 16-bit PNG, TIFF and PGM, 1.0 for float TIFF), None for 8-bit modes (255).

    Raises DataError for 32-bit integer pixels (a TIFF in Pillow's mode "I"): they have no standard
    range, and any guess (65535, 2**31 - 1) silently scales the data wrong."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PPM", "PNG")):  # PGM: rescaled to 16 bits
        return 65535.0
    if im.mode.startswith("I"):
        raise DataError(f"{file} holds 32-bit integer pixels, which have no standard range; save it as 8- or "
                        f"16-bit, or as a float (32-bit float TIFF) image scaled to [0, 1]")
    return 1.0 if im.mode == "F" else None


def decode_image(file: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as float32 [C, H, W]: shorter side resized to fit, centre crop (Pillow). 8-bit
    pixels are scaled to [0, 1], 16-bit grey ones (PNG, TIFF, PGM) by 65535 to the same range, float
    ones (32-bit TIFF) kept as stored; a grey image is replicated for a 3-channel model. The EXIF
    orientation tag is not applied, as torchvision's ImageFolder and tf.data do not apply it: the
    pixels are read as stored, as the pipelines users deploy beside read them.

    Raises DataError for a file Pillow cannot read, or one with 32-bit integer pixels."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(file) as im:
            # Pillow's convert("L") clips 16-bit and float pixels to 255: every value >= 255 read 1.0
            full = _full_scale(im, file)
            im = im.convert("F") if full is not None else im.convert("L" if c == 1 else "RGB")
            scale = max(h / im.height, w / im.width)
            size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
            if size != im.size:
                im = im.resize(size, Image.BILINEAR)
            left, top = (im.width - w) // 2, (im.height - h) // 2
            im = im.crop((left, top, left + w, top + h))
            a = np.asarray(im, dtype=np.float32) / (full or 255.0)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(file, e) from None
    if a.ndim == 2:
        return torch.from_numpy(np.repeat(a[None], c, axis=0) if c == 3 else a[None].copy())
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def _check_images(files: Sequence[str]) -> int:
    """DataError naming the first of ``files`` whose header Pillow cannot read as an image (the
    header only: about 20 us a file; pixels are decoded batch by batch later) or holding 32-bit
    integer pixels; else how many of them are grey (one channel, with or without alpha: modes 1, L, LA, I, I;16, F)."""
    from PIL import Image, UnidentifiedImageError

    grey = 0
    for file in files:
        try:
            with Image.open(file) as im:
                grey += Image.getmodebase(im.mode) == "L"  # parsed from the header
                _full_scale(im, file)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise _unreadable(file, e) from None
    return grey


def _first_size(file: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(file) as im:
            return im.size
    except Exception:
        return (0, 0)


def _load_folder(root: Path, shape: tuple[int, int, int] | None, num_classes: int | None, val_fraction: float,
                 train_limit: int | None, normalize: bool = True) -> DataBundle:
    """An ImageFolder layout, decoded lazily (see the module docstring)."""
    if shape is None:
        raise DataError(f"--data {root} is a folder of images but the model takes vectors; give an .npz of vectors")
    c = shape[0]
    if c not in (1, 3):
        raise DataError(f"the model takes {c}-channel images; image folders give 1 (grey) or 3 (RGB) channels")
    train_root, splits = _split_dirs(root)
    test_dir = root / splits[0] if splits else None
    # a zip made on macOS unpacks a __MACOSX/ folder of resource forks beside the classes: no class
    classes, samples = _scan(train_root, exclude=(*ARCHIVE_FOLDERS, *(() if train_root != root else splits)))
    if not samples:
        raise DataError(f"--data {root}: no images in class subfolders (expected {train_root}/<class>/<image>, "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"--data {root}: found one class ({classes[0]}); a classifier needs two or more class "
                        f"subfolders")
    notes: list[str] = []
    _check_class_folders(root, train_root, classes, samples, notes)
    _check_classes(str(root), len(classes), num_classes)
    notes[:0] = [f"{root}: {len(samples)} images in {len(classes)} classes ({', '.join(classes[:4])}"
                 f"{', ...' if len(classes) > 4 else ''})"] + _class_notes(str(root), len(classes), num_classes)
    files = [f for f, _ in samples]
    labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
    if test_dir is not None:
        test_classes, test_samples = _scan(test_dir, exclude=ARCHIVE_FOLDERS)
        if test_classes != classes:
            raise _split_classes_differ(test_dir, test_classes, train_root, classes)
        test_files = [f for f, _ in test_samples]
        test_y = torch.tensor([y for _, y in test_samples], dtype=torch.int64)
        _check_split_sizes(f"--data {root}", len(files), len(test_files), val_fraction, held_out=False, unit="image",
                           test_part=f"{test_dir.name}/")
        notes.append(f"{root}: {len(test_files)} images in {test_dir.name}/ are the test split"
                     + (f"; {splits[1]}/ is not used" if len(splits) > 1 else ""))
    else:
        _check_split_sizes(f"--data {root}", len(files), None, val_fraction, held_out=True, unit="image")
        test_idx, train_idx = _test_split(labels.numpy())
        test_files, test_y = [files[i] for i in test_idx], labels[torch.from_numpy(test_idx)]
        files, labels = [files[i] for i in train_idx], labels[torch.from_numpy(train_idx)]
        notes.append(f"{root}: no test/ (or val/) folder of class subfolders, so {len(test_files)} images "
                     f"({TEST_FRACTION:.0%}) are held out as the test split")
    val_idx, tr_idx = _val_split(labels, val_fraction)
    if train_limit is not None:
        tr_idx = tr_idx[:train_limit]
    # every file that training, validation or the test will read opens as an image: a damaged one
    # in the test split was found only after the last epoch
    read = [files[int(i)] for i in tr_idx] + [files[int(i)] for i in val_idx] + test_files
    grey = _check_images(read)
    colour = ("; converted to grey" if c == 1 else
              f"; the {grey} grey image{'s' if grey != 1 else ''} among them replicated to 3 channels" if grey else "")
    w0, h0 = _first_size(files[int(tr_idx[0])]) if len(tr_idx) else (0, 0)
    if (h0, w0) == (shape[1], shape[2]):  # "resized to the model's 16x16" for 16x16 images said nothing true
        notes.append(f"{root}: images (e.g. {w0}x{h0}) are the model's size (others are resized: shorter side, then "
                     f"centre crop){colour}; decoded per batch")
    else:
        notes.append(f"{root}: images (e.g. {w0}x{h0}) are resized to the model's {shape[2]}x{shape[1]} (shorter "
                     f"side, then centre crop){colour}; decoded per batch")
    probe = ImageFolderSplit(files, labels, shape, torch.zeros(c), torch.ones(c))
    if normalize:
        sample = tr_idx[torch.randperm(len(tr_idx), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
                        [:STATS_SAMPLE]]
        x, _ = probe.take(sample)
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    else:
        mean, std = torch.zeros(c), torch.ones(c)

    def split(fs: list[str], ys: torch.Tensor) -> ImageFolderSplit:
        return ImageFolderSplit(fs, ys, shape, mean, std)

    return DataBundle(
        name=str(root),
        train=split([files[int(i)] for i in tr_idx], labels[tr_idx]),
        val=split([files[int(i)] for i in val_idx], labels[val_idx]),
        test=split(test_files, test_y),
        num_classes=len(classes),
        notes=notes,
        kind="folder",
        augment=True,
        class_names=classes,
        normalization=input_normalization(mean, std, "pixels scaled to [0, 1]") if normalize else None,
    )


# ---------------------------------------------------------------- batches and augmentation


def _order(split: Split | ImageFolderSplit, shuffle: bool, seed: int, epoch: int, rank: int,
           world_size: int) -> torch.Tensor:
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size  # equal shard sizes keep DDP ranks in lock step
        order = order[rank : per_rank * world_size : world_size]
    return order


class _Batches(torch.utils.data.Dataset):
    """Index batches -> decoded batches, for a DataLoader whose workers decode ahead."""

    def __init__(self, split: ImageFolderSplit, chunks: list[torch.Tensor]) -> None:
        self.split, self.chunks = split, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.split.take(self.chunks[i])
        except DataError as e:  # a worker's exception would arrive with its traceback as the message
            return str(e)


def default_workers(split: Split | ImageFolderSplit) -> int:
    """DataLoader workers for ``split``: none in memory; for files, all cores but one (at most 4)."""
    if not getattr(split, "lazy", False):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _merges_single(n: int, batch_size: int, drop_last: bool, merge_single: bool) -> bool:
    """Whether ``n`` examples in batches of ``batch_size`` end with a batch of one that is merged."""
    return merge_single and not drop_last and batch_size > 1 and n > batch_size and n % batch_size == 1


def batches(split: Split | ImageFolderSplit, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            rank: int = 0, world_size: int = 1, drop_last: bool = False, merge_single: bool = False,
            workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches (x [B, ...], y [B]) of ``split``; the order depends only on (seed, epoch), shards are disjoint per rank.

    ``merge_single``: a last batch of one example is appended to the batch before it (which then
    holds ``batch_size + 1``): BatchNorm cannot normalise a single example in training mode, and
    every example is still seen once per epoch in the same order. ``num_batches`` counts the same.
    A lazily decoded split is decoded by ``workers`` DataLoader processes (default:
    ``default_workers``); batches arrive in the same order whatever the count.
    """
    order = _order(split, shuffle, seed, epoch, rank, world_size)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    chunks = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
    if _merges_single(len(order), batch_size, drop_last, merge_single):
        chunks[-2:] = [torch.cat(chunks[-2:])]
    workers = default_workers(split) if workers is None else workers
    if workers > 0 and getattr(split, "lazy", False) and len(chunks) > 1:
        loader = torch.utils.data.DataLoader(_Batches(split, chunks), batch_size=None, shuffle=False,
                                             num_workers=min(workers, len(chunks)))
        for item in loader:
            if isinstance(item, str):
                raise DataError(item)
            yield item
        return
    for idx in chunks:
        yield split.take(idx)


def num_batches(split: Split | ImageFolderSplit, batch_size: int, world_size: int = 1, drop_last: bool = False,
                merge_single: bool = False) -> int:
    """How many batches ``batches`` yields per epoch for one rank (with the same options)."""
    n = len(split) // world_size if world_size > 1 else len(split)
    return n // batch_size if drop_last else -(-n // batch_size) - _merges_single(n, batch_size, drop_last, merge_single)


def augment_generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """The generator of one batch's augmentation: a function of (seed, epoch, batch, rank) only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + batch) * 97 + rank)


def augment_batch(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding of 1/8 of the side (4 pixels at 32x32), and horizontal flip with p = 0.5.

    The CIFAR augmentation of He et al. 2016 (sect. 4.2), on normalised images [B, C, H, W]
    (zero padding is the mean colour). Returns a new tensor.
    """
    b, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out
