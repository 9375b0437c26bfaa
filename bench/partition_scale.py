"""Partitioning time against the number of clients: IID and Dirichlet over 10³–10⁵ clients.

Two label sets:

- ``digits``: the embedded data set through ``splitmix.data`` as the server calls it —
  :func:`~splitmix.data.partition_sizes` of a fresh ``DataConfig`` (train and test partitions,
  the validation counts; caches cleared before every repetition, the data set itself stays
  loaded): 1,437 training images, so most of 10⁴–10⁵ clients hold nothing;
- ``synthetic``: 60,000 seeded labels in 10 classes (MNIST's size) through
  ``splitmix.partition`` directly (the seeded shuffle, then the partition).

Reported per case: the best of ``--repeats`` wall times (the machine is shared), the number of
empty partitions (training split) and the largest. The last line is
``partition_100k_seconds: X`` with X the slowest case at 100,000 clients.

    python bench/partition_scale.py [--clients 1000,10000,100000] [--repeats 3] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from splitmix.data import DataConfig, load_split, partition_indices, partition_sizes
from splitmix.partition import Partition, dirichlet_partition, iid_partition


def best_of(repeats: int, run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """The fastest of ``repeats`` runs of ``run`` and the training sizes it returned."""
    times, sizes = [], np.zeros(0)
    for _ in range(repeats):
        start = time.perf_counter()
        sizes = run()
        times.append(time.perf_counter() - start)
    return min(times), sizes


def digits_case(partition: str, clients: int, alpha: float) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        partition_indices.cache_clear()
        partition_sizes.cache_clear()
        sizes = partition_sizes(DataConfig(partition=partition, num_partitions=clients, alpha=alpha))
        return sizes.train + sizes.val

    return run


def synthetic_case(partition: str, clients: int, alpha: float, labels: np.ndarray) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        order = np.random.default_rng(0).permutation(len(labels))
        part: Partition
        if partition == "iid":
            part = iid_partition(order, clients)
        else:
            part = dirichlet_partition(labels[order], clients, alpha, seed=0, min_size=1)
        return part.sizes

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000,100000", help="comma-separated client counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    load_split("digits", "", True), load_split("digits", "", False)  # reading the data is not timed
    synthetic = np.random.default_rng(12345).integers(0, 10, 60_000)
    print(f"{'labels':<10} {'scheme':<10} {'clients':>8} {'seconds':>8} {'empty':>8} {'largest':>8}")
    at_100k = []
    for clients in counts:
        for name, total, make in (
            ("digits", 1437, lambda p, c=clients: digits_case(p, c, args.alpha)),
            ("synthetic", 60_000, lambda p, c=clients: synthetic_case(p, c, args.alpha, synthetic)),
        ):
            for scheme in ("iid", "dirichlet"):
                seconds, sizes = best_of(args.repeats, make(scheme))
                if int(sizes.sum()) != total:
                    raise SystemExit(f"{name} {scheme} {clients}: partitions hold {int(sizes.sum())} examples, expected {total}")
                print(f"{name:<10} {scheme:<10} {clients:>8} {seconds:>8.3f} {int((sizes == 0).sum()):>8} {int(sizes.max()):>8}", flush=True)
                if clients == 100_000:
                    at_100k.append(seconds)
    if at_100k:
        print(f"partition_100k_seconds: {max(at_100k):.3f}")


if __name__ == "__main__":
    main()
