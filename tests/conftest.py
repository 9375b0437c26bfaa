"""Shared fixtures: an in-process Grid that runs the real ClientApp handlers without Ray, so
strategy/round-loop tests stay fast; the Ray engine itself is exercised in test_simulation_e2e."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import pytest
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

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:

        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            handler = client_handler(msg.metadata.message_type)
            reply = handler(msg, ctx)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            replies.append(reply)
        return replies


@pytest.fixture
def in_process_grid():
    return InProcessGrid


# Shared tiny configurations: a run that trains in seconds, and a ViT small enough for unit speed.
TINY_RUN = "num-clients=4 num-rounds=2 local-epochs=1 pgd-steps=2 eval-pgd-steps=1 eval-lambdas='0,1'"
TINY_VIT = {"model": "vit", "vit-depth": 2, "vit-dim": 128, "vit-heads": 16}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config("key=value ...")``: the tiny run's config with these overrides on top."""
    from splitmix.config import load_config

    return lambda overrides="": load_config(overrides=f"{TINY_RUN} {overrides}")


@pytest.fixture(scope="session")
def tiny_vit() -> dict:
    """Run-config keys of a 2-block ViT (dim 128, 16 heads): every base has 2 heads."""
    return dict(TINY_VIT)


def _technique_round(
    overrides: str, model, units: list[str], data=None, *, adversarial: bool = False, server_round: int = 1, seed: int = 0, state=None
):
    """One client's round of the sparse technique that ``overrides`` turns on, as the ClientApp
    builds it (task from the run config, technique from the registry, hooks from the technique),
    with ``before_training`` already called: ``(hooks, round, Context state)``. Pass the returned
    ``state`` back in for the node's next round."""
    from types import SimpleNamespace

    import torch

    from splitmix.config import load_config
    from splitmix.data import ArrayData
    from splitmix.protocol import NodeProfile
    from techniques.base import ClientRound
    from techniques.sparse_base import SparseTechnique

    task = load_config(overrides=overrides).client_task()
    technique = next(t for t in task.techniques_on() if isinstance(t, SparseTechnique))
    if data is None:
        data = ArrayData(torch.zeros(160, 1, 8, 8), torch.zeros(160, dtype=torch.long))
    state = RecordDict() if state is None else state
    rnd = ClientRound(
        model=model,
        units=units,
        task=task,
        profile=NodeProfile(0, 1.0, adversarial, sparse=True),
        context=SimpleNamespace(state=state),
        data=data,
        device=torch.device("cpu"),
        seed=seed,
        server_round=server_round,
        single_unit=lambda: task.spec.build(1),
    )
    hooks = technique.client_round(rnd)
    hooks.before_training(rnd)
    return hooks, rnd, state


@pytest.fixture
def technique_round():
    """``technique_round(overrides, model, units, data=None)``: see :func:`_technique_round`."""
    return _technique_round
