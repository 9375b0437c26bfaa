"""Shared fixtures: an in-process Grid that runs the real ClientApp handlers without Ray, so
strategy/round-loop tests stay fast; the Ray engine itself is exercised in test_simulation_e2e."""

from __future__ import annotations

import pytest

from server.local_grid import InProcessGrid, client_handler  # the shared in-process Grid (also used by bench/ and tools/)

__all__ = ["InProcessGrid", "client_handler"]


@pytest.fixture
def in_process_grid():
    return InProcessGrid


def _ask_connected(strategy, grid, timeout: float = 1.0):
    """What a deployment's round loop does before it samples: note the connected nodes
    (``refresh``), then ask those whose profile is unknown (``known_profiles`` through the sender
    ``attach`` gave it). Returns the queries' RoundStats."""
    strategy.attach(lambda messages: grid.send_and_receive(messages, timeout=timeout), timeout)
    strategy.refresh(grid)
    return strategy.known_profiles(sorted(strategy.online))[1]


@pytest.fixture
def ask_connected():
    return _ask_connected


# Shared tiny configurations: a run that trains in seconds, and a ViT small enough for unit speed.
TINY_RUN = "num-clients=4 num-rounds=2 local-epochs=1 pgd-steps=2 eval-pgd-steps=1 eval-lambdas='0,1'"
TINY_VIT = {"model": "vit", "vit-depth": 2, "vit-dim": 128, "vit-heads": 16}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config("key=value ...")``: the tiny run's config with these overrides on top."""
    from splitmix.config import load_config, parse_overrides

    # The overrides are a layer on top of the tiny run (a key given in both is not a repeat).
    return lambda overrides="": load_config(overrides={**parse_overrides(TINY_RUN), **parse_overrides(overrides)})


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
    from flwr.app import RecordDict

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
