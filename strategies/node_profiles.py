"""Every partition's profile as arrays, derived from the run instead of asked of the nodes.

In a simulation the server knows everything a node's profile depends on: the node config of a
virtual node is only its partition id (Flower's simulation engine registers partition ``i`` as
the ``i``-th node), and budget, robustness and sparsity follow from the run config
(``splitmix/profiles.py``), the example count from the partition (``splitmix/data.py``). So the
server derives all profiles at start-up in O(population) numpy work and sends no message per
node — start-up no longer grows with one round trip per node (issue 19). A deployment's nodes
carry node configs only they know: there the strategy asks the nodes it samples (lazily).

Per-partition records are numpy arrays, not one Python object per node: a ``NodeProfile`` is built
only for a node that is sampled or evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from splitmix.profiles import adversarial_clients, budgets_of_clients, sparse_clients
from splitmix.protocol import NodeProfile
from splitmix.protocol.task import ClientTask


@dataclass(frozen=True)
class ProfileTable:
    """Partition-indexed profiles; ``node_ids[p]`` is the node that holds partition ``p``."""

    node_ids: np.ndarray  # uint64 (Flower node ids use all 64 bits), one per partition
    budget: np.ndarray  # float64
    adversarial: np.ndarray  # bool
    sparse: np.ndarray  # bool
    num_examples: np.ndarray  # int64: training examples (the cap on a reply's weight)

    def __post_init__(self) -> None:
        order = np.argsort(self.node_ids, kind="stable")
        object.__setattr__(self, "_sorted_ids", self.node_ids[order])
        object.__setattr__(self, "_sorted_rows", order)

    def __len__(self) -> int:
        return len(self.node_ids)

    def row(self, node_id: int) -> int | None:
        """The partition held by ``node_id`` (None: not a node of this table)."""
        ids: np.ndarray = self._sorted_ids  # type: ignore[attr-defined]
        at = int(np.searchsorted(ids, np.uint64(node_id)))
        if at < len(ids) and int(ids[at]) == node_id:
            return int(self._sorted_rows[at])  # type: ignore[attr-defined]
        return None

    def profile(self, partition_id: int) -> NodeProfile:
        p = partition_id
        return NodeProfile(
            p, float(self.budget[p]), bool(self.adversarial[p]), bool(self.sparse[p]), int(self.num_examples[p]), int(self.node_ids[p])
        )

    def eligible(self, accept: Callable[[NodeProfile], bool] | None) -> np.ndarray:
        """Boolean mask of the partitions whose profile ``accept`` takes (and that hold data).

        ``accept`` looks only at profile fields, so it is called once per distinct (budget,
        adversarial, sparse) combination, not once per node."""
        mask = self.num_examples > 0
        if accept is None:
            return mask
        keys = np.stack([self.budget, self.adversarial.astype(np.float64), self.sparse.astype(np.float64)], axis=1)
        combos, inverse = np.unique(keys, axis=0, return_inverse=True)
        verdict = np.array([accept(NodeProfile(0, float(b), bool(a), bool(s), 1, 0)) for b, a, s in combos], dtype=bool)
        return mask & verdict[inverse.reshape(-1)]


def derive_profiles(task: ClientTask, node_ids: Sequence[int], train_examples: np.ndarray) -> ProfileTable:
    """The profiles ``profile_of_node`` gives nodes whose node config is only their partition id
    (a simulation's virtual nodes), for partitions ``0..len(node_ids)-1``; ``train_examples[p]``
    is partition ``p``'s training-example count (``splitmix.data.partition_sizes(...).train``)."""
    n = task.data.num_partitions
    if len(node_ids) != n or len(train_examples) != n:
        raise ValueError(f"{len(node_ids)} node ids and {len(train_examples)} example counts for {n} partitions")
    return ProfileTable(
        node_ids=np.asarray(node_ids, dtype=np.uint64),
        budget=budgets_of_clients(n, task.budgets),
        adversarial=adversarial_clients(n, task.adv_fraction, task.seed),
        sparse=sparse_clients(n, task.sparse_fraction, task.seed),
        num_examples=np.asarray(train_examples, dtype=np.int64),
    )
