"""The numpy partitioners (splitmix/partition.py): hand-computed IID shares, Dirichlet partitions
that use every example exactly once, draw-for-draw agreement with flwr-datasets' partitioners
(which made the partitions of the runs in results/), and clients left empty instead of an error."""

import warnings

import numpy as np
import pytest

from splitmix.partition import Partition, dirichlet_partition, iid_partition, iid_sizes

LABELS = np.arange(400) % 10  # 40 examples of each of 10 classes


def _flwr_dirichlet(labels, n, alpha, seed, min_size):
    """flwr-datasets' DirichletPartitioner as data.py used it, and how many times it redrew."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha, min_partition_size=min_size, self_balancing=True, seed=seed)
    part.dataset = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    with warnings.catch_warnings(record=True) as redraws:
        warnings.simplefilter("always")
        parts = [np.asarray(part.load_partition(i)["idx"]) for i in range(n)]
    return parts, len(redraws)


def _assert_each_index_once(part: Partition, count: int) -> None:
    assert int(part.sizes.sum()) == count
    assert np.array_equal(np.sort(part.flat), np.arange(count))  # every index once: no overlap, none lost


def test_iid_shares_of_10_examples_over_7_clients():
    # 10 = 7 · 1 + 3: the first 3 clients get 2, the other 4 get 1, contiguous in the given order
    order = np.array([9, 4, 7, 0, 2, 8, 1, 3, 6, 5])
    part = iid_partition(order, 7)
    assert part.sizes.tolist() == [2, 2, 2, 1, 1, 1, 1]
    assert [p.tolist() for p in part] == [[9, 4], [7, 0], [2, 8], [1], [3], [6], [5]]
    assert part[-1].tolist() == [5] and len(part) == 7


def test_iid_with_more_clients_than_examples_leaves_the_rest_empty():
    assert iid_sizes(3, 5).tolist() == [1, 1, 1, 0, 0]
    part = iid_partition(np.array([2, 0, 1]), 5)
    assert [p.tolist() for p in part] == [[2], [0], [1], [], []]


def test_partition_is_read_only_and_rejects_clients_outside():
    part = iid_partition(np.arange(6), 4)  # sizes 2, 2, 1, 1
    with pytest.raises(ValueError, match="read-only"):
        part[0][0] = 5
    with pytest.raises(IndexError, match=r"client 4 is outside \[0, 4\)"):
        part[4]
    with pytest.raises(ValueError, match="sizes add up to 5, the flat array holds 6"):
        Partition.from_sizes(np.arange(6), np.array([2, 3]))
    both = Partition.concat([part, iid_partition(np.arange(10, 13), 2)])
    assert [p.tolist() for p in both] == [[0, 1], [2, 3], [4], [5], [10, 11], [12]]


@pytest.mark.parametrize(
    "n, alpha, seed, min_size, redraws",
    [
        (7, 0.5, 0, 0, 0),  # the test-split setting: no minimum
        (20, 0.3, 1, 1, 0),
        (30, 0.5, 0, 2, 0),
        (50, 0.5, 0, 1, 3),  # flwr redraws 3 times before every client has an example
        (3, 100.0, 5, 10, 0),
    ],
)
def test_dirichlet_reproduces_flwr_datasets_draw_for_draw(n, alpha, seed, min_size, redraws):
    labels = np.random.default_rng(seed).permutation(LABELS)  # data.py passes labels in shuffled order
    reference, redrawn = _flwr_dirichlet(labels, n, alpha, seed, min_size)
    assert redrawn == redraws
    ours = dirichlet_partition(labels, n, alpha, seed, min_size)
    assert [p.tolist() for p in ours] == [r.tolist() for r in reference]  # same members, same order
    _assert_each_index_once(ours, 400)


def test_dirichlet_skews_labels_and_self_balances():
    part = dirichlet_partition(LABELS, 10, 0.1, seed=0)
    _assert_each_index_once(part, 400)
    dominant = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in part if len(p)]
    assert np.mean(dominant) > 0.5  # IID would give about 0.1 + noise
    # self-balancing: a client that holds more than the average 40 takes no further class, so
    # no client exceeds 40 + one class (40 examples)
    assert part.sizes.max() <= 80


def test_dirichlet_with_more_clients_than_examples_leaves_clients_empty_instead_of_raising():
    labels = np.random.default_rng(0).integers(0, 10, 600)
    part = dirichlet_partition(labels, 1000, 0.5, seed=3, min_size=1)  # flwr-datasets raises here
    _assert_each_index_once(part, 600)
    assert len(part) == 1000 and (part.sizes == 0).sum() >= 400  # 600 examples cannot fill 1000 clients
    again = dirichlet_partition(labels, 1000, 0.5, seed=3, min_size=1)
    assert np.array_equal(again.flat, part.flat) and np.array_equal(again.offsets, part.offsets)  # seeded
    other = dirichlet_partition(labels, 1000, 0.5, seed=4, min_size=1)
    assert not np.array_equal(other.offsets, part.offsets)


def test_dirichlet_keeps_the_last_draw_when_redraws_run_out():
    labels = np.random.default_rng(0).permutation(LABELS)
    with pytest.raises(ValueError, match="max number of attempts"):
        _flwr_dirichlet(labels, 100, 0.1, 0, 1)  # 400 examples could fill 100 clients, α 0.1 does not
    part = dirichlet_partition(labels, 100, 0.1, seed=0, min_size=1)
    _assert_each_index_once(part, 400)
    assert (part.sizes == 0).any()


def test_dirichlet_on_100k_clients_uses_every_example_once():
    labels = np.random.default_rng(1).integers(0, 10, 60_000)
    part = dirichlet_partition(labels, 100_000, 0.5, seed=0, min_size=1)
    _assert_each_index_once(part, 60_000)
    # self-balancing: the average is 0.6, so a client that holds an example takes no later class:
    # every non-empty client holds one class only, except the last one, which (as in flwr-datasets'
    # np.split) also takes what floor(cumulative share · class size) leaves at the end of a class
    owners = np.repeat(np.arange(100_000), part.sizes)
    pairs = np.unique(owners * 10 + labels[part.flat]) // 10  # (client, class) pairs → client
    classes_held = np.bincount(pairs, minlength=100_000)
    assert classes_held[:-1].max() == 1 and classes_held[-1] > 1
