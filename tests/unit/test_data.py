"""Data: digits splits, flwr-datasets partitions, domains, and the real on-disk loaders on tiny
files written in MNIST's IDX, CIFAR-10's python-batch and SVHN's .mat formats: what they read,
the one-line errors on damaged or missing files, ``download = true`` (torchvision monkeypatched:
no network) and the pre-flight check of ``splitmix simulate``."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from splitmix.data import DOMAINS, DataConfig, DataError, check_data, client_train_data, load_split, partition_indices
from splitmix.data import test_data as central_test_set


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_split("digits", "", True), load_split("digits", "", False)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.x.shape[1:] == (1, 8, 8) and 0 <= train.x.min() and train.x.max() <= 1
    assert torch.bincount(test.y).min() >= 35  # stratified


def test_digits_split_is_scikit_learns_without_importing_it():
    """The numpy split reproduces ``train_test_split(test_size=0.2, stratify=y, random_state=0)``
    bit for bit (the split every recorded digits result used), and reading the digits imports no
    scikit-learn (a fresh interpreter: the Ray actors are such processes)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedShuffleSplit, train_test_split

    from splitmix.data import _digits_split, _stratified_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)
    ours_tr, ours_te = _digits_split(True), _digits_split(False)
    assert torch.equal(ours_tr.x, torch.from_numpy(x_tr)) and torch.equal(ours_te.x, torch.from_numpy(x_te))
    assert ours_tr.y.tolist() == y_tr.tolist() and ours_te.y.tolist() == y_te.tolist()
    # Ties in the per-class remainders (equal class sizes) exercise the random tie-breaks.
    for seed, labels in enumerate([np.repeat(np.arange(4), 5), np.random.default_rng(1).integers(0, 7, 200), np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])]):
        n_test = max(len(np.unique(labels)), len(labels) // 3)
        theirs = next(StratifiedShuffleSplit(n_splits=1, test_size=n_test, random_state=seed).split(labels, labels))
        ours = _stratified_split(labels, n_test, seed)
        assert ours[0].tolist() == theirs[0].tolist() and ours[1].tolist() == theirs[1].tolist()
    probe = "import sys; from splitmix.data import load_split; load_split('digits', '', True); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_iid_partition_covers_the_train_set_once():
    parts = partition_indices(DataConfig(partition="iid", num_partitions=50))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1437 and max(sizes) - min(sizes) <= 1
    assert len(np.unique(np.concatenate(parts))) == 1437


def test_dirichlet_partition_skews_labels():
    parts = partition_indices(DataConfig(partition="dirichlet", num_partitions=10, alpha=0.1))
    labels = load_split("digits", "", True).y.numpy()
    assert sum(len(p) for p in parts) == 1437
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p)]
    iid = [np.bincount(labels[p], minlength=10).max() / len(p) for p in partition_indices(DataConfig(num_partitions=10))]
    assert np.mean(dominant) > 2 * np.mean(iid)


def test_domains_partition_transforms_each_group():
    cfg = DataConfig(partition="domains", num_partitions=10, val_ratio=0.0)  # the whole share trains
    raw = load_split("digits", "", True)
    first, inverted = client_train_data(cfg, 0), client_train_data(cfg, 2)  # domains 0 and 1
    idx0, idx2 = partition_indices(cfg)[0], partition_indices(cfg)[2]
    assert torch.equal(first.x, raw.x[torch.tensor(idx0)])
    assert torch.allclose(inverted.x, 1.0 - raw.x[torch.tensor(idx2)])
    assert len(central_test_set(cfg)) == len(DOMAINS) * 360


def test_domain_groups_are_contiguous_ranges():
    from splitmix.data import _domain_clients, domain_of_client

    # 7 clients: p · 5 // 7 = 0, 0, 1, 2, 2, 3, 4
    assert [list(_domain_clients(DataConfig(partition="domains", num_partitions=7), d)) for d in range(5)] == [[0, 1], [2], [3, 4], [5], [6]]
    for n in (5, 12, 50, 1001):
        cfg = DataConfig(partition="domains", num_partitions=n)
        assert [p for d in range(5) for p in _domain_clients(cfg, d) if domain_of_client(p, n) == d] == list(range(n))


def test_domains_partition_over_many_clients_leaves_some_empty():
    cfg = DataConfig(partition="domains", num_partitions=2000)  # 1437 // 5 ≈ 287 examples for 400 clients per domain
    parts = partition_indices(cfg)
    assert len(parts) == 2000 and int(parts.sizes.sum()) == 1437
    assert len(np.unique(parts.flat)) == 1437
    assert parts.sizes[:400].tolist() == [1] * 288 + [0] * 112  # domain 0 holds order[0::5]: 288 examples
    assert len(client_train_data(cfg, 399)) == 0


def test_out_of_range_partition_is_rejected():
    with pytest.raises(ValueError, match="partition-id 50"):
        client_train_data(DataConfig(num_partitions=50), 50)
    with pytest.raises(ValueError, match="unknown dataset"):
        DataConfig(dataset="imagenet")
    with pytest.raises(ValueError, match="num-partitions 0 is not allowed; it must be at least 1"):
        DataConfig(num_partitions=0)


def test_real_loaders_need_a_folder():
    with pytest.raises(DataError, match="data-root is not set.*download = true"):
        load_split("mnist", "", True)


def _write_idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def _write_mnist(root, splits=("train", "test"), sizes=(6, 4)):
    """MNIST's IDX files in torchvision's layout (``MNIST/raw``), labels 0, 1, 2, …"""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), sizes):
        if split in splits:
            prefix = "train" if split == "train" else "t10k"
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)


def _write_cifar10(root, splits=("train", "test")):
    """CIFAR-10's python batches, two images (labels 1 and 7) in each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ([f"data_batch_{i}" for i in range(1, 6)] if "train" in splits else []) + (["test_batch"] if "test" in splits else [])
    for name in names:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def _write_svhn(root, splits=("train", "test")):
    """SVHN's .mat files (X 32×32×3×N, y N×1 with 10 meaning digit 0): 5 train, 3 test images."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        if split in splits:
            savemat(
                root / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": np.array([[10], [1], [2], [3], [4]][:n])},
            )


def test_mnist_loader_reads_idx_files(tmp_path):
    _write_mnist(tmp_path)
    train = load_split("mnist", str(tmp_path), True)
    assert train.x.shape == (6, 1, 28, 28) and train.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert 0 <= train.x.min() and train.x.max() <= 1
    assert len(load_split("mnist", str(tmp_path), False)) == 4


def test_cifar10_loader_reads_python_batches(tmp_path):
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    train = load_split("cifar10", str(tmp_path), True)
    assert train.x.shape == (10, 3, 32, 32) and train.y.tolist() == [1, 7] * 5
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].tobytes(), np.uint8)
    assert torch.allclose(train.x[0], torch.from_numpy(first.reshape(3, 32, 32).astype(np.float32) / 255))


def test_svhn_loader_reads_mat_files(tmp_path):
    _write_svhn(tmp_path)
    train = load_split("svhn", str(tmp_path), True)
    assert train.x.shape == (5, 3, 32, 32) and train.y.tolist() == [0, 1, 2, 3, 4]  # label 10 means digit 0
    assert len(load_split("svhn", str(tmp_path), False)) == 3


def _svhn_mat(path, x_shape=(32, 32, 3, 5), labels=(10, 1, 2, 3, 4)):
    from scipy.io import savemat

    savemat(path, {"X": np.zeros(x_shape, dtype=np.uint8), "y": np.array(labels).reshape(-1, 1)})


def _cifar_batch(path, data_shape=(2, 3072), labels=(1, 7)):
    path.write_bytes(pickle.dumps({"data": np.zeros(data_shape, dtype=np.uint8), "labels": list(labels)}))


MNIST_RAW = "MNIST/raw"
DAMAGES = {  # name: (dataset, writer, damage, the file named, what the message says)
    "mnist-labels-magic": (
        "mnist",
        _write_mnist,
        lambda r: _write_idx(r / MNIST_RAW / "train-labels-idx1-ubyte", np.arange(6) % 10, 2051),
        f"{MNIST_RAW}/train-labels-idx1-ubyte",
        "IDX magic number 2051, expected 2049",
    ),
    "mnist-images-magic": (
        "mnist",
        _write_mnist,
        lambda r: (r / MNIST_RAW / "t10k-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100)),  # still gzipped
        f"{MNIST_RAW}/t10k-images-idx3-ubyte",
        "IDX magic number 529205248, expected 2051",
    ),
    "mnist-label-count": (
        "mnist",
        _write_mnist,
        lambda r: _write_idx(r / MNIST_RAW / "train-labels-idx1-ubyte", np.arange(5), 2049),
        f"{MNIST_RAW}/train-labels-idx1-ubyte",
        "has 5 labels but",
    ),
    "mnist-label-range": (
        "mnist",
        _write_mnist,
        lambda r: _write_idx(r / MNIST_RAW / "train-labels-idx1-ubyte", np.array([0, 1, 2, 12, 4, 5]), 2049),
        f"{MNIST_RAW}/train-labels-idx1-ubyte",
        "label 12 outside [0, 10)",
    ),
    "mnist-image-shape": (
        "mnist",
        _write_mnist,
        lambda r: _write_idx(r / MNIST_RAW / "train-images-idx3-ubyte", np.zeros((6, 32, 32)), 2051),
        f"{MNIST_RAW}/train-images-idx3-ubyte",
        "expected N×28×28",
    ),
    "mnist-truncated": (
        "mnist",
        _write_mnist,
        lambda r: (r / MNIST_RAW / "t10k-images-idx3-ubyte").write_bytes((r / MNIST_RAW / "t10k-images-idx3-ubyte").read_bytes()[:-10]),
        f"{MNIST_RAW}/t10k-images-idx3-ubyte",
        "its IDX header (4, 28, 28) says 3136",
    ),
    "mnist-missing-file": (
        "mnist",
        _write_mnist,
        lambda r: (r / MNIST_RAW / "t10k-labels-idx1-ubyte").unlink(),
        f"{MNIST_RAW}/t10k-labels-idx1-ubyte",
        "missing file",
    ),
    "cifar10-shape": (
        "cifar10",
        _write_cifar10,
        lambda r: _cifar_batch(r / "cifar-10-batches-py" / "data_batch_3", data_shape=(2, 3000)),
        "cifar-10-batches-py/data_batch_3",
        "expected N×3072",
    ),
    "cifar10-label-count": (
        "cifar10",
        _write_cifar10,
        lambda r: _cifar_batch(r / "cifar-10-batches-py" / "test_batch", labels=(1,)),
        "cifar-10-batches-py/test_batch",
        "has 1 labels for 2 images",
    ),
    "cifar10-label-range": (
        "cifar10",
        _write_cifar10,
        lambda r: _cifar_batch(r / "cifar-10-batches-py" / "data_batch_5", labels=(1, 10)),
        "cifar-10-batches-py/data_batch_5",
        "label 10 outside [0, 10)",
    ),
    "cifar10-damaged": (
        "cifar10",
        _write_cifar10,
        lambda r: (r / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle"),
        "cifar-10-batches-py/data_batch_2",
        "not a readable CIFAR-10 python batch",
    ),
    "svhn-label-count": (
        "svhn",
        _write_svhn,
        lambda r: _svhn_mat(r / "train_32x32.mat", labels=(1, 2, 3, 4)),
        "train_32x32.mat",
        "has 4 labels for 5 images",
    ),
    "svhn-label-range": (
        "svhn",
        _write_svhn,
        lambda r: _svhn_mat(r / "test_32x32.mat", (32, 32, 3, 2), (11, 1)),
        "test_32x32.mat",
        "label 11 outside",
    ),
    "svhn-shape": ("svhn", _write_svhn, lambda r: _svhn_mat(r / "train_32x32.mat", x_shape=(28, 28, 3, 5)), "train_32x32.mat", "expected 32×32×3×N"),
    "svhn-damaged": (
        "svhn",
        _write_svhn,
        lambda r: (r / "test_32x32.mat").write_bytes(b"garbage" * 30),
        "test_32x32.mat",
        "not a readable .mat file",
    ),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_damaged_files_give_one_line_naming_the_file(tmp_path, name):
    dataset, write, damage, named, says = DAMAGES[name]
    write(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError) as info:
        check_data(DataConfig(dataset=dataset, root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and f"dataset '{dataset}' in data-root '{tmp_path}'" in message
    assert f"'{tmp_path / named}'" in message and says in message
    assert "download = true" in message  # how to get the data


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "svhn"])
def test_missing_folder_gives_one_line_with_layout_and_download(tmp_path, dataset):
    from splitmix.data import LAYOUTS

    folder = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        check_data(DataConfig(dataset=dataset, root=str(folder)))
    message = str(info.value)
    assert "\n" not in message and f"folder '{folder}' does not exist" in message
    assert LAYOUTS[dataset] in message and "download = true" in message


def test_check_data_passes_on_good_files(tmp_path):
    _write_mnist(tmp_path)
    check_data(DataConfig(dataset="mnist", root=str(tmp_path)))
    check_data(DataConfig())  # the embedded digits


WRITERS = {"mnist": ("MNIST", _write_mnist), "cifar10": ("CIFAR10", _write_cifar10), "svhn": ("SVHN", _write_svhn)}


@pytest.mark.parametrize("dataset", WRITERS)
def test_download_true_fetches_missing_splits_with_torchvision(tmp_path, monkeypatch, dataset):
    import torchvision.datasets

    cls_name, write = WRITERS[dataset]
    calls = []

    class FakeTorchvisionDataset:  # what torchvision would download, written in its on-disk format
        def __init__(self, root, **kwargs):
            calls.append((root, kwargs))
            split = kwargs.get("split") or ("train" if kwargs["train"] else "test")
            write(Path(root), splits=(split,))

    monkeypatch.setattr(torchvision.datasets, cls_name, FakeTorchvisionDataset)
    root = tmp_path / "fresh"
    check_data(DataConfig(dataset=dataset, root=str(root), download=True))
    if dataset == "svhn":
        assert calls == [(str(root), {"split": "test", "download": True}), (str(root), {"split": "train", "download": True})]
    else:
        assert calls == [(str(root), {"train": False, "download": True}), (str(root), {"train": True, "download": True})]
    assert len(load_split(dataset, str(root), True, True)) > 0  # now in place: read, not fetched again
    assert len(calls) == 2


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://…, got:\n<urlopen error [Errno -3]>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError) as info:
        check_data(DataConfig(dataset="mnist", root=str(tmp_path), download=True))
    message = str(info.value)
    assert "\n" not in message and f"downloading into '{tmp_path}' with torchvision failed" in message and "urlopen error" in message


def test_download_key_reaches_the_data_config_and_stays_hashable():
    from splitmix.config import load_config

    cfg = load_config(overrides="dataset=mnist data-root=/data download=true").data_config()
    assert cfg.download is True and cfg.root == "/data" and hash(cfg) == hash(DataConfig(dataset="mnist", root="/data", download=True))
    assert load_config().data_config().download is False


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            "dataset=digits5 data-root=/data download=true",
            "placed in data-root by hand; download = true is allowed with dataset mnist, svhn, cifar10",
        ),
        ("dataset=digits download=true", "embedded"),
        ("dataset=mnist download=true", "needs data-root"),
    ],
)
def test_download_is_a_config_error_where_it_cannot_work(overrides, says):
    from splitmix.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="config key 'download' = true") as info:
        load_config(overrides=overrides)
    assert says in str(info.value)
    with pytest.raises(DataError, match="cannot be downloaded"):
        DataConfig(dataset="digits5", root="/data", download=True)


def test_cli_simulate_with_missing_data_exits_2_before_ray(capsys, monkeypatch):
    import flwr.simulation

    from splitmix.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("the simulation engine (Ray) was started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", no_ray)
    assert main(["simulate", "--run-config", "dataset=mnist data-root=/nonexistent"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "dataset 'mnist'" in lines[0] and "folder '/nonexistent' does not exist" in lines[0] and "download = true" in lines[0]
    assert captured.out == ""


def _write_digits5(root):
    """Tiny files in each domain's real on-disk format: MNIST IDX, SVHN/SynthDigits .mat,
    USPS libsvm bz2, MNIST-M PNGs with a labels file."""
    import bz2

    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    _write_mnist(root, sizes=(4, 2))
    for folder, stem in (("SVHN", "{}_32x32.mat"), ("SynthDigits", "synth_{}_32x32.mat")):
        (root / folder).mkdir()
        for split, n in (("train", 4), ("test", 2)):
            savemat(
                root / folder / stem.format(split),
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": (np.arange(n) + 1).reshape(-1, 1)},
            )
    (root / "USPS").mkdir()
    for name, n in (("usps.bz2", 4), ("usps.t.bz2", 2)):
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{rng.uniform(-1, 1):.3f}" for j in range(256)) for i in range(n)]
        (root / "USPS" / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    for split, n in (("train", 4), ("test", 2)):
        folder = root / "MNIST_M" / f"mnist_m_{split}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i:08d}.png")
        (root / "MNIST_M" / f"mnist_m_{split}_labels.txt").write_text("".join(f"{i:08d}.png {i % 10}\n" for i in range(n)))


def test_digits5_domains_load_from_their_real_formats(tmp_path):
    from splitmix.data import digits5_domains

    _write_digits5(tmp_path)
    train = digits5_domains(str(tmp_path), True)
    assert [len(d) for d in train] == [4, 4, 4, 4, 4]
    assert all(d.x.shape[1:] == (3, 28, 28) and 0 <= d.x.min() and d.x.max() <= 1 for d in train)
    assert train[1].y.tolist() == [1, 2, 3, 4]  # SVHN labels 1..4 (10 would mean 0)
    assert train[2].y.tolist() == [0, 1, 2, 3]  # USPS labels 1..10 → 0..9
    cfg = DataConfig(dataset="digits5", root=str(tmp_path), partition="domains", num_partitions=5, val_ratio=0.0)
    for client in range(5):  # one client per domain gets that domain's whole train set
        assert torch.equal(client_train_data(cfg, client).x.sort(0).values, train[client].x.sort(0).values)
    assert len(central_test_set(cfg)) == 10


def test_digits5_errors_name_the_file_and_say_it_is_placed_by_hand(tmp_path):
    _write_digits5(tmp_path)
    missing = tmp_path / "MNIST_M" / "mnist_m_test" / "00000001.png"
    missing.unlink()
    with pytest.raises(DataError) as info:
        check_data(DataConfig(dataset="digits5", root=str(tmp_path), partition="domains", num_partitions=5))
    message = str(info.value)
    assert "\n" not in message and f"missing file '{missing}'" in message and "placed by hand" in message
    with pytest.raises(DataError, match=f"folder '{tmp_path / 'none'}' does not exist"):
        check_data(DataConfig(dataset="digits5", root=str(tmp_path / "none")))
