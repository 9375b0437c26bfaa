"""Data: digits splits, flwr-datasets partitions, domains, and the real on-disk loaders on tiny
files written in MNIST's IDX, CIFAR-10's python-batch and SVHN's .mat formats."""

import pickle
import struct

import numpy as np
import pytest
import torch

from splitmix.data import DOMAINS, DataConfig, client_train_data, load_split, partition_indices
from splitmix.data import test_data as central_test_set


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_split("digits", "", True), load_split("digits", "", False)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.x.shape[1:] == (1, 8, 8) and 0 <= train.x.min() and train.x.max() <= 1
    assert torch.bincount(test.y).min() >= 35  # stratified


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
    cfg = DataConfig(partition="domains", num_partitions=10)
    raw = load_split("digits", "", True)
    first, inverted = client_train_data(cfg, 0), client_train_data(cfg, 2)  # domains 0 and 1
    idx0, idx2 = partition_indices(cfg)[0], partition_indices(cfg)[2]
    assert torch.equal(first.x, raw.x[torch.as_tensor(idx0)])
    assert torch.allclose(inverted.x, 1.0 - raw.x[torch.as_tensor(idx2)])
    assert len(central_test_set(cfg)) == len(DOMAINS) * 360


def test_out_of_range_partition_is_rejected():
    with pytest.raises(ValueError, match="partition-id 50"):
        client_train_data(DataConfig(num_partitions=50), 50)
    with pytest.raises(ValueError, match="unknown dataset"):
        DataConfig(dataset="imagenet")


def test_real_loaders_need_a_folder():
    with pytest.raises(FileNotFoundError, match="data-root"):
        load_split("mnist", "", True)


def _write_idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    train = load_split("mnist", str(tmp_path), True)
    assert train.x.shape == (6, 1, 28, 28) and train.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert 0 <= train.x.min() and train.x.max() <= 1
    assert len(load_split("mnist", str(tmp_path), False)) == 4


def test_cifar10_loader_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    train = load_split("cifar10", str(tmp_path), True)
    assert train.x.shape == (10, 3, 32, 32) and train.y.tolist() == [1, 7] * 5
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0].tobytes(), np.uint8)
    assert torch.allclose(train.x[0], torch.from_numpy(first.reshape(3, 32, 32).astype(np.float32) / 255))


def test_svhn_loader_reads_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": np.array([[10], [1], [2], [3], [4]][:n])},
        )
    train = load_split("svhn", str(tmp_path), True)
    assert train.x.shape == (5, 3, 32, 32) and train.y.tolist() == [0, 1, 2, 3, 4]  # label 10 means digit 0
    assert len(load_split("svhn", str(tmp_path), False)) == 3


def _write_digits5(root):
    """Tiny files in each domain's real on-disk format: MNIST IDX, SVHN/SynthDigits .mat,
    USPS libsvm bz2, MNIST-M PNGs with a labels file."""
    import bz2

    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 4), ("t10k", 2)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
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
    cfg = DataConfig(dataset="digits5", root=str(tmp_path), partition="domains", num_partitions=5)
    for client in range(5):  # one client per domain gets that domain's whole train set
        assert torch.equal(client_train_data(cfg, client).x.sort(0).values, train[client].x.sort(0).values)
    assert len(central_test_set(cfg)) == 10
