"""Datasets and client partitions.

- ``digits`` (default): scikit-learn's 8×8 digits, shipped inside the scikit-learn wheel, so it
  works offline. A fixed stratified 80/20 split gives the train and the centralized test set.
- ``mnist``, ``cifar10``, ``svhn``: read from ``root`` (the ``data-root`` key) in their standard
  on-disk formats (MNIST IDX files, CIFAR-10 python batches, SVHN ``.mat`` files). With
  ``download``, a split that is missing or unreadable there is fetched into that folder by
  torchvision's own dataset classes (which verify the archives' checksums).
- ``digits5``: the real Digits-5 domains (MNIST, SVHN, USPS, SynthDigits, MNIST-M) from a local
  folder, each resized to 3×28×28; with the ``domains`` partition every domain goes to its own
  client group (``digits5_domains`` documents the folder layout). They are placed by hand.

Every reader checks what it reads (IDX magic numbers, image shapes, one label per image, labels
within range) and raises :class:`DataError` with one line naming the dataset, the file or folder,
what is wrong and the expected layout. :func:`check_data` loads both splits once, so that
``splitmix simulate`` can fail before the Ray backend starts.

Partitions are IID, Dirichlet label shift with α (both computed in numpy by
:mod:`splitmix.partition`, draw for draw as flwr-datasets' partitioners, for up to 10⁶ clients)
and a feature-shift ``domains`` scheme: five domains — for ``digits5`` the real ones, otherwise five
transformed copies of the data (original, inverted, rotated 90°, Gaussian noise σ 0.2, 3×3 blur
with halved contrast) — each split over its own contiguous group of clients.

Every client has train / validation / test splits of its own data (:func:`client_splits`), as in
the Split-Mix authors' code: its training share is split into a validation part (a seeded
``val-ratio`` fraction, for checkpoint and learning-rate selection) and the train part it trains
on (:func:`client_train_data`); its test part is its share of the dataset's test split,
partitioned by the same scheme (``iid``: an even seeded split over all clients; ``domains``: each
domain's test set split over that domain's client group; ``dirichlet``: the same partitioner,
label proportions drawn independently of the training ones). For ``iid`` and ``domains`` the
pooled test set (:func:`test_data`) is the concatenation of the clients' test splits, so pooled
accuracy equals the example-weighted accuracy over the clients' test splits.

Clients may hold few or no examples (more clients than examples, or a skewed Dirichlet draw):
their splits are then short or empty, never an error. :func:`partition_sizes` gives every
client's split sizes without building tensors, and ``PartitionSizes.trainable`` which clients
have a training example: a client with none is skipped by the server, not asked to train.

Everything is cached per process: a Ray actor loads a dataset and computes the partitions once
and then serves every client it simulates from memory.
"""

from __future__ import annotations

import math
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from splitmix.partition import Partition, dirichlet_partition, iid_partition


class DataError(ValueError):
    """A dataset is missing or damaged (one line: dataset, file or folder, what is wrong, layout)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8),
    "mnist": DatasetInfo("mnist", 10, 1, 28),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32),
    "svhn": DatasetInfo("svhn", 10, 3, 32),
    "digits5": DatasetInfo("digits5", 10, 3, 28),
}
# Datasets that torchvision can fetch into data-root (``download = true``).
DOWNLOADABLE = ("mnist", "svhn", "cifar10")
# What each dataset's folder must hold (for error messages).
LAYOUTS: dict[str, str] = {
    "mnist": "<data-root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "<data-root>/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch}",
    "svhn": "<data-root>/{train,test}_32x32.mat",
    "digits5": (
        "<data-root>/MNIST/raw/*-ubyte, SVHN/{train,test}_32x32.mat, USPS/usps{,.t}.bz2, SynthDigits/synth_{train,test}_32x32.mat, "
        "MNIST_M/mnist_m_{train,test}/*.png + mnist_m_{train,test}_labels.txt, placed by hand (docs/configuration.md, Digits-5 data layout)"
    ),
}
# The real Digits-5 domains (FedBN / Split-Mix order), each resized to 3×28×28.
DIGITS5_DOMAINS = ("mnist", "svhn", "usps", "synthdigits", "mnistm")
PARTITIONS = ("iid", "dirichlet", "domains")
DOMAINS = ("original", "inverted", "rotated", "noisy", "blurred")


@dataclass
class ArrayData:
    """Images as float32 ``(N, C, H, W)`` in [0, 1] and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayData:
        idx = torch.from_numpy(np.array(indices, dtype=np.int64))  # a copy: partitions are read-only
        return ArrayData(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class DataConfig:
    """What a client needs to find its own data: hashable, so it can key caches."""

    dataset: str = "digits"
    root: str = ""
    partition: str = "iid"
    num_partitions: int = 50
    alpha: float = 0.5
    seed: int = 0
    download: bool = False
    val_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions {self.num_partitions} is not allowed; it must be at least 1")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"val-ratio {self.val_ratio} is outside the allowed range [0, 1)")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}'; allowed: {', '.join(DATASETS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition '{self.partition}'; allowed: {', '.join(PARTITIONS)}")
        if self.download and self.dataset not in DOWNLOADABLE:
            raise DataError(f"dataset '{self.dataset}' cannot be downloaded; download is allowed with: {', '.join(DOWNLOADABLE)}")


# --------------------------------------------------------------------------- raw datasets
@lru_cache(maxsize=8)
def load_split(dataset: str, root: str, train: bool, download: bool = False) -> ArrayData:
    """The train or test split of ``dataset`` (cached per process); with ``download``, a split
    that is missing or unreadable in ``root`` is fetched there by torchvision and read again.
    Raises :class:`DataError` (one line)."""
    return _read_split(dataset, root, train, download)


def check_data(cfg: DataConfig) -> None:
    """Load (with ``cfg.download``: download if needed) the train and test splits once, so that a
    missing or damaged dataset stops a run before the Ray backend starts, with one line naming
    the dataset, the file or folder and the expected layout (:class:`DataError`). The test split
    stays cached (the server evaluates on it); the train split is read, checked and dropped."""
    load_split(cfg.dataset, cfg.root, False, cfg.download)
    _read_split(cfg.dataset, cfg.root, True, cfg.download, cached=False)


def _read_split(dataset: str, root: str, train: bool, download: bool, cached: bool = True) -> ArrayData:
    if dataset == "digits":
        return _digits_split(train)
    if not root:
        raise DataError(_message(dataset, "", download, "data-root is not set (the folder that holds it)"))
    if download and dataset not in DOWNLOADABLE:
        raise DataError(_message(dataset, root, download, f"it cannot be downloaded; download is allowed with: {', '.join(DOWNLOADABLE)}"))
    if dataset == "digits5":
        domains = digits5_domains(root, train) if cached else _digits5_domains(root, train)
        return ArrayData(torch.cat([d.x for d in domains]), torch.cat([d.y for d in domains]))
    base, loader = Path(root), _LOADERS[dataset]
    try:
        try:  # what is already in place is used as it is (no network, no checksum pass)
            if not base.is_dir():
                raise DataError(f"folder '{root}' does not exist")
            return loader(base, train)
        except DataError:
            if not download:
                raise
        _download(dataset, root, train)
        return loader(base, train)
    except DataError as err:
        raise DataError(_message(dataset, root, download, str(err))) from None


def _message(dataset: str, root: str, download: bool, problem: str) -> str:
    """One line: dataset, folder, what is wrong, the expected layout and how to get the data."""
    where = f" in data-root '{root}'" if root else ""
    text = f"dataset '{dataset}'{where}: {problem}; expected {LAYOUTS[dataset]}"
    if dataset in DOWNLOADABLE:
        if download:
            text += "; download = true keeps files already in place, so delete damaged ones to fetch them again"
        else:
            text += "; or set download = true (with data-root) to fetch it with torchvision (delete damaged files first)"
    return " ".join(text.split())


def _oneline(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _download(dataset: str, root: str, train: bool) -> None:
    """Fetch one split with torchvision's own dataset class (checksums verified; files already
    in place are kept). Needs internet; any failure becomes a one-line :class:`DataError`."""
    from torchvision import datasets as tv

    try:
        if dataset == "mnist":
            tv.MNIST(root, train=train, download=True)
        elif dataset == "cifar10":
            tv.CIFAR10(root, train=train, download=True)
        elif dataset == "svhn":
            tv.SVHN(root, split="train" if train else "test", download=True)
        else:
            raise DataError(f"'{dataset}' cannot be downloaded; allowed: {', '.join(DOWNLOADABLE)}")
    except DataError:
        raise
    except Exception as err:  # network, checksum or disk: reported in one line
        raise DataError(f"downloading into '{root}' with torchvision failed ({_oneline(err)})") from None


DIGITS_TEST_SIZE = 360  # sklearn's train_test_split(test_size=0.2) of the 1,797 digits: ceil(0.2 · 1797)


def _digits_split(train: bool) -> ArrayData:
    """The fixed 80/20 stratified split of scikit-learn's digits: what
    ``train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)`` returns, computed in numpy
    from the CSV that scikit-learn ships. Importing scikit-learn costs ~1 s of CPU (several on a
    busy machine) in every process that reads the data, the Ray actors included; the digits need
    none of it (``tests/unit/test_data.py`` checks the split against scikit-learn's)."""
    x, y = _digits_arrays()
    train_idx, test_idx = _stratified_split(y, DIGITS_TEST_SIZE, seed=0)
    idx = train_idx if train else test_idx
    return ArrayData(torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx]))


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels of ``sklearn/datasets/data/digits.csv.gz``,
    found without importing scikit-learn; read once per process (both splits index them, and
    callers get copies)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'digits': scikit-learn is not installed (it ships the digits data)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    x = (data[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0)[:, None]
    return x, data[:, -1].astype(np.int64)


def _stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices exactly as scikit-learn's ``StratifiedShuffleSplit`` (one split,
    integer sizes, ``random_state=seed``) draws them: per-class counts by the approximate
    hypergeometric mode with random tie-breaks, a permutation within each class, then a
    permutation of each side."""
    rng = np.random.RandomState(seed)
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    n_train = len(y) - n_test
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(class_indices):
        order = members.take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(order[: n_i[i]])
        test.extend(order[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``utils.extmath._approximate_mode``: floor of the proportional share, the
    remainder handed out by largest fractional part, ties broken by ``rng``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _from_uint8(images: np.ndarray, labels, channels_last: bool) -> ArrayData:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2).contiguous()
    return ArrayData(x, torch.as_tensor(np.asarray(labels), dtype=torch.long))


# --------------------------------------------------------------------------- checks
def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"missing file '{path}'")


def _check_images(path: Path, images: np.ndarray, shape: tuple[int, ...], text: str) -> None:
    """``images`` is ``(N, *shape)`` uint8 with N ≥ 1 (``text`` describes ``shape`` in messages)."""
    if images.dtype != np.uint8:
        raise DataError(f"'{path}' holds {images.dtype} images, expected uint8")
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape:
        raise DataError(f"'{path}' holds images of shape {tuple(images.shape)}, expected N×{text}")
    if images.shape[0] == 0:
        raise DataError(f"'{path}' holds no images")


def _check_labels(path: Path, labels: np.ndarray, count: int, hi: int, count_of: Path | None = None, note: str = "") -> np.ndarray:
    """One integer label per image, each in [0, hi); returns them as int64."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != count:
        images = f"but '{count_of}' has" if count_of is not None else "for"
        raise DataError(f"'{path}' has {len(labels)} labels {images} {count} images")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
        raise DataError(f"'{path}' holds labels of type {labels.dtype}, expected integers")
    out = labels.astype(np.int64)
    bad = out[(out < 0) | (out >= hi)]
    if len(bad):
        raise DataError(f"'{path}' has label {bad[0]} outside [0, {hi}){note}")
    return out


# --------------------------------------------------------------------------- readers
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An uncompressed IDX file of unsigned bytes (MNIST: 2049 labels, 2051 images)."""
    _require_file(path)
    raw = bytearray(path.read_bytes())
    kind = {2049: "labels", 2051: "images"}.get(magic, "data")
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise DataError(f"'{path}' has IDX magic number {found}, expected {magic} (MNIST {kind}); is it compressed or another file?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"'{path}' is truncated (IDX header of {ndim} dimensions incomplete)")
    dims = struct.unpack(f">{ndim}I", bytes(raw[4:header]))
    if len(raw) - header != math.prod(dims):
        raise DataError(f"'{path}' holds {len(raw) - header} bytes of {kind}, its IDX header {dims} says {math.prod(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist(root: Path, train: bool) -> ArrayData:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's layout)."""
    raw, prefix = root / "MNIST" / "raw", "train" if train else "t10k"
    images_path, labels_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    images = _read_idx(images_path, 2051)
    _check_images(images_path, images, (28, 28), "28×28")
    labels = _check_labels(labels_path, _read_idx(labels_path, 2049), len(images), 10, count_of=images_path)
    return _from_uint8(images, labels, channels_last=False)


def _cifar10(root: Path, train: bool) -> ArrayData:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``: pickled dicts with ``data``
    (N×3072 uint8, channel-major 3×32×32) and ``labels`` (N ints in [0, 10))."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        _require_file(path)
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
        except Exception as err:  # damaged or not a pickle
            raise DataError(f"'{path}' is not a readable CIFAR-10 python batch ({_oneline(err)})") from None
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise DataError(f"'{path}' is not a CIFAR-10 python batch (a dict with 'data' and 'labels')")
        data = np.asarray(batch["data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"'{path}' holds data of shape {data.shape}, expected N×3072 (3×32×32 per image)")
        images = data.reshape(-1, 3, 32, 32)
        _check_images(path, images, (3, 32, 32), "3072 (3×32×32)")
        xs.append(images)
        ys.append(_check_labels(path, np.asarray(batch["labels"]), len(images), 10))
    return _from_uint8(np.concatenate(xs), np.concatenate(ys), channels_last=False)


def _svhn(root: Path, train: bool) -> ArrayData:
    return _svhn_like_mat(root / f"{'train' if train else 'test'}_32x32.mat")


def _svhn_like_mat(path: Path) -> ArrayData:
    """SVHN's .mat layout (X: 32×32×3×N uint8, y: N×1, label 10 meaning digit 0)."""
    from scipy.io import loadmat

    _require_file(path)
    try:
        mat = loadmat(str(path))
    except Exception as err:  # damaged, or not a MATLAB file
        raise DataError(f"'{path}' is not a readable .mat file ({_oneline(err)})") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"'{path}' lacks the variables X (32×32×3×N images) and y (N labels)")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"'{path}' holds X of shape {x.shape}, expected 32×32×3×N")
    images = np.transpose(x, (3, 2, 0, 1))
    _check_images(path, images, (3, 32, 32), "32×32×3")
    labels = _check_labels(path, np.asarray(mat["y"]), len(images), 11, note=" (SVHN's labels are 1..10, 10 meaning digit 0)")
    return _from_uint8(images, labels % 10, channels_last=False)


def _usps(root: Path, train: bool) -> ArrayData:
    """``usps.bz2`` / ``usps.t.bz2``: libsvm lines ``<label 1..10> 1:<v> … 256:<v>``, v in [-1, 1]."""
    from torchvision.datasets import USPS

    path = root / ("usps.bz2" if train else "usps.t.bz2")
    _require_file(path)
    try:
        ds = USPS(str(root), train=train, download=False)
    except Exception as err:  # damaged archive or malformed lines
        raise DataError(f"'{path}' is not a readable USPS file ({_oneline(err)})") from None
    images = np.asarray(ds.data)
    _check_images(path, images, (16, 16), "16×16 (256 values per line)")
    labels = _check_labels(path, np.asarray(ds.targets), len(images), 10, note=" (USPS's labels are 1..10)")
    return _from_uint8(images, labels, channels_last=False)


def _mnist_m(root: Path, train: bool) -> ArrayData:
    """MNIST-M as distributed: ``mnist_m_<split>/<file>.png`` and ``mnist_m_<split>_labels.txt``
    with lines ``<file>.png <label>``."""
    from PIL import Image

    split = "train" if train else "test"
    labels_file = root / f"mnist_m_{split}_labels.txt"
    _require_file(labels_file)
    entries = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    for number, entry in enumerate(entries, 1):
        if len(entry) != 2 or not entry[1].lstrip("-").isdigit():
            raise DataError(f"'{labels_file}' line {number} is not '<file>.png <label>'")
    if not entries:
        raise DataError(f"'{labels_file}' lists no images")
    images: list[np.ndarray] = []
    for name, _ in entries:
        path = root / f"mnist_m_{split}" / name
        _require_file(path)
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
        except Exception as err:  # damaged or not an image
            raise DataError(f"'{path}' is not a readable image ({_oneline(err)})") from None
        if images and image.shape != images[0].shape:
            raise DataError(f"'{path}' is {image.shape[1]}×{image.shape[0]}, the other MNIST-M images {images[0].shape[1]}×{images[0].shape[0]}")
        images.append(image)
    labels = _check_labels(labels_file, np.array([int(label) for _, label in entries]), len(images), 10)
    return _from_uint8(np.stack(images), labels, channels_last=True)


_LOADERS: dict[str, Callable[[Path, bool], ArrayData]] = {"mnist": _mnist, "cifar10": _cifar10, "svhn": _svhn}


def _to_digits5_format(data: ArrayData) -> ArrayData:
    """3 channels, 28×28 (grey domains are replicated, other sizes resized bilinearly)."""
    x = data.x if data.x.shape[1] == 3 else data.x.expand(-1, 3, -1, -1)
    if x.shape[-1] != 28 or x.shape[-2] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return ArrayData(x.contiguous(), data.y)


def _digits5_domains(root: str, train: bool) -> tuple[ArrayData, ...]:
    base, split = Path(root), "train" if train else "test"
    loaders = {
        "mnist": lambda: _mnist(base, train),
        "svhn": lambda: _svhn_like_mat(base / "SVHN" / f"{split}_32x32.mat"),
        "usps": lambda: _usps(base / "USPS", train),
        "synthdigits": lambda: _svhn_like_mat(base / "SynthDigits" / f"synth_{split}_32x32.mat"),
        "mnistm": lambda: _mnist_m(base / "MNIST_M", train),
    }
    try:
        if not base.is_dir():
            raise DataError(f"folder '{root}' does not exist")
        return tuple(_to_digits5_format(loaders[name]()) for name in DIGITS5_DOMAINS)
    except DataError as err:
        raise DataError(_message("digits5", root, False, str(err))) from None


@lru_cache(maxsize=4)
def digits5_domains(root: str, train: bool) -> tuple[ArrayData, ...]:
    """The five real digit domains from ``root``: ``MNIST/raw`` (IDX), ``SVHN/{train,test}_32x32.mat``,
    ``USPS/usps{,.t}.bz2``, ``SynthDigits/synth_{train,test}_32x32.mat``, ``MNIST_M/`` (PNG + labels).
    They cannot be downloaded: place them by hand. Raises :class:`DataError` (one line)."""
    return _digits5_domains(root, train)


# --------------------------------------------------------------------------- domains
def _noisy(x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp_(0.0, 1.0)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return 0.25 + 0.5 * blurred  # blur plus halved contrast


DOMAIN_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "original": lambda x: x,
    "inverted": lambda x: 1.0 - x,
    "rotated": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "noisy": _noisy,
    "blurred": _blurred,
}


def domain_of_client(partition_id: int, num_partitions: int) -> int:
    """Clients are grouped by domain in contiguous blocks (as in the paper's Digits setup)."""
    return partition_id * len(DOMAINS) // num_partitions


# --------------------------------------------------------------------------- partitions
# Seed streams: a client's validation draw and the test-set partitions use seeds of their own
# (derived from the run seed), so neither repeats the draws of the training partition.
_VAL_STREAM, _TEST_STREAM = 1, 2


def _split_seed(cfg: DataConfig, train: bool) -> int:
    """``cfg.seed`` for the training partition (as it always was); a seed derived from it for the test one."""
    return cfg.seed if train else int(np.random.SeedSequence([_TEST_STREAM, cfg.seed]).generate_state(1)[0])


def _domain_clients(cfg: DataConfig, domain: int) -> range:
    """The contiguous group of clients that hold ``domain`` (``domains`` partition): those ``p``
    with ``p · 5 // n = domain``, i.e. ``ceil(domain · n / 5) ≤ p < ceil((domain + 1) · n / 5)``."""
    n, k = cfg.num_partitions, len(DOMAINS)
    return range(-(-domain * n // k), -(-(domain + 1) * n // k))


@lru_cache(maxsize=8)
def partition_indices(cfg: DataConfig, train: bool = True) -> Partition:
    """Every client's indices into the train (``train``) or the test split, by one scheme
    (deterministic in ``cfg``; cached per process; numpy only, see :mod:`splitmix.partition`):

    - ``iid``: a seeded shuffle of the split, sharded evenly over all clients (the first
      ``count mod num-clients`` get one more; with more clients than examples the rest get none);
    - ``dirichlet``: label shift with concentration α, self-balancing, as flwr-datasets'
      ``DirichletPartitioner`` (:func:`~splitmix.partition.dirichlet_partition`). The training
      split is redrawn (up to 10 times) until every client has an example, where that is
      possible; otherwise some clients stay empty. The test split is partitioned with the same
      settings but its own seed and no redraws, so a client's test label proportions are drawn
      independently of its training ones (as the Split-Mix code does without ``--con_test_cls``);
    - ``domains``: indices into domain ``d``'s own data, split IID over that domain's contiguous
      client group (:func:`domain_of_client`). ``digits5``: the real domain's train or test set.
      Synthetic domains: the train split is dealt into five disjoint shares (``order[d::5]``),
      while every domain's test set is the whole (transformed) test split.

    The training indices (``train = True``) are each client's whole training share: its
    validation and train parts (:func:`client_splits`) are drawn from them."""
    seed = _split_seed(cfg, train)
    if cfg.partition == "domains" and cfg.num_partitions < len(DOMAINS):
        raise ValueError(f"the 'domains' partition needs at least {len(DOMAINS)} clients")
    if cfg.partition != "domains" or (train and cfg.dataset != "digits5"):
        labels = load_split(cfg.dataset, cfg.root, train, cfg.download).y.numpy()
        order = np.random.default_rng(seed).permutation(len(labels))
        if cfg.partition == "iid":
            return iid_partition(order, cfg.num_partitions)
        if cfg.partition == "dirichlet":
            positions = dirichlet_partition(labels[order], cfg.num_partitions, cfg.alpha, seed, min_size=1 if train else 0)
            return Partition(order[positions.flat], positions.offsets)
        # synthetic domains, train: disjoint shares of the one train set
        return Partition.concat([iid_partition(order[d :: len(DOMAINS)], len(_domain_clients(cfg, d))) for d in range(len(DOMAINS))])
    # digits5 (train and test), synthetic domains (test)
    return Partition.concat(
        [
            iid_partition(np.random.default_rng(seed + d).permutation(_domain_size(cfg, d, train)), len(_domain_clients(cfg, d)))
            for d in range(len(DOMAINS))
        ]
    )


@dataclass(frozen=True, eq=False)
class PartitionSizes:
    """Every client's split sizes, each ``(num_partitions,)`` int64 (read-only): ``train`` (what it
    trains on), ``val`` and ``test`` — the lengths :func:`client_splits` would give."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        for array in (self.train, self.val, self.test):
            array.setflags(write=False)

    def trainable(self, min_examples: int = 1) -> np.ndarray:
        """Which clients have at least ``min_examples`` training examples (boolean mask). The rule:
        a client with no training example is not asked to train; the server skips it and counts
        it (``(~sizes.trainable()).sum()``)."""
        return self.train >= min_examples


@lru_cache(maxsize=8)
def partition_sizes(cfg: DataConfig) -> PartitionSizes:
    """Every client's train / validation / test sizes without building any tensor (cached per
    process): the partition's share sizes, less :func:`val_counts`. The server derives the
    clients' example counts from it without asking the nodes."""
    share = partition_indices(cfg, True).sizes
    val = val_counts(share, cfg.val_ratio)
    return PartitionSizes(share - val, val, partition_indices(cfg, False).sizes.copy())


def _domain_size(cfg: DataConfig, domain: int, train: bool) -> int:
    if cfg.dataset == "digits5":
        return len(digits5_domains(cfg.root, train)[domain])
    return len(load_split(cfg.dataset, cfg.root, train, cfg.download))


def _domain_test_set(cfg: DataConfig, domain: int) -> ArrayData:
    """Domain ``domain``'s whole test set: the real one (``digits5``) or the test split with the
    domain's transform applied to it as a whole (so every client and the pooled set see the
    same pixels: the noise of ``noisy`` depends on the batch it is drawn for)."""
    if cfg.dataset == "digits5":
        return digits5_domains(cfg.root, False)[domain]
    test = load_split(cfg.dataset, cfg.root, False, cfg.download)
    return ArrayData(DOMAIN_TRANSFORMS[DOMAINS[domain]](test.x), test.y)


@dataclass(frozen=True)
class ClientSplits:
    """One client's own data: ``train`` (what it trains on), ``val`` (held out from its training
    share: checkpoint and learning-rate selection) and ``test`` (its share of the test split)."""

    train: ArrayData
    val: ArrayData
    test: ArrayData


def _check_partition_id(cfg: DataConfig, partition_id: int) -> None:
    if not 0 <= partition_id < cfg.num_partitions:
        raise ValueError(f"partition-id {partition_id} is out of range [0, {cfg.num_partitions})")


def val_counts(sizes: np.ndarray, val_ratio: float) -> np.ndarray:
    """Validation examples of training shares of ``sizes``: ``floor(val_ratio · size)``, at least
    1 when ``val_ratio > 0`` and ``size ≥ 2``, and never the whole share (0 when ``size < 2``), so
    a share of 1 trains on its one example and a share of 2 keeps one for validation."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if val_ratio <= 0:
        return np.zeros_like(sizes)
    counts = np.minimum(sizes - 1, np.maximum(1, np.floor(val_ratio * sizes + 1e-9).astype(np.int64)))
    return np.where(sizes < 2, 0, counts)


def val_count(size: int, val_ratio: float) -> int:
    """:func:`val_counts` of one share."""
    return int(val_counts(np.array([size]), val_ratio)[0])


@lru_cache(maxsize=4096)
def _train_val(cfg: DataConfig, partition_id: int) -> tuple[ArrayData, ArrayData]:
    _check_partition_id(cfg, partition_id)
    indices = partition_indices(cfg, True)[partition_id]
    domain = domain_of_client(partition_id, cfg.num_partitions)
    if cfg.partition == "domains" and cfg.dataset == "digits5":
        share = digits5_domains(cfg.root, True)[domain].subset(indices)
    else:
        share = load_split(cfg.dataset, cfg.root, True, cfg.download).subset(indices)
        if cfg.partition == "domains":
            share = ArrayData(DOMAIN_TRANSFORMS[DOMAINS[domain]](share.x), share.y)
    rng = np.random.default_rng([_VAL_STREAM, cfg.seed, partition_id])
    held = np.sort(rng.permutation(len(share))[: val_count(len(share), cfg.val_ratio)]).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(share), dtype=np.int64), held)
    return share.subset(kept), share.subset(held)


def _client_test(cfg: DataConfig, partition_id: int) -> ArrayData:
    _check_partition_id(cfg, partition_id)
    indices = partition_indices(cfg, False)[partition_id]
    if cfg.partition == "domains":
        return _domain_test_set(cfg, domain_of_client(partition_id, cfg.num_partitions)).subset(indices)
    return load_split(cfg.dataset, cfg.root, False, cfg.download).subset(indices)


@lru_cache(maxsize=4096)
def client_splits(cfg: DataConfig, partition_id: int) -> ClientSplits:
    """Client ``partition_id``'s train / validation / test splits (cached per process).

    Its training share (``partition_indices(cfg, True)``, with its domain transform) is split
    into ``val``: :func:`val_count` examples drawn with the seed ``[1, cfg.seed, partition_id]``
    (kept in share order), and ``train``: the rest, in share order. ``test`` is its share of the
    test split (``partition_indices(cfg, False)``), partitioned by the same scheme."""
    train, val = _train_val(cfg, partition_id)
    return ClientSplits(train, val, _client_test(cfg, partition_id))


def client_train_data(cfg: DataConfig, partition_id: int) -> ArrayData:
    """What client ``partition_id`` trains on: the train part of :func:`client_splits` (its
    training share less its validation split; domain transform applied)."""
    return _train_val(cfg, partition_id)[0]


def test_data(cfg: DataConfig) -> ArrayData:
    """The pooled test set. For ``iid`` and ``domains`` it is the concatenation of every client's
    test split in partition order (a reordering of the test split; for ``domains`` of the five
    domain test sets, each transformed for synthetic domains), so accuracy over the pooled set is
    the example-weighted accuracy over the clients' test splits. For ``dirichlet`` it is the test
    split as stored; the clients' test splits partition it (each example in exactly one)."""
    if cfg.partition == "dirichlet":
        return load_split(cfg.dataset, cfg.root, False, cfg.download)
    parts = partition_indices(cfg, False)
    if cfg.partition == "iid":
        return load_split(cfg.dataset, cfg.root, False, cfg.download).subset(parts.flat)
    groups = [_domain_clients(cfg, d) for d in range(len(DOMAINS))]
    pieces = [_domain_test_set(cfg, d).subset(parts.flat[parts.offsets[g.start] : parts.offsets[g.stop]]) for d, g in enumerate(groups)]
    return ArrayData(torch.cat([p.x for p in pieces]), torch.cat([p.y for p in pieces]))


def train_sample(cfg: DataConfig, count: int, seed: int) -> ArrayData:
    """A seeded sample of ``count`` training examples from the union of all clients' train parts
    (as the clients see them, domain transforms included, validation splits excluded): the
    server's view of "training data" for the generalisation gap. In a deployment the server has
    no such data; simulations do.

    The union is the clients' train parts in partition order; the sample is its positions
    ``permutation(len)[:count]`` (seed ``seed + 31337``) in ascending order. Only the clients
    that hold a sampled position build their train part, so 10⁵ clients cost at most ``count``."""
    sizes = partition_sizes(cfg).train
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    picked = np.sort(np.random.default_rng(seed + 31337).permutation(total)[: min(count, total)])
    owners = np.searchsorted(ends, picked, side="right")
    clients, firsts = np.unique(owners, return_index=True)
    pieces = [
        client_train_data(cfg, int(c)).subset(local - (ends[c] - sizes[c]))
        for c, local in zip(clients.tolist(), np.split(picked, firsts[1:]), strict=True)
    ]
    if not pieces:
        return client_train_data(cfg, 0).subset(np.empty(0, dtype=np.int64))
    return ArrayData(torch.cat([p.x for p in pieces]), torch.cat([p.y for p in pieces]))
