"""HeteroFL: one network, nested width slices — the strategy, the method and its client step.

A client of width w gets the leading w-fraction of the channels of every layer (the leading block
of every tensor, ``models/slicing.py``), trains it, and sends it back; each entry of the global
model is reduced (example-weighted mean, or a robust rule: ``strategies/aggregation.py`` with the
``leading_slice`` placement) over exactly the clients whose slice holds it, and entries no client
held keep their value. SHeteroFL (``sheterofl.py``), FedAvg (``fedavg.py``) and FedBN
(``fedbn.py``) subclass :class:`HeteroFL`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn

from models.blocks import StackedNet, norm_state_keys, recompute_bn_stats, set_route
from models.slicing import slice_state
from models.splitmix import SplitMixSpec, is_adversarial_tensor
from splitmix.protocol import WIDTH, Instruction, NodeProfile
from splitmix.protocol.codec import encode, to_record, to_tensors
from strategies.aggregation import Contribution, aggregate, leading_slice
from strategies.base import FederatedStrategy, RoundStats, TensorSpec
from strategies.registry import LrSchedule, Method, State, register_method

WidthOf = Callable[[NodeProfile], "float | None"]


def budget_width(profile: NodeProfile) -> float:
    """HeteroFL: a client trains the widest slice its budget affords."""
    return profile.budget


class WidthSliceStrategy(FederatedStrategy):
    def __init__(
        self,
        spec: SplitMixSpec,
        task_json: str,
        fraction_train: float,
        min_train_clients: int,
        seed: int,
        lr_at_round: Callable[[int], float],
        width_of: WidthOf = budget_width,
        local_keys: frozenset[str] = frozenset(),
        method: str = "heterofl",
    ) -> None:
        super().__init__(task_json, fraction_train, min_train_clients, seed, lr_at_round)
        self.spec = spec
        self.width_of = width_of
        self.local_keys = local_keys  # never sent, never overwritten (FedBN's BN entries)
        self.method = method  # the registered method whose client step trains the slices
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}
        self._state: dict[str, torch.Tensor] = {}
        self.widths_sent: dict[int, float] = {}

    def shapes(self, width: float) -> dict[str, tuple[int, ...]]:
        """Shapes of the width-w sub-network's federated tensors (cached per width)."""
        if width not in self._shapes:
            state = self.spec.build_width(width).state_dict()
            self._shapes[width] = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked") and k not in self.local_keys}
        return self._shapes[width]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current, self._sent, self.widths_sent = arrays, {}, {}
        self._state = to_tensors(arrays)
        stats = RoundStats()
        payloads: dict[float, dict[str, Array]] = {}  # one encoding per width per round
        messages = []
        for profile in self.sample(lambda p: self.width_of(p) is not None):
            width = float(cast(float, self.width_of(profile)))  # sampled: it has a width
            if width not in payloads:
                payloads[width] = {k: encode(t) for k, t in slice_state(self._state, self.shapes(width)).items()}
            payload = ArrayRecord()
            expected: dict[str, TensorSpec] = {}
            for key, array in payloads[width].items():
                payload[key] = array
                stats.bytes_down += len(array.data)
                if profile.adversarial or not is_adversarial_tensor(key):
                    expected[key] = TensorSpec(tuple(array.shape), str(array.dtype))
            self._sent[profile.node_id] = expected
            self.widths_sent[profile.node_id] = width
            messages.append(self.train_message(profile, payload, server_round, self.method, {WIDTH: width}))
        stats.sampled = len(messages)
        self.last_round = stats
        return messages

    def combine(self, contributions: list[Contribution]) -> ArrayRecord:
        """Each entry reduced (``aggregation``: mean, median, trimmed-mean) over exactly the clients
        whose slice (and sparse mask) holds it; entries nobody held keep their value."""
        return aggregate(self._current, contributions, self.aggregation, trim_fraction=self.trim_fraction, placement=leading_slice)


# --------------------------------------------------------------------------- the method
@functools.cache
def cached_slice_model(spec: SplitMixSpec, width: float) -> StackedNet:
    """The width-w model a client trains (one per actor and width: clients reuse it)."""
    return spec.build_width(width)


@register_method
class HeteroFL(Method):
    """Nested width slices: a client trains the widest slice its budget affords."""

    name = "heterofl"
    common_sparse_start = False  # slices of different widths cannot share one seeded mask
    recompute_bn = False  # re-estimate BN statistics on data before evaluating
    local_norms = False  # FedBN: normalisation layers stay on the clients

    def initial_state(self, seed: int) -> State:
        torch.manual_seed(seed)
        state = self.spec.build_width(1.0).state_dict()
        return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def local_keys(self) -> frozenset[str]:
        return frozenset(norm_state_keys(self.spec.build_width(1.0))) if self.local_norms else frozenset()

    def width_of(self) -> WidthOf:
        return budget_width

    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> WidthSliceStrategy:
        return WidthSliceStrategy(
            self.spec, task_json, fraction, min_clients, seed, lr_at, width_of=self.width_of(), local_keys=self.local_keys(), method=self.name
        )

    def cost_model(self, width: float) -> StackedNet:
        return self.spec.build_width(width, track_stats=True)  # same params/MACs; runs on one input

    def single_unit_model(self) -> nn.Module:
        return self.spec.build_width(1.0)

    def eval_model(self, state: State, width: float, robustness: float, calibration: torch.Tensor) -> StackedNet:
        model = self.spec.build_width(width, track_stats=True)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in state}
        missing, _ = model.load_state_dict(slice_state(state, shapes), strict=False)
        if self.recompute_bn or not self.spec.track_stats:
            recompute_bn_stats(model, calibration)
        elif any(not k.endswith("num_batches_tracked") for k in missing):
            raise KeyError(f"global state lacks {missing[:3]}")
        set_route(model, float(robustness))
        return model.eval()

    # ------------------------------------------------------------------ client step
    def client_model(self, received: State, instruction: Instruction, context: Any) -> tuple[StackedNet, list[str]]:
        width = float(instruction.extra[WIDTH])
        model = cached_slice_model(self.spec, width)
        state = dict(received)
        if self.local_norms:  # this node's own norms (fresh ones on its first round)
            kept = context.state.array_records.get(LOCAL_NORMS)
            state.update(to_tensors(kept) if kept is not None else _initial_norm_state(self.spec, width))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise KeyError(f"width-{width} state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model, ["width"]

    def client_unit_builder(self, instruction: Instruction) -> Callable[[], nn.Module]:
        width = float(instruction.extra[WIDTH])
        return lambda: self.spec.build_width(width)

    def client_tensors(self, model: StackedNet, instruction: Instruction, profile: NodeProfile, context: Any) -> State:
        trained = {k: v.cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        norm_keys = norm_state_keys(model) if self.local_norms else set()
        if self.local_norms:
            context.state[LOCAL_NORMS] = to_record({k: v for k, v in trained.items() if k in norm_keys})
        return {k: v for k, v in trained.items() if k not in norm_keys and (profile.adversarial or not is_adversarial_tensor(k))}


LOCAL_NORMS = "local-bn"  # Context state record of FedBN's local normalisation entries
_NORM_INIT: dict[tuple[SplitMixSpec, float], State] = {}


def _initial_norm_state(spec: SplitMixSpec, width: float) -> State:
    """Freshly initialised norm entries (weight 1, bias 0, mean 0, var 1) for a node's first round."""
    key = (spec, width)
    if key not in _NORM_INIT:
        fresh = spec.build_width(width)
        keys = norm_state_keys(fresh)
        _NORM_INIT[key] = {k: v.clone() for k, v in fresh.state_dict().items() if k in keys}
    return _NORM_INIT[key]
