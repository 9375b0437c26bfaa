"""Per-client train / validation / test splits (the paper's metric), on the embedded ``digits``
data: 1797 images, a fixed stratified 80/20 split into 1437 train and 360 test images."""

import numpy as np
import pytest
import torch

from splitmix.data import (
    DOMAIN_TRANSFORMS,
    DataConfig,
    client_splits,
    client_train_data,
    load_split,
    partition_indices,
    train_sample,
    val_count,
)
from splitmix.data import test_data as pooled_test_set

TRAIN, TEST = load_split("digits", "", True), load_split("digits", "", False)


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    """Images as a sorted multiset of rows (order-free comparison)."""
    return sorted(map(tuple, x.flatten(1).tolist()))


def test_val_count_rule():
    assert val_count(144, 0.2) == 28  # floor(28.8)
    assert val_count(100, 0.29) == 29  # floor despite 0.29 · 100 = 28.999…96 in floating point
    assert val_count(29, 0.01) == 1  # at least one when the share has ≥ 2 examples
    assert val_count(2, 0.9) == 1 and val_count(1, 0.5) == 0 and val_count(0, 0.5) == 0
    assert val_count(144, 0.0) == 0


def test_train_val_partition_the_old_training_share_and_test_is_the_clients_test_share():
    cfg = DataConfig(partition="iid", num_partitions=10)
    assert [len(p) for p in partition_indices(cfg, True)] == [144] * 7 + [143] * 3  # 1437 over 10
    for client in (0, 9):
        share = TRAIN.subset(partition_indices(cfg, True)[client])
        s = client_splits(cfg, client)
        # val: floor(0.2 · 144) = floor(28.8) = 28 and floor(0.2 · 143) = floor(28.6) = 28; test: 360 / 10
        assert (len(s.train), len(s.val), len(s.test)) == (len(share) - 28, 28, 36)
        assert _rows(torch.cat([s.train.x, s.val.x])) == _rows(share.x)  # train ∪ val = the old share, once
        assert sorted(torch.cat([s.train.y, s.val.y]).tolist()) == sorted(share.y.tolist())
        assert torch.equal(s.test.x, TEST.x[torch.tensor(partition_indices(cfg, False)[client])])
        assert client_train_data(cfg, client) is s.train
    tests = np.concatenate(partition_indices(cfg, False))
    assert sorted(tests.tolist()) == list(range(360))  # test shares are disjoint and cover the test split


def test_val_split_is_seeded_per_client_and_val_ratio_zero_keeps_everything():
    cfg = DataConfig(partition="iid", num_partitions=50)  # 1437 = 37 · 29 + 13 · 28
    s49 = client_splits(cfg, 49)
    assert (len(s49.train), len(s49.val), len(s49.test)) == (23, 5, 7)  # floor(5.6) = 5; 360 = 10 · 8 + 40 · 7
    again = client_splits(DataConfig(partition="iid", num_partitions=50, val_ratio=0.2), 49)
    assert torch.equal(again.val.x, s49.val.x)  # deterministic
    other = client_splits(DataConfig(partition="iid", num_partitions=50, seed=1), 49)
    assert len(other.val) == 5 and not torch.equal(other.val.x, s49.val.x)
    none = client_splits(DataConfig(partition="iid", num_partitions=50, val_ratio=0.0), 49)
    assert len(none.val) == 0 and none.val.x.shape[1:] == (1, 8, 8)
    assert torch.equal(none.train.x, TRAIN.x[torch.tensor(partition_indices(cfg, True)[49])])
    sample = train_sample(cfg, 10**6, seed=0)  # the server's sample comes from the train parts only
    assert len(sample) == 1437 - (37 * 5 + 13 * 5)  # floor(5.8) = floor(5.6) = 5 per client


def test_domain_test_splits_are_the_domains_transformed_test_images():
    cfg = DataConfig(partition="domains", num_partitions=50)  # 10 contiguous clients per domain
    tests = partition_indices(cfg, False)
    for domain, name in ((1, "inverted"), (3, "noisy")):
        clients = range(10 * domain, 10 * domain + 10)
        covered = np.concatenate([tests[p] for p in clients])
        assert sorted(covered.tolist()) == list(range(360))  # the domain's test set, exactly once
        transformed = DOMAIN_TRANSFORMS[name](TEST.x)
        for p in (clients[0], clients[-1]):
            s = client_splits(cfg, p)
            assert len(s.test) == 36
            assert torch.equal(s.test.x, transformed[torch.tensor(tests[p])])
            assert torch.equal(s.test.y, TEST.y[torch.tensor(tests[p])])
    inverted = client_splits(cfg, 10).test
    assert torch.allclose(inverted.x, 1.0 - TEST.x[torch.tensor(tests[10])])


@pytest.mark.parametrize("partition", ["iid", "domains"])
def test_pooled_test_set_is_the_concatenation_of_client_test_splits(partition):
    cfg = DataConfig(partition=partition, num_partitions=50)
    pooled = pooled_test_set(cfg)
    parts = [client_splits(cfg, p).test for p in range(50)]
    assert len(pooled) == (360 if partition == "iid" else 5 * 360)
    assert torch.equal(pooled.x, torch.cat([p.x for p in parts]))
    assert torch.equal(pooled.y, torch.cat([p.y for p in parts]))


def test_dirichlet_test_shares_partition_the_test_split():
    cfg = DataConfig(partition="dirichlet", num_partitions=10, alpha=0.5)
    covered = np.concatenate(partition_indices(cfg, False))
    assert sorted(covered.tolist()) == list(range(360))
    assert torch.equal(pooled_test_set(cfg).x, TEST.x)  # the test split as stored
    assert sum(len(client_splits(cfg, p).test) for p in range(10)) == 360


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_invalid_val_ratio_is_rejected_naming_the_key(ratio):
    with pytest.raises(ValueError, match=r"val-ratio .* \[0, 1\)"):
        DataConfig(val_ratio=ratio)


def test_val_ratio_is_a_config_key():
    from splitmix.config import ConfigError, load_config

    assert load_config().data_config().val_ratio == 0.2
    assert load_config(overrides={"val-ratio": 0.1}).data_config().val_ratio == 0.1
    with pytest.raises(ConfigError, match="val-ratio"):
        load_config(overrides={"val-ratio": 1.5})
    with pytest.raises(ConfigError, match="val-ratio"):
        load_config(overrides={"val-ratio": 1.0})


def test_partition_sizes_are_the_split_lengths_without_building_them():
    from splitmix.data import partition_sizes

    sizes = partition_sizes(DataConfig(partition="iid", num_partitions=50))
    # shares: 1437 = 37 · 29 + 13 · 28; val floor(0.2 · 29) = floor(0.2 · 28) = 5; test 360 = 10 · 8 + 40 · 7
    assert sizes.train.tolist() == [24] * 37 + [23] * 13
    assert sizes.val.tolist() == [5] * 50
    assert sizes.test.tolist() == [8] * 10 + [7] * 40
    cfg = DataConfig(partition="dirichlet", num_partitions=50, alpha=0.5)
    sizes = partition_sizes(cfg)
    assert int(sizes.train.sum() + sizes.val.sum()) == 1437 and int(sizes.test.sum()) == 360
    for client in (0, 17, 49):
        s = client_splits(cfg, client)
        assert (len(s.train), len(s.val), len(s.test)) == (sizes.train[client], sizes.val[client], sizes.test[client])
    assert partition_sizes(cfg) is sizes  # cached


@pytest.mark.parametrize(
    "clients, client, lengths",
    [
        (1000, 0, (1, 1, 1)),  # 1437 over 1000: the first 437 hold 2 (one kept for validation); test 360 over 1000
        (1000, 436, (1, 1, 0)),
        (1000, 437, (1, 0, 0)),  # one example: it trains on it, none for validation
        (2000, 1436, (1, 0, 0)),
        (2000, 1437, (0, 0, 0)),  # more clients than examples: empty splits, not an error
    ],
)
def test_clients_with_two_one_or_zero_examples_get_short_or_empty_splits(clients, client, lengths):
    from splitmix.data import partition_sizes

    cfg = DataConfig(partition="iid", num_partitions=clients)
    s = client_splits(cfg, client)
    assert (len(s.train), len(s.val), len(s.test)) == lengths
    assert s.train.x.shape[1:] == s.val.x.shape[1:] == s.test.x.shape[1:] == (1, 8, 8)
    sizes = partition_sizes(cfg)
    assert (sizes.train[client], sizes.val[client], sizes.test[client]) == lengths


def test_trainable_counts_the_clients_the_server_skips():
    from splitmix.data import partition_sizes

    sizes = partition_sizes(DataConfig(partition="iid", num_partitions=2000))
    assert int(sizes.trainable().sum()) == 1437 and int((~sizes.trainable()).sum()) == 563  # 2000 − 1437 hold nothing
    assert int(sizes.trainable(min_examples=2).sum()) == 0  # every share is 0 or 1
    sizes = partition_sizes(DataConfig(partition="iid", num_partitions=1000))
    assert int(sizes.trainable().sum()) == 1000  # shares of 1 and 2 both leave one to train on
    dirichlet = partition_sizes(DataConfig(partition="dirichlet", num_partitions=5000, alpha=0.5))
    empty = partition_indices(DataConfig(partition="dirichlet", num_partitions=5000, alpha=0.5), True).sizes == 0
    assert np.array_equal(~dirichlet.trainable(), empty) and empty.sum() >= 5000 - 1437


@pytest.mark.parametrize("partition, clients", [("dirichlet", 10), ("domains", 10), ("iid", 2000)])
def test_train_sample_is_drawn_from_the_union_of_the_train_parts(partition, clients):
    cfg = DataConfig(partition=partition, num_partitions=clients)
    parts = [client_train_data(cfg, p) for p in range(clients)]
    union = torch.cat([p.x for p in parts])
    picked = np.sort(np.random.default_rng(7 + 31337).permutation(len(union))[:300])
    sample = train_sample(cfg, 300, seed=7)
    assert torch.equal(sample.x, union[torch.as_tensor(picked)])
    assert torch.equal(sample.y, torch.cat([p.y for p in parts])[torch.as_tensor(picked)])
