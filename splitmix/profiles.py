"""Client profiles: compute budget (a width), robustness need, and data partition.

Budgets follow the authors' notation: a level ``N`` is the width ``1/N`` and ``NdM`` is ``M/N``,
so ``'8-4-2-1'`` means the widths 1/8, 1/4, 1/2 and 1. Levels are assigned to equal,
contiguous groups of clients ordered by partition id (the authors' ``sorted_ratios[int(L*i/N)]``).
A deployment can override a node's budget and robustness through its ``--node-config``.
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np

from splitmix.node_config import NodeConfig, validate_node_config
from splitmix.protocol import NodeProfile

BUDGETS_FORM = "levels N (width 1/N) or NdM (width M/N; whole numbers 1 <= M <= N) joined by single '-', no spaces or signs: '8-4-2-1', '8-4-8d3-2'"
_LEVEL = re.compile(r"([0-9]+)(?:d([0-9]+))?")  # [0-9], not \d: int() would also take other scripts' digits


def parse_budgets(spec: str) -> list[float]:
    """``'8-4-2-1'`` → ``[0.125, 0.25, 0.5, 1.0]``; ``'8-4-8d3-2'`` → ``[.125, .25, .375, .5]``.

    Strict: an empty level (``'8--4'``, a leading or trailing ``-``), a space, a sign or a
    non-integer is an error (ValueError naming the value and :data:`BUDGETS_FORM`), never skipped
    or guessed, because each level is a group of clients and a dropped one changes the run."""
    levels = spec.split("-")
    if "" in levels:
        where = "is empty" if not spec.strip() else "has an empty level (a leading, trailing or doubled '-')"
        raise ValueError(f"'{spec}' {where}; allowed: {BUDGETS_FORM}")
    return [_level_to_width(level, spec) for level in levels]


def _level_to_width(level: str, spec: str) -> float:
    match = _LEVEL.fullmatch(level)
    if match is None:
        raise ValueError(f"'{spec}' has the level '{level}', which is not N or NdM; allowed: {BUDGETS_FORM}")
    den, num = int(match[1]), int(match[2] or 1)
    if den == 0 or not 0 < num <= den:
        raise ValueError(f"'{spec}' has the level '{level}', a width of {num}/{den}, outside (0, 1]; allowed: {BUDGETS_FORM}")
    return float(Fraction(num, den))


def budget_of_client(partition_id: int, num_clients: int, widths: list[float]) -> float:
    """Equal contiguous client groups, ordered from the smallest to the largest width."""
    ordered = sorted(widths)
    return ordered[partition_id * len(ordered) // num_clients]


def budgets_of_clients(num_clients: int, budgets: str) -> np.ndarray:
    """:func:`budget_of_client` of every client at once (a simulation derives all profiles)."""
    ordered = np.sort(np.asarray(parse_budgets(budgets), dtype=np.float64))
    return ordered[np.arange(num_clients, dtype=np.int64) * len(ordered) // num_clients]


SPARSE_SEED_OFFSET = 104729  # the sparse subset is drawn apart from the adversarial one


def sparse_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the clients that train sparse (a seeded subset, not the adversarial one)."""
    return adversarial_clients(num_clients, fraction, seed + SPARSE_SEED_OFFSET)


def adversarial_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the clients that train adversarially (a seeded random subset)."""
    mask = np.zeros(num_clients, dtype=bool)
    count = int(round(fraction * num_clients))
    mask[np.random.default_rng(seed + 7919).permutation(num_clients)[:count]] = True
    return mask


def make_profile(
    partition_id: int,
    num_clients: int,
    budgets: str,
    adv_fraction: float,
    seed: int,
    node_config: dict | None = None,
    sparse_fraction: float = 0.0,
) -> NodeProfile:
    """The profile of one client; a node config's ``budget``/``adversarial`` override the
    run-wide assignment (the node config is validated here: see ``splitmix/node_config.py``)."""
    node = validate_node_config({"partition-id": partition_id, **(node_config or {})}, num_clients)
    return profile_of_node(node, num_clients, budgets, adv_fraction, seed, sparse_fraction)


def profile_of_node(node: NodeConfig, num_clients: int, budgets: str, adv_fraction: float, seed: int, sparse_fraction: float = 0.0) -> NodeProfile:
    """The profile of a node whose (already validated) config is ``node``."""
    partition_id = node.partition_id
    budget = budget_of_client(partition_id, num_clients, parse_budgets(budgets)) if node.budget is None else node.budget
    if node.adversarial is None:
        adversarial = bool(adversarial_clients(num_clients, adv_fraction, seed)[partition_id])
    else:
        adversarial = node.adversarial
    if node.sparse is None:
        sparse = bool(sparse_clients(num_clients, sparse_fraction, seed)[partition_id])
    else:
        sparse = node.sparse
    return NodeProfile(partition_id, budget, adversarial, sparse)
