"""Split-Mix: the strategy (assign bases by budget, send only those bases, reduce each base over
exactly the clients that trained it), the method (initial bases, served mixtures) and its client
step (stack the received bases, train, split them back).

Base assignment: a client that affords k bases gets its first base from a shuffled cycle over all
N bases (as in the authors' code) and the k − 1 bases that follow it (mod N). Two departures,
both for exact evenness: the cycle is kept *per budget level* (the authors share one cycle across
all clients), and the other k − 1 bases form a window instead of a random draw. Split-Mix bases
are trained with separate losses, so which bases share a client does not change training; the
window only makes "every base is trained equally often by clients of every budget" hold exactly
after each full cycle instead of on average.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn

from models.blocks import StackedNet
from models.splitmix import (
    SplitMixSpec,
    base_key,
    build_mixture,
    init_global_state,
    is_adversarial_tensor,
    load_stacked,
    parse_base_key,
    select_bases,
    split_stacked_state,
)
from splitmix.protocol import BASES, Instruction, NodeProfile
from splitmix.protocol.codec import record_bytes, to_record, unpack
from strategies.aggregation import Contribution, aggregate
from strategies.base import FederatedStrategy, RoundStats, TensorSpec
from strategies.registry import LrSchedule, Method, State, register_method


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
        # Group the global tensors (views of the packed global record) by base once per round.
        by_base: dict[int, list[tuple[str, np.ndarray, TensorSpec, bool]]] = {}
        for key, value in unpack(arrays).items():
            index, name = parse_base_key(key)
            spec = TensorSpec(tuple(value.shape), value.dtype.name)
            by_base.setdefault(index, []).append((key, value, spec, is_adversarial_tensor(name)))
        payloads: dict[tuple[int, ...], ArrayRecord] = {}  # nodes given the same bases share one record
        for profile in self.sample():
            k = self.spec.bases_for_budget(profile.budget)
            if k < 1:
                stats.problems.append(f"node {profile.node_id}: budget {profile.budget} affords no base; skipped")
                continue
            bases = self.scheduler.assign(k, group=profile.budget)
            if tuple(bases) not in payloads:
                payloads[tuple(bases)] = to_record({key: value for index in bases for key, value, _, _ in by_base[index]})
            payload = payloads[tuple(bases)]
            stats.bytes_down += record_bytes(payload)
            # A client that does not train adversarially never touches (and does not return)
            # the adversarial-BN tensors.
            self._sent[profile.node_id] = {
                key: spec for index in bases for key, _, spec, adversarial_only in by_base[index] if profile.adversarial or not adversarial_only
            }
            self.assignments[profile.node_id] = bases
            messages.append(self.train_message(profile, payload, server_round, SplitMix.name, {BASES: bases}))
        stats.sampled = len(messages)
        self.last_round = stats
        return messages

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cycles": [[group, list(cycle)] for group, cycle in self.scheduler._cycles.items()]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scheduler._cycles = {group: [int(b) for b in cycle] for group, cycle in state["cycles"]}

    def combine(self, contributions: list[Contribution]) -> ArrayRecord:
        """Each tensor averaged over the clients that returned it (so each base over exactly the
        clients that trained it); untouched tensors keep their value. ``aggregation`` = median or
        trimmed-mean replaces the example-weighted mean per coordinate (hostile clients)."""
        return aggregate(self._current, contributions, self.aggregation, trim_fraction=self.trim_fraction)


# --------------------------------------------------------------------------- the method
@functools.cache
def cached_stack(spec: SplitMixSpec, num_bases: int) -> StackedNet:
    """The k-base stacked model a client trains (one per actor and k: clients reuse it)."""
    return spec.build(num_bases)


@register_method
class SplitMix(Method):
    """Split-Mix: N = 1/r base sub-networks, each client trains as many as its budget affords,
    each base averaged over exactly the clients that trained it; any width k·r is served by
    mixing (averaging the logits of) the first k bases."""

    name = "splitmix"

    def initial_state(self, seed: int) -> State:
        return init_global_state(self.spec, seed)

    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> SplitMixStrategy:
        return SplitMixStrategy(self.spec, task_json, fraction, min_clients, seed, lr_at)

    def cost_model(self, width: float) -> StackedNet:
        # same params/MACs with or without running statistics; tracked BN runs on one input
        return replace(self.spec, track_stats=True).build(self.spec.bases_for_width(width))

    def single_unit_model(self) -> nn.Module:
        return self.spec.build(1)

    def _served(self, state: State, num_bases: int, robustness: float) -> StackedNet:
        """The first ``num_bases`` bases mixed. Static BN: the state carries the statistics the
        clients gathered on their training data (:meth:`with_bn_stats`)."""
        indices = list(range(num_bases))
        if not self.spec.track_stats and f"base0.{_first_bn(self.spec)}.running_mean" not in state:
            raise KeyError("static BN: the served state has no BN statistics (gather them from the clients first)")
        return build_mixture(replace(self.spec, track_stats=True), state, indices, robustness, allow_missing_stats=not self.spec.track_stats)

    def eval_model(self, state: State, width: float, robustness: float, calibration: torch.Tensor | None = None) -> StackedNet:
        return self._served(state, self.spec.bases_for_width(width), robustness)

    def stats_models(self, state: State) -> dict[str, StackedNet]:
        """Static BN: all N bases stacked (each base's BN channels are its own, so one pass gives
        every base the statistics it has in any mixture)."""
        n = self.spec.num_bases
        model = self.spec.build(n)
        load_stacked(model, select_bases(state, list(range(n))), allow_missing_stats=True)
        return {"bases": model}

    def with_bn_stats(self, state: State, stats: dict[str, State]) -> State:
        """Each base's statistics under its own keys (``base3.bn1.running_mean``), as tracked BN."""
        if "bases" not in stats:
            return state
        n = self.spec.num_bases
        per_base = split_stacked_state(stats["bases"], n)
        return {**state, **{base_key(i, name): tensor for i, table in enumerate(per_base) for name, tensor in table.items()}}

    selectable_bases = True

    @property
    def mixes_on_demand(self) -> bool:
        return True  # every base carries its own statistics (tracked, or gathered for static BN)

    def served_model(self, state: State, width: float, robustness: float, bases: list[int], calibration: Callable[[], torch.Tensor]) -> StackedNet:
        """Any k bases mixed on demand."""
        return build_mixture(replace(self.spec, track_stats=True), state, bases, robustness, allow_missing_stats=not self.spec.track_stats)

    @torch.no_grad()
    def base_accuracy(self, state: State, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Each base's own accuracy (λ = 0): what `query --select best` ranks bases by."""
        logits = self._served(state, self.spec.num_bases, 0.0).to(x.device).forward_bases(x)
        return (logits.argmax(-1) == y.unsqueeze(1)).float().mean(0).tolist()

    @torch.no_grad()
    def clean_accuracy(
        self, state: State, x: torch.Tensor, y: torch.Tensor, robustness: float, calibration: torch.Tensor | None = None
    ) -> list[float]:
        """All widths from one pass: every base's logits once, width k = mean of the first k
        (per-channel BN statistics are per base, so re-estimating them on all N bases at once
        gives each base the same statistics as in any smaller mixture)."""
        model = self._served(state, self.spec.num_bases, robustness).to(x.device)
        logits = model.forward_bases(x)  # (B, N, C)
        n = self.spec.num_bases
        mixed = logits.cumsum(dim=1) / torch.arange(1, n + 1, device=x.device).view(1, n, 1)
        return (mixed.argmax(-1) == y.unsqueeze(1)).float().mean(0).tolist()

    # ------------------------------------------------------------------ client step
    def client_model(self, received: State, instruction: Instruction, context: Any) -> tuple[StackedNet, list[str]]:
        """The sent bases stacked, in the order the server listed them."""
        indices = [int(i) for i in instruction.extra[BASES]]
        model = load_stacked(cached_stack(self.spec, len(indices)), select_bases(received, indices))
        return model, [f"base{i}" for i in indices]

    def client_tensors(self, model: StackedNet, instruction: Instruction, profile: NodeProfile, context: Any) -> State:
        """Each trained base under its global keys; a client that does not train adversarially
        leaves out the adversarial-BN tensors it never touched."""
        indices = [int(i) for i in instruction.extra[BASES]]
        trained = split_stacked_state(model.state_dict(), len(indices))
        return {
            base_key(index, name): tensor.cpu()
            for index, state in zip(indices, trained)
            for name, tensor in state.items()
            if profile.adversarial or not is_adversarial_tensor(name)
        }


@functools.cache
def _first_bn(spec: SplitMixSpec) -> str:
    """Module path of the first batch norm of a base (to test a state for statistics)."""
    model = replace(spec, track_stats=True).build(1)
    return next(name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
