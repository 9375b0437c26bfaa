"""Partitioning index arrays over clients, vectorised in numpy for 10⁵–10⁶ clients.

The two schemes reproduce flwr-datasets' partitioners draw for draw (the runs in ``results/``
were made with those): :func:`iid_partition` is ``IidPartitioner`` (contiguous shards of an
already shuffled order, the first ``count mod n`` one longer), :func:`dirichlet_partition` is
``DirichletPartitioner`` with ``self_balancing`` and ``shuffle`` (same random stream, same
proportions, same cut points, same within-client shuffle). flwr-datasets builds a Hugging Face
table and a Python list per client, which takes minutes for 10⁵ clients and raises when a client
would be left empty; here the work is a few array operations per class, and empty clients are
allowed (see :func:`dirichlet_partition` for the one rule that differs).

A :class:`Partition` keeps every client's indices in one flat array with offsets, so 10⁶ clients
cost two arrays, not 10⁶ Python objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# flwr-datasets' DirichletPartitioner redraws this many times when a client gets fewer than
# ``min_size`` examples (and then raises; here the last draw is kept).
DIRICHLET_RETRIES = 10


@dataclass(frozen=True, eq=False)
class Partition(Sequence[np.ndarray]):
    """Client ``i`` holds ``flat[offsets[i]:offsets[i + 1]]`` (int64 indices; both arrays read-only,
    since partitions are cached and shared). Indexing gives a client's indices, ``len`` the number
    of clients, :attr:`sizes` every client's count."""

    flat: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        for array in (self.flat, self.offsets):
            array.setflags(write=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= client < len(self):
            raise IndexError(f"client {client} is outside [0, {len(self)})")
        client %= len(self)
        return self.flat[self.offsets[client] : self.offsets[client + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.flat[a:b] for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True))

    @property
    def sizes(self) -> np.ndarray:
        """Every client's number of indices, ``(len(self),)`` int64."""
        return np.diff(self.offsets)

    @staticmethod
    def from_sizes(flat: np.ndarray, sizes: np.ndarray) -> Partition:
        """A copy of ``flat`` cut into consecutive runs of ``sizes``."""
        offsets = _offsets(sizes)
        if offsets[-1] != len(flat):
            raise ValueError(f"sizes add up to {offsets[-1]}, the flat array holds {len(flat)}")
        return Partition(np.array(flat, dtype=np.int64), offsets)

    @staticmethod
    def concat(parts: Sequence[Partition]) -> Partition:
        """The clients of ``parts`` one after the other (e.g. one partition per domain)."""
        return Partition.from_sizes(np.concatenate([p.flat for p in parts]), np.concatenate([p.sizes for p in parts]))


def iid_sizes(count: int, num_clients: int) -> np.ndarray:
    """Even shares of ``count`` examples: the first ``count mod num_clients`` clients get one more
    (Hugging Face's contiguous ``shard``, which ``IidPartitioner`` uses); zeros beyond ``count``."""
    sizes = np.full(num_clients, count // num_clients, dtype=np.int64)
    sizes[: count % num_clients] += 1
    return sizes


def iid_partition(order: np.ndarray, num_clients: int) -> Partition:
    """``order`` (already shuffled) dealt into contiguous :func:`iid_sizes` shares."""
    return Partition.from_sizes(order, iid_sizes(len(order), num_clients))


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 0) -> Partition:
    """Label-shift partition of positions ``0 … len(labels) − 1``: for each class in sorted order,
    its positions (ascending) are cut by cumulative Dirichlet(α, …, α) proportions, where a client
    that already holds more than the average ``len(labels) / num_clients`` gets proportion 0 and
    the rest are renormalised (self-balancing); each client's positions are then shuffled in place,
    client by client, with the same generator (``numpy.random.default_rng(seed)``).

    With ``min_size`` > 0 a draw that leaves a client with fewer positions is redrawn, up to
    :data:`DIRICHLET_RETRIES` times, continuing the stream, as flwr-datasets does, so every
    partition flwr-datasets produced is reproduced exactly. What differs: when that is impossible
    (``min_size · num_clients`` > ``len(labels)``) nothing is redrawn, and when the retries run out
    the last draw is kept instead of raising, so such clients simply come out small or empty. If
    every client still open to a class drew proportion 0 (only when α is tiny), that class is
    split evenly over them instead of dividing by 0."""
    if len(labels) == 0:
        return Partition(np.empty(0, dtype=np.int64), np.zeros(num_clients + 1, dtype=np.int64))
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    average = len(labels) / num_clients
    alphas = np.full(num_clients, float(alpha))
    retries = DIRICHLET_RETRIES if min_size * num_clients <= len(labels) else 0
    for _ in range(retries + 1):
        sizes, owners = _dirichlet_draw(rng, classes, alphas, average)
        if min_size == 0 or sizes.min() >= min_size:
            break
    # Each client's positions: class by class, ascending within a class (flwr's list.extend order).
    flat = np.concatenate(classes)[np.argsort(np.concatenate(owners), kind="stable")]
    offsets = _offsets(sizes)
    # Clients with fewer than two positions draw nothing in Fisher–Yates, so only the others
    # (at most len(labels) / 2 of them) cost a call.
    for client in np.flatnonzero(sizes >= 2).tolist():
        rng.shuffle(flat[offsets[client] : offsets[client + 1]])
    return Partition(flat, offsets)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _dirichlet_draw(rng: np.random.Generator, classes: list[np.ndarray], alphas: np.ndarray, average: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """One self-balancing draw: every client's count and, per class, each member's client."""
    sizes = np.zeros(len(alphas), dtype=np.int64)
    owners = []
    for members in classes:
        share = rng.dirichlet(alphas)
        share[sizes > average] = 0.0
        # flwr-datasets normalises by Python's sum, on Python 3.11 (the project's) a plain
        # left-to-right sum, which cumsum's last entry reproduces and np.sum (pairwise) does not:
        # the rounding must match for identical cut points.
        total = float(np.cumsum(share)[-1])
        if total > 0:
            share /= total
        else:
            share = (sizes <= average) / np.count_nonzero(sizes <= average)
        cuts = (np.cumsum(share) * len(members)).astype(np.int64)[:-1]
        # np.split(members, cuts) gives client c the members between cuts[c − 1] and cuts[c]
        owner = np.searchsorted(cuts, np.arange(len(members)), side="right")
        sizes += np.bincount(owner, minlength=len(alphas))
        owners.append(owner)
    return sizes, owners
