"""The two replacements in Flower's Simulation Engine (server/simulation_engine.py)."""

import inspect
import threading
from queue import Queue
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from server import simulation_engine
from server.simulation_engine import LazyInfoStores, dispatch_pending, pending_nodes


def test_the_replaced_flower_functions_are_still_there_with_these_arguments():
    from flwr.server.superlink.fleet.vce import vce_api

    simulation_engine.install()
    assert list(inspect.signature(vce_api.worker).parameters)[2] == "node_info_store"
    original = inspect.getsource(vce_api.run_api)
    assert "add_messages_to_queue" in original and "node_info_stores" in original
    assert vce_api.add_messages_to_queue is dispatch_pending
    assert list(inspect.signature(dispatch_pending).parameters) == ["state", "queue", "nodes_mapping", "f_stop"]


class FakeState:
    """The part of Flower's in-memory link state the dispatcher uses."""

    def __init__(self, messages):
        self.lock = threading.RLock()
        self.message_ins_store = {str(i): m for i, m in enumerate(messages)}

    def get_message_ins(self, node_id, limit):
        out = [m for m in self.message_ins_store.values() if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for m in out:
            m.metadata.delivered_at = "now"
        return out


def message(node: int, floats: int) -> Message:
    arrays = ArrayRecord({"w": Array(np.zeros(floats, dtype=np.float32))}) if floats else ArrayRecord()
    return Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")


def test_pending_messages_are_dispatched_largest_first_and_only_once():
    messages = [message(1, 10), message(2, 80), message(3, 0), message(4, 40)]
    messages[3].metadata.delivered_at = "earlier"  # already with an actor
    state = FakeState(messages)
    assert pending_nodes(state) == [2, 1, 3]
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=dispatch_pending, args=(state, queue, {1: 0, 2: 1, 3: 2, 4: 3}, stop))
    thread.start()
    try:
        got = [queue.get(timeout=600).metadata.dst_node_id for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert got == [2, 1, 3] and queue.empty()


def test_node_contexts_are_built_when_first_needed_with_flowers_node_config():
    run = SimpleNamespace(run_id=5)
    calls = []

    class Store:
        def __init__(self, node_id, node_config):
            self.node_id, self.node_config = node_id, node_config

        def register_context(self, run_id, run, app_dir):
            calls.append((self.node_id, run_id))

    import flwr.compat.client.run_info_store as module

    original = module.DeprecatedRunInfoStore
    module.DeprecatedRunInfoStore = Store
    try:
        stores = LazyInfoStores({101: 0, 102: 1, 103: 2}, run, None)
        assert len(stores) == 0 and calls == []  # nothing built up front
        store = stores[102]
        assert store.node_config == {"partition-id": 1, "num-partitions": 3} and calls == [(102, 5)]
        assert stores[102] is store and calls == [(102, 5)]  # built once
    finally:
        module.DeprecatedRunInfoStore = original
