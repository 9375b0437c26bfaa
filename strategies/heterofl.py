"""HeteroFL (Diao et al., 2021): one network, nested width slices — the strategy, the method and its
client step, as the official code (``diaoenmao/HeteroFL-…``) defines it.

- A client of width w gets the leading w-fraction of the channels of every layer (the leading
  block of every tensor, ``models/slicing.py``), trains it, and sends it back.
- **Aggregation** (``combine``): every entry of the global model is averaged over exactly the
  clients whose slice holds it, **each client counting once** (the official ``combine`` adds
  the clients' values and divides by a per-entry count); entries no client held keep their
  value. A robust reducer (``aggregation = "median"`` …) replaces the mean.
- **Static BN**: no running statistics while training (``track_running_stats=False``); before
  each evaluation the server gathers them for every evaluated width from the clients' training
  splits (``models/bn_moments.py``) and stores them with the served model.
- **Scaler**: in training, the outputs of every hidden conv/linear layer are divided by the
  client's width w (identity at evaluation; ``models/scaler.py``).
- **Masked cross-entropy** (``masked-loss = true``, for label-skewed partitions): logits of the
  classes absent from a client's data are set to 0 in its loss (``clients/recipe.py``).

SHeteroFL (``sheterofl.py``), FedAvg (``fedavg.py``) and FedBN (``fedbn.py``) build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn

from models.blocks import StackedNet, norm_state_keys, recompute_bn_stats, set_route
from models.bn_moments import load_bn_stats
from models.scaler import attach_scaler
from models.slicing import slice_state
from models.splitmix import SplitMixSpec, is_adversarial_tensor
from splitmix.protocol import WIDTH, Instruction, NodeProfile
from splitmix.protocol.codec import record_bytes, to_record, to_tensors
from strategies.aggregation import Contribution, aggregate, leading_slice
from strategies.base import FederatedStrategy, RoundStats, TensorSpec
from strategies.registry import BN_STATS, LrSchedule, Method, State, register_method, width_tag

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
        count_clients: bool = False,
        extra_of: Callable[[NodeProfile, float], dict] | None = None,
    ) -> None:
        super().__init__(task_json, fraction_train, min_train_clients, seed, lr_at_round)
        self.spec = spec
        self.width_of = width_of
        self.local_keys = local_keys  # never sent, never overwritten (FedBN's BN entries)
        self.method = method  # the registered method whose client step trains the slices
        self.count_clients = count_clients  # HeteroFL: every client counts once in the mean
        self.extra_of = extra_of  # more instruction fields per client (SHeteroFL's slim widths)
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}
        self._state: dict[str, torch.Tensor] = {}
        self.widths_sent: dict[int, float] = {}

    def shapes(self, width: float) -> dict[str, tuple[int, ...]]:
        """Shapes of the width-w sub-network's federated tensors (cached per width)."""
        if width not in self._shapes:
            state = self.spec.build_width(width).state_dict()
            self._shapes[width] = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked") and k not in self.local_keys}
        return self._shapes[width]

    def payload(self, width: float) -> dict[str, torch.Tensor]:
        """The tensors a client of ``width`` is sent."""
        return slice_state(self._state, self.shapes(width))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current, self._sent, self.widths_sent = arrays, {}, {}
        self._state = to_tensors(arrays)
        stats = RoundStats()
        payloads: dict[float, tuple[ArrayRecord, dict[str, TensorSpec]]] = {}  # one record per width per round
        messages = []
        for profile in self.sample(lambda p: self.width_of(p) is not None):
            width = float(cast(float, self.width_of(profile)))  # sampled: it has a width
            if width not in payloads:
                tensors = self.payload(width)
                specs = {k: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
                payloads[width] = (to_record(tensors), specs)
            payload, specs = payloads[width]
            stats.bytes_down += record_bytes(payload)
            expected = {k: spec for k, spec in specs.items() if profile.adversarial or not is_adversarial_tensor(k)}
            self._sent[profile.node_id] = expected
            self.widths_sent[profile.node_id] = width
            extra = {WIDTH: width, **(self.extra_of(profile, width) if self.extra_of else {})}
            messages.append(self.train_message(profile, payload, server_round, self.method, extra))
        stats.sampled = len(messages)
        self.last_round = stats
        return messages

    def combine(self, contributions: list[Contribution]) -> ArrayRecord:
        """Each entry reduced (``aggregation``: mean, median, trimmed-mean) over exactly the clients
        whose slice (and sparse mask) holds it; entries nobody held keep their value. HeteroFL
        weighs every client equally; FedAvg and FedBN by their number of examples."""
        if self.count_clients:
            contributions = [(tensors, 1.0) for tensors, _ in contributions]
        return aggregate(self._current, contributions, self.aggregation, trim_fraction=self.trim_fraction, placement=leading_slice)


# --------------------------------------------------------------------------- the method
@functools.cache
def cached_slice_model(spec: SplitMixSpec, width: float, scaled: bool = False) -> StackedNet:
    """The width-w model a client trains (one per actor and width: clients reuse it); ``scaled``
    attaches HeteroFL's Scaler (outputs ÷ w in training)."""
    model = spec.build_width(width)
    if scaled:
        attach_scaler(model, width)
    return model


@register_method
class HeteroFL(Method):
    """Nested width slices: a client trains the widest slice its budget affords."""

    name = "heterofl"
    common_sparse_start = False  # slices of different widths cannot share one seeded mask
    bn_regime: ClassVar[str | None] = "static"
    count_clients = True  # the official combine: every client counts once
    scaler = True  # outputs ÷ width in training

    def initial_state(self, seed: int) -> State:
        torch.manual_seed(seed)
        state = self.spec.build_width(1.0).state_dict()
        return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def local_keys(self) -> frozenset[str]:
        return frozenset(norm_state_keys(self.spec.build_width(1.0))) if self.local_norms else frozenset()

    def width_of(self) -> WidthOf:
        return budget_width

    strategy_class: ClassVar[type[WidthSliceStrategy]] = WidthSliceStrategy

    def strategy_options(self) -> dict[str, Any]:
        """More keyword arguments of ``strategy_class`` (FedAvg: its model widths)."""
        return {}

    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> WidthSliceStrategy:
        return self.strategy_class(
            self.spec,
            task_json,
            fraction,
            min_clients,
            seed,
            lr_at,
            width_of=self.width_of(),
            local_keys=self.local_keys(),
            method=self.name,
            count_clients=self.count_clients,
            **self.strategy_options(),
        )

    def cost_model(self, width: float) -> StackedNet:
        return self.spec.build_width(width, track_stats=True)  # same params/MACs; runs on one input

    def single_unit_model(self) -> nn.Module:
        return self.spec.build_width(1.0)

    def width_state(self, state: State, width: float) -> State:
        """The global tensors of the width-``width`` model (its leading slices)."""
        return state

    def stats_models(self, state: State) -> dict[str, StackedNet]:
        """Static BN: one static model per evaluated width, holding that width's slice."""
        out = {}
        for width in self.widths():
            model = self.spec.build_width(width)
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            model.load_state_dict(slice_state(self.width_state(state, width), shapes), strict=False)
            out[width_tag(width)] = model
        return out

    def eval_model(self, state: State, width: float, robustness: float, calibration: torch.Tensor | None = None) -> StackedNet:
        model = self.spec.build_width(width, track_stats=True)
        own = self.width_state(state, width)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in own}
        missing, _ = model.load_state_dict(slice_state(own, shapes), strict=False)
        if self.needs_bn_stats:  # static BN: the statistics gathered from the clients' training data
            prefix = f"{BN_STATS}/{width_tag(width)}/"
            load_bn_stats(model, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        elif self.local_norms and calibration is not None:  # FedBN on the server: no client's norms
            recompute_bn_stats(model, calibration)
        elif any(not k.endswith("num_batches_tracked") for k in missing):
            raise KeyError(f"global state lacks {missing[:3]}")
        set_route(model, float(robustness))
        return model.eval()

    # ------------------------------------------------------------------ client step
    def client_model(self, received: State, instruction: Instruction, context: Any) -> tuple[StackedNet, list[str]]:
        width = float(instruction.extra[WIDTH])
        model = cached_slice_model(self.spec, width, self.scaler)
        state = dict(received)
        if self.local_norms:  # this node's own norms (fresh ones on its first round)
            kept = context.state.array_records.get(local_norms_record(width))
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
            width = float(instruction.extra[WIDTH])
            context.state[local_norms_record(width)] = to_record({k: v for k, v in trained.items() if k in norm_keys})
        return {k: v for k, v in trained.items() if k not in norm_keys and (profile.adversarial or not is_adversarial_tensor(k))}


def local_norms_record(width: float) -> str:
    """Context state record of FedBN's local normalisation entries of the width-w model."""
    return f"local-bn-{width_tag(width)}"


_NORM_INIT: dict[tuple[SplitMixSpec, float], State] = {}


def _initial_norm_state(spec: SplitMixSpec, width: float) -> State:
    """Freshly initialised norm entries (weight 1, bias 0, mean 0, var 1) for a node's first round."""
    key = (spec, width)
    if key not in _NORM_INIT:
        fresh = spec.build_width(width)
        keys = norm_state_keys(fresh)
        _NORM_INIT[key] = {k: v.clone() for k, v in fresh.state_dict().items() if k in keys}
    return _NORM_INIT[key]
