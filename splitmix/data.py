"""Datasets and client partitions.

- ``digits`` (default): scikit-learn's 8×8 digits, shipped inside the scikit-learn wheel, so it
  works offline. A fixed stratified 80/20 split gives the train and the centralized test set.
- ``mnist``, ``cifar10``, ``svhn``: torchvision datasets read from a local folder in their
  standard on-disk formats (nothing is downloaded).
- ``digits5``: the real Digits-5 domains (MNIST, SVHN, USPS, SynthDigits, MNIST-M) from a local
  folder, each resized to 3×28×28; with the ``domains`` partition every domain goes to its own
  client group (``digits5_domains`` documents the folder layout).

Partitions come from flwr-datasets partitioners (IID, Dirichlet label shift with α) and a
feature-shift ``domains`` scheme: five domains — for ``digits5`` the real ones, otherwise five
transformed copies of the data (original, inverted, rotated 90°, Gaussian noise σ 0.2, 3×3 blur
with halved contrast) — each split over its own contiguous group of clients.

Everything is cached per process: a Ray actor loads a dataset and computes the partitions once
and then serves every client it simulates from memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F


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
        idx = torch.as_tensor(indices, dtype=torch.long)
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

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}'; allowed: {', '.join(DATASETS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition '{self.partition}'; allowed: {', '.join(PARTITIONS)}")


# --------------------------------------------------------------------------- raw datasets
@lru_cache(maxsize=8)
def load_split(dataset: str, root: str, train: bool) -> ArrayData:
    """The train or test split of ``dataset`` (cached per process)."""
    if dataset == "digits":
        return _digits_split(train)
    if not root:
        raise FileNotFoundError(f"dataset '{dataset}' is read from a local folder: set data-root to the folder that holds it (nothing is downloaded)")
    if dataset == "digits5":
        domains = digits5_domains(root, train)
        return ArrayData(torch.cat([d.x for d in domains]), torch.cat([d.y for d in domains]))
    loader = {"mnist": _mnist, "cifar10": _cifar10, "svhn": _svhn}[dataset]
    return loader(Path(root), train)


def _digits_split(train: bool) -> ArrayData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_s, y_s = (x_tr, y_tr) if train else (x_te, y_te)
    return ArrayData(torch.from_numpy(np.ascontiguousarray(x_s)), torch.from_numpy(y_s))


def _from_uint8(images: np.ndarray, labels, channels_last: bool) -> ArrayData:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2).contiguous()
    return ArrayData(x, torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _mnist(root: Path, train: bool) -> ArrayData:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=train, download=False)
    return _from_uint8(ds.data.numpy(), ds.targets.numpy(), channels_last=False)


def _cifar10(root: Path, train: bool) -> ArrayData:
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        # torchvision checks MD5 sums of the official archive; accept any well-formed batches
        # so that user-provided (or test) folders in the same format load.
        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # class names only; no MD5 check for the same reason
            self.classes = [str(i) for i in range(10)]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    ds = LocalCIFAR10(str(root), train=train, download=False)
    return _from_uint8(ds.data, ds.targets, channels_last=True)


def _svhn(root: Path, train: bool) -> ArrayData:
    from torchvision.datasets import SVHN

    class LocalSVHN(SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    ds = LocalSVHN(str(root), split="train" if train else "test", download=False)
    return _from_uint8(ds.data, ds.labels, channels_last=False)


def _svhn_like_mat(path: Path) -> ArrayData:
    """SVHN's .mat layout (X: 32×32×3×N uint8, y: N×1, label 10 meaning digit 0)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise FileNotFoundError(f"missing '{path}'")
    mat = loadmat(str(path))
    labels = mat["y"].reshape(-1).astype(np.int64) % 10
    return _from_uint8(np.transpose(mat["X"], (3, 2, 0, 1)), labels, channels_last=False)


def _usps(root: Path, train: bool) -> ArrayData:
    from torchvision.datasets import USPS

    name = "usps.bz2" if train else "usps.t.bz2"
    if not (root / name).is_file():
        raise FileNotFoundError(f"missing '{root / name}'")
    ds = USPS(str(root), train=train, download=False)
    return _from_uint8(ds.data, ds.targets, channels_last=False)


def _mnist_m(root: Path, train: bool) -> ArrayData:
    """MNIST-M as distributed: ``mnist_m_<split>/<file>.png`` and ``mnist_m_<split>_labels.txt``
    with lines ``<file>.png <label>``."""
    from PIL import Image

    split = "train" if train else "test"
    labels_file = root / f"mnist_m_{split}_labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"missing '{labels_file}'")
    entries = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    images = np.stack([np.asarray(Image.open(root / f"mnist_m_{split}" / name).convert("RGB")) for name, _ in entries])
    return _from_uint8(images, [int(label) for _, label in entries], channels_last=True)


def _to_digits5_format(data: ArrayData) -> ArrayData:
    """3 channels, 28×28 (grey domains are replicated, other sizes resized bilinearly)."""
    x = data.x if data.x.shape[1] == 3 else data.x.expand(-1, 3, -1, -1)
    if x.shape[-1] != 28 or x.shape[-2] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return ArrayData(x.contiguous(), data.y)


@lru_cache(maxsize=4)
def digits5_domains(root: str, train: bool) -> tuple[ArrayData, ...]:
    """The five real digit domains from ``root``: ``MNIST/raw`` (IDX), ``SVHN/{train,test}_32x32.mat``,
    ``USPS/usps{,.t}.bz2``, ``SynthDigits/synth_{train,test}_32x32.mat``, ``MNIST_M/`` (PNG + labels)."""
    base, split = Path(root), "train" if train else "test"
    loaders = {
        "mnist": lambda: _mnist(base, train),
        "svhn": lambda: _svhn_like_mat(base / "SVHN" / f"{split}_32x32.mat"),
        "usps": lambda: _usps(base / "USPS", train),
        "synthdigits": lambda: _svhn_like_mat(base / "SynthDigits" / f"synth_{split}_32x32.mat"),
        "mnistm": lambda: _mnist_m(base / "MNIST_M", train),
    }
    return tuple(_to_digits5_format(loaders[name]()) for name in DIGITS5_DOMAINS)


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
@lru_cache(maxsize=8)
def partition_indices(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """Train-set indices of every client (deterministic in ``cfg``; cached per process)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = load_split(cfg.dataset, cfg.root, True).y.numpy()
    order = np.random.default_rng(cfg.seed).permutation(len(labels))

    def split(idx: np.ndarray, n: int, scheme: str, labels: np.ndarray = labels) -> list[np.ndarray]:
        table = Dataset.from_dict({"idx": idx, "label": labels[idx]})
        if scheme == "dirichlet":
            part = DirichletPartitioner(
                num_partitions=n,
                partition_by="label",
                alpha=cfg.alpha,
                min_partition_size=1,
                self_balancing=True,
                seed=cfg.seed,
            )
        else:  # IID: the table is already shuffled, the partitioner shards it
            part = IidPartitioner(num_partitions=n)
        part.dataset = table
        return [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(n)]

    if cfg.partition != "domains":
        return tuple(split(order, cfg.num_partitions, cfg.partition))
    if cfg.num_partitions < len(DOMAINS):
        raise ValueError(f"the 'domains' partition needs at least {len(DOMAINS)} clients")
    out: list[np.ndarray] = []
    for d in range(len(DOMAINS)):
        clients = [p for p in range(cfg.num_partitions) if domain_of_client(p, cfg.num_partitions) == d]
        if cfg.dataset == "digits5":  # real domains: indices into that domain's own train set
            domain_labels = digits5_domains(cfg.root, True)[d].y.numpy()
            shuffled = np.random.default_rng(cfg.seed + d).permutation(len(domain_labels))
            out.extend(split(shuffled, len(clients), "iid", domain_labels))
        else:  # synthetic domains: disjoint shares of the one train set
            out.extend(split(order[d :: len(DOMAINS)], len(clients), "iid"))
    return tuple(out)


@lru_cache(maxsize=4096)
def client_train_data(cfg: DataConfig, partition_id: int) -> ArrayData:
    """The training data of client ``partition_id`` (with its domain transform applied)."""
    if not 0 <= partition_id < cfg.num_partitions:
        raise ValueError(f"partition-id {partition_id} is out of range [0, {cfg.num_partitions})")
    indices = partition_indices(cfg)[partition_id]
    if cfg.partition == "domains" and cfg.dataset == "digits5":
        return digits5_domains(cfg.root, True)[domain_of_client(partition_id, cfg.num_partitions)].subset(indices)
    data = load_split(cfg.dataset, cfg.root, True).subset(indices)
    if cfg.partition == "domains":
        domain = DOMAINS[domain_of_client(partition_id, cfg.num_partitions)]
        data = ArrayData(DOMAIN_TRANSFORMS[domain](data.x), data.y)
    return data


def test_data(cfg: DataConfig) -> ArrayData:
    """The centralized test set (all domains concatenated for the 'domains' partition)."""
    test = load_split(cfg.dataset, cfg.root, False)
    if cfg.partition != "domains" or cfg.dataset == "digits5":  # digits5: the five real test sets
        return test
    return ArrayData(
        torch.cat([DOMAIN_TRANSFORMS[d](test.x) for d in DOMAINS]),
        test.y.repeat(len(DOMAINS)),
    )


def train_sample(cfg: DataConfig, count: int, seed: int) -> ArrayData:
    """A seeded sample of ``count`` training examples from the union of all client partitions
    (as the clients see them, domain transforms included): the server's view of "training data"
    for the generalisation gap. In a deployment the server has no such data; simulations do."""
    parts = [client_train_data(cfg, i) for i in range(cfg.num_partitions)]
    union = ArrayData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    order = np.random.default_rng(seed + 31337).permutation(len(union))[: min(count, len(union))]
    return union.subset(np.sort(order))
