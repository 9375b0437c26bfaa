"""An in-process Grid: the real ClientApp handlers called directly, without Ray or a SuperLink.

Used by the tests (``tests/conftest.py``) and by studies and benchmarks that train small
federations on a shared 2-core machine, where starting Ray costs more than the run
(``bench/structured_speedup.py``, ``tools/structured_study.py``). Every message goes to the node's
handler at once, in order; a node keeps its ``Context`` across rounds, as Flower does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _set_task_identity() -> None:
    # Messages built outside a Flower process need a run/node identity to stamp metadata.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


_set_task_identity()


def client_handler(message_type: str) -> Callable[[Message, Context], Message]:
    """The ClientApp function Flower routes a message of this type to."""
    from clients import app as client_app

    return {
        "train": client_app.train,
        "query": client_app.query,
        "query.bn_stats": client_app.bn_stats,
        "evaluate": client_app.evaluate,
    }[message_type]


class InProcessGrid(Grid):
    """Delivers each message to ``clients.app`` handlers for node ``1000 + partition-id``.

    ``tamper(node_id, reply)`` may replace a reply (to inject malformed updates).
    """

    def __init__(self, num_nodes: int, tamper: Callable[[int, Message], Message] | None = None) -> None:
        self.nodes = {1000 + i: i for i in range(num_nodes)}
        self.tamper = tamper
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}  # message id -> reply not pulled yet
        self.contexts = {  # one Context per node, kept across rounds as Flower does
            node: Context(run_id=1, node_id=node, node_config={"partition-id": pid, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for node, pid in self.nodes.items()
        }

    @property
    def run(self):  # pragma: no cover - not used by the loop
        return None

    def set_run(self, run) -> None:  # pragma: no cover
        pass

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def partition_node_ids(self) -> list[int]:
        """Node ids in partition order: the server derives the profiles (as in a simulation)."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message at once; its reply waits for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            reply = client_handler(msg.metadata.message_type)(msg, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
