"""Two changes to Flower 1.42's Simulation Engine (``flwr.server.superlink.fleet.vce.vce_api``)
that make a simulation's cost follow the sampled clients, not the population.

1. **Dispatch.** Flower's ``add_messages_to_queue`` visits every registered node every 0.1 s and,
   for each, scans every outstanding message: O(population × outstanding) per sweep, on a driver
   thread that never rests (at 10⁵ nodes a sweep takes seconds of CPU that the actors need), and
   a round's messages wait up to 0.1 s before an actor sees them. :func:`dispatch_pending` sweeps
   only the nodes that have an undelivered message, every ``SWEEP_SECONDS``, through Flower's own
   ``get_message_ins`` (so delivery marking and TTL checks are Flower's), and queues the largest
   payloads first: a Split-Mix client with 8 bases trains ~8× longer than one with 1, and
   starting the long jobs first (longest-processing-time order) keeps one actor from idling
   while the other finishes a straggler at the end of the round.
2. **Node contexts.** Flower builds a ``Context`` (and its info store) for every node before the
   first message (~1.2 KB and ~55 µs a node: 5 s and 120 MB at 10⁵ nodes). :class:`LazyInfoStores`
   builds a node's the first time a message for it is processed, with the same node config.

:func:`install` swaps both in (idempotent); ``splitmix simulate`` calls it before
``run_simulation``. Flower is pinned to 1.42 (pyproject), whose functions these replace; the
tests in ``tests/unit/test_simulation_engine.py`` check that the replaced functions still exist
with the signatures used here.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

from flwr.app import Message

from splitmix.protocol.codec import record_bytes

SWEEP_SECONDS = 0.005  # pause between dispatch sweeps (Flower's: 0.1 s)

_INSTALLED = False


def payload_bytes(message: Message) -> int:
    """Bytes of the tensors a message carries: the dispatch priority (more tensors, more work)."""
    return sum(record_bytes(record) for record in message.content.array_records.values())


def pending_nodes(state: Any) -> list[int]:
    """Nodes with an undelivered message, largest payload first (ties: push order)."""
    with state.lock:
        waiting = [m for m in state.message_ins_store.values() if m.metadata.delivered_at == ""]
    order = sorted(range(len(waiting)), key=lambda i: -payload_bytes(waiting[i]))
    nodes: list[int] = []
    seen: set[int] = set()
    for i in order:
        node = waiting[i].metadata.dst_node_id
        if node not in seen:
            seen.add(node)
            nodes.append(node)
    return nodes


def dispatch_pending(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Replaces ``vce_api.add_messages_to_queue``: put undelivered messages in the workers' queue."""
    while not f_stop.is_set():
        for node in pending_nodes(state):
            if node in nodes_mapping:
                for message in state.get_message_ins(node_id=node, limit=1):
                    queue.put(message)
        f_stop.wait(SWEEP_SECONDS)


class LazyInfoStores(dict):
    """Replaces the dict of ``vce_api._register_node_info_stores``: a node's info store (its
    ``Context``) is built when first looked up, as Flower would have built it up front."""

    def __init__(self, nodes_mapping: dict[int, int], run: Any, app_dir: str | None) -> None:
        super().__init__()
        self.nodes_mapping, self.run, self.app_dir = nodes_mapping, run, app_dir
        self.num_partitions = len(set(nodes_mapping.values()))
        self._lock = threading.Lock()  # worker threads may ask for the same node at once

    def __missing__(self, node_id: int) -> Any:
        from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
        from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

        with self._lock:
            if node_id in self:
                return dict.__getitem__(self, node_id)
            partition_id = self.nodes_mapping[node_id]  # KeyError for a node that is not registered, as before
            store = DeprecatedRunInfoStore(node_id=node_id, node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: self.num_partitions})
            store.register_context(run_id=self.run.run_id, run=self.run, app_dir=self.app_dir)
            self[node_id] = store
            return store


def lazy_info_stores(nodes_mapping: dict[int, int], run: Any, app_dir: str | None = None) -> LazyInfoStores:
    """Replaces ``vce_api._register_node_info_stores`` (same arguments)."""
    return LazyInfoStores(nodes_mapping, run, app_dir)


def install() -> None:
    """Swap both replacements into Flower's Simulation Engine module (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.add_messages_to_queue = dispatch_pending  # type: ignore[assignment]
    vce_api._register_node_info_stores = lazy_info_stores  # type: ignore[assignment]
    _INSTALLED = True
