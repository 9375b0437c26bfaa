"""A SuperNode's ``--node-config``: which partition it holds and, optionally, its profile.

Deployed nodes describe themselves with ``--node-config "partition-id=0 num-partitions=4
budget=0.5 adversarial=true"``. A typo there would otherwise surface as a failed round long after
start, so the same check runs in three places: ``splitmix supernode`` (before the SuperNode
process starts), ``splitmix deploy local`` (before anything starts) and the ClientApp (which
answers the server's profile query with the message instead of a profile).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

ALLOWED_KEYS = ("partition-id", "num-partitions", "budget", "adversarial", "sparse")


class NodeConfigError(ValueError):
    """The node config is invalid; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class NodeConfig:
    partition_id: int
    num_partitions: int | None = None
    budget: float | None = None  # a width in (0, 1]; None: the run's budget levels decide
    adversarial: bool | None = None  # None: the run's adv-fraction decides
    sparse: bool | None = None  # None: the run's sparse-fraction decides (if sparse-method is set)


BUDGET_FORMS = 'a width in (0, 1] as a number (0.5 or "0.5"), a fraction string ("1/2") or a budget level string ("2" = 1/2, "8d3" = 3/8)'


def parse_budget(value: Any) -> float:
    """A width in (0, 1] from a number (``0.5``), a fraction (``"1/2"``) or a level (``"2"``).

    Level strings follow the run config's ``budgets`` notation (``N`` is 1/N, ``NdM`` is M/N).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise NodeConfigError(f"node-config budget={value!r} is not a budget; allowed: {BUDGET_FORMS}")
    try:
        if isinstance(value, str) and ("/" in value or "." in value):
            width = float(Fraction(value))
        elif isinstance(value, str):
            den, _, num = value.partition("d")
            width = float(Fraction(int(num or 1), int(den)))
        else:
            width = float(value)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise NodeConfigError(f"node-config budget={value!r} is not a budget; allowed: {BUDGET_FORMS}") from None
    if not 0.0 < width <= 1.0:
        raise NodeConfigError(f"node-config budget={value!r} is outside (0, 1]; allowed: {BUDGET_FORMS}")
    return width


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise NodeConfigError(f"node-config {key}={value!r} is not an integer; allowed: an integer >= {minimum}")
    try:
        number = int(value)
    except (ValueError, OverflowError):
        raise NodeConfigError(f"node-config {key}={value!r} is not an integer; allowed: an integer >= {minimum}") from None
    if number != float(value) or number < minimum:
        raise NodeConfigError(f"node-config {key}={value!r} is not allowed; allowed: an integer >= {minimum}")
    return number


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise NodeConfigError(f"node-config {key}={value!r} is not allowed; allowed: true or false")


def validate_node_config(config: Mapping[str, Any], num_clients: int | None = None) -> NodeConfig:
    """Check a node config (as Flower parses it) and return it typed.

    ``num_clients`` (the run's ``num-clients``), when known, bounds ``partition-id`` and must
    equal ``num-partitions`` if the node states one.
    """
    unknown = sorted(set(config) - set(ALLOWED_KEYS))
    if unknown:
        raise NodeConfigError(f"node-config has unknown key(s) {unknown}; allowed keys: {list(ALLOWED_KEYS)}")
    if "partition-id" not in config:
        raise NodeConfigError("node-config has no 'partition-id'; start the SuperNode with --node-config \"partition-id=<i> ...\"")
    partition = _int("partition-id", config["partition-id"], 0)
    num_partitions = _int("num-partitions", config["num-partitions"], 1) if "num-partitions" in config else None
    if num_partitions is not None and partition >= num_partitions:
        raise NodeConfigError(
            f"node-config partition-id={partition} is not allowed with num-partitions={num_partitions}; allowed: 0..{num_partitions - 1}"
        )
    if num_clients is not None:
        if num_partitions is not None and num_partitions != num_clients:
            raise NodeConfigError(
                f"node-config num-partitions={num_partitions} differs from the run's num-clients={num_clients}; allowed: {num_clients}"
            )
        if partition >= num_clients:
            raise NodeConfigError(
                f"node-config partition-id={partition} is not allowed for a run with num-clients={num_clients}; allowed: 0..{num_clients - 1}"
            )
    budget = parse_budget(config["budget"]) if "budget" in config else None
    adversarial = _bool("adversarial", config["adversarial"]) if "adversarial" in config else None
    sparse = _bool("sparse", config["sparse"]) if "sparse" in config else None
    return NodeConfig(partition, num_partitions, budget, adversarial, sparse)


def parse_node_config_string(text: str) -> dict[str, Any]:
    """Parse ``--node-config`` text the way Flower does (space-separated TOML ``key=value``)."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except Exception as err:  # Flower raises ValueError or tomli's TOMLDecodeError
        raise NodeConfigError(f"--node-config {text!r} is not a list of key=value TOML pairs: {err}") from None
