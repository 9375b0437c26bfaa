"""The Split-Mix strategy: assign bases by budget, send only those bases, average each base over
exactly the clients that trained it.

Base assignment: a client that affords k bases gets its first base from a shuffled cycle over all
N bases (as in the authors' code) and the k − 1 bases that follow it (mod N). Two departures,
both for exact evenness: the cycle is kept *per budget level* (the authors share one cycle across
all clients), and the other k − 1 bases form a window instead of a random draw. Split-Mix bases
are trained with separate losses, so which bases share a client does not change training; the
window only makes "every base is trained equally often by clients of every budget" hold exactly
after each full cycle instead of on average.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from models.splitmix import SplitMixSpec, is_adversarial_tensor, parse_base_key
from strategies.robust_aggregation import aggregate_record
from strategies.base import FederatedStrategy, RoundStats, TensorSpec


class BaseScheduler:
    """First base from a shuffled cycle per budget level, then the next k − 1 bases (mod N)."""

    def __init__(self, num_bases: int, rng: np.random.Generator) -> None:
        self.num_bases = num_bases
        self.rng = rng
        self._cycles: dict[float, list[int]] = {}

    def assign(self, k: int, group: float | None = None) -> list[int]:
        """k bases for one client; ``group`` (its budget level) picks the cycle (default: k)."""
        if not 1 <= k <= self.num_bases:
            raise ValueError(f"cannot assign {k} of {self.num_bases} bases")
        cycle = self._cycles.setdefault(k if group is None else group, [])
        if not cycle:
            cycle.extend(int(b) for b in self.rng.permutation(self.num_bases))
        first = cycle.pop()
        return [(first + j) % self.num_bases for j in range(k)]


def cosine_lr(base_lr: float, server_round: int, num_rounds: int) -> float:
    """Half-cosine decay over rounds (the authors' Digits schedule)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / max(num_rounds, 1)))


class SplitMixStrategy(FederatedStrategy):
    def __init__(
        self,
        spec: SplitMixSpec,
        task_json: str,
        fraction_train: float,
        min_train_clients: int,
        seed: int,
        lr_at_round: Callable[[int], float],
    ) -> None:
        super().__init__(task_json, fraction_train, min_train_clients, seed, lr_at_round)
        self.spec = spec
        self.scheduler = BaseScheduler(spec.num_bases, self.rng)
        self.assignments: dict[int, list[int]] = {}  # node -> bases, last round

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = arrays
        self._sent = {}
        self.assignments = {}
        stats = RoundStats()
        messages = []
        # Group the global tensors by base once per round; messages reuse the Array objects.
        by_base: dict[int, list[tuple[str, Array, TensorSpec, bool]]] = {}
        for key, array in arrays.items():
            index, name = parse_base_key(key)
            spec = TensorSpec(tuple(array.shape), str(array.dtype))
            by_base.setdefault(index, []).append((key, array, spec, is_adversarial_tensor(name)))
        for profile in self.sample():
            k = self.spec.bases_for_budget(profile.budget)
            if k < 1:
                stats.problems.append(f"node {profile.node_id}: budget {profile.budget} affords no base; skipped")
                continue
            bases = self.scheduler.assign(k, group=profile.budget)
            payload = ArrayRecord()
            expected: dict[str, TensorSpec] = {}
            for index in bases:
                for key, array, spec, adversarial_only in by_base[index]:
                    payload[key] = array
                    stats.bytes_down += len(array.data)
                    # A client that does not train adversarially never touches (and does not
                    # return) the adversarial-BN tensors.
                    if profile.adversarial or not adversarial_only:
                        expected[key] = spec
            self.assignments[profile.node_id] = bases
            self._sent[profile.node_id] = expected
            messages.append(self.train_message(profile, payload, server_round, {"method": "splitmix", "bases": bases}))
        stats.sampled = len(messages)
        self.last_round = stats
        return messages

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cycles": [[group, list(cycle)] for group, cycle in self.scheduler._cycles.items()]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scheduler._cycles = {group: [int(b) for b in cycle] for group, cycle in state["cycles"]}

    def combine(self, contributions: list[tuple[dict, float]]) -> ArrayRecord:
        """Each tensor averaged over the clients that returned it (so each base over exactly the
        clients that trained it); untouched tensors keep their value. ``aggregation`` = median or
        trimmed-mean replaces the example-weighted mean per coordinate (hostile clients)."""
        return aggregate_record(self.aggregation, contributions, self._current, trim_fraction=self.trim_fraction)
