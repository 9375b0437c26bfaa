"""What a federated method is, and the registry of methods.

A method (Split-Mix, HeteroFL, SHeteroFL, FedAvg, FedBN: one module each in ``strategies/``)
says what the global model is (``initial_state``), which strategy trains it (``strategy``: who
gets which tensors, how replies are aggregated), how a client turns the received tensors into the
model it trains and back (``client_model`` / ``client_tensors``: the client step), which widths it
serves and how the server builds the model it evaluates at a width and robustness λ
(``eval_model``). It is registered with :func:`register_method`; the round loop, the ClientApp,
the evaluator and the query API only talk to this interface, so every method runs with the same
clients, partitions, budgets, seeds, training budget and evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from models.blocks import StackedNet
from models.splitmix import SplitMixSpec

if TYPE_CHECKING:
    from splitmix.protocol import Instruction, NodeProfile
    from strategies.base import FederatedStrategy
    from techniques.base import ClientRound, RoundHooks

LrSchedule = Callable[[int], float]
State = dict[str, torch.Tensor]

METHODS: dict[str, type[Method]] = {}

BN_STATS = "bn-stats"  # served-state prefix of static BN statistics: bn-stats/<tag>/<bn path>.running_mean


def width_tag(width: float) -> str:
    """``w0.125``: a width as a key part (state prefixes, Context records, BN statistics)."""
    return f"w{round(width, 6):g}"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (config key ``method``)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' has no name or is registered twice")
    METHODS[cls.name] = cls
    return cls


class Method(ABC):
    name: ClassVar[str] = ""
    common_sparse_start: ClassVar[bool] = True  # sparse clients can start on one common mask per unit
    # Batch-norm statistics: "static" (none in training, gathered from the clients' training data
    # before evaluation: HeteroFL), "tracked" (running statistics: FedBN) or None (the run's bn-stats).
    bn_regime: ClassVar[str | None] = None
    local_norms: ClassVar[bool] = False  # normalisation layers stay on the clients (FedBN)

    def __init__(self, spec: SplitMixSpec, fedavg_all_clients: bool = False, budgets: Sequence[float] = ()) -> None:
        if self.bn_regime is not None:
            spec = replace(spec, track_stats=self.bn_regime == "tracked")
        self.spec = spec
        self.fedavg_all_clients = fedavg_all_clients
        self.budgets = sorted(set(budgets))  # the run's budget levels (widths clients can afford)

    # ------------------------------------------------------------------ server side
    @abstractmethod
    def initial_state(self, seed: int) -> State: ...

    @abstractmethod
    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> FederatedStrategy: ...

    def stateful_reason(self) -> str | None:
        """Why this method's clients keep state across rounds (None: they do not)."""
        return None

    def widths(self) -> list[float]:
        """The widths this method can serve (the Split-Mix grid k·r by default)."""
        return self.spec.widths()

    def respects_budgets(self, width: float) -> bool:
        """Whether the width-``width`` model was trained within every client's budget."""
        return True

    @abstractmethod
    def cost_model(self, width: float) -> StackedNet:
        """A model with the parameters and MACs of what is served at ``width``."""

    @abstractmethod
    def eval_model(self, state: State, width: float, robustness: float, calibration: torch.Tensor | None = None) -> StackedNet:
        """The model served at ``width`` and λ, in eval mode (``calibration``: training inputs for
        a method whose server has no BN statistics of its own, FedBN)."""

    @abstractmethod
    def single_unit_model(self) -> nn.Module:
        """A model of one training unit (one base, or the full-width network): the shape that
        per-unit techniques (structured masks) work on."""

    # ------------------------------------------------------------------ static BN
    @property
    def needs_bn_stats(self) -> bool:
        """Whether evaluation needs BN statistics gathered from the clients' training data."""
        return not self.spec.track_stats and not self.local_norms

    def stats_models(self, state: State) -> dict[str, StackedNet]:
        """Static-BN models (holding ``state``) whose BN input moments the clients compute on
        their training splits, by tag (``models/bn_moments.py``)."""
        return {}

    def with_bn_stats(self, state: State, stats: dict[str, State]) -> State:
        """The served state with the gathered statistics (``{tag: {bn path.running_mean: …}}``)."""
        return {**state, **{f"{BN_STATS}/{tag}/{key}": value for tag, table in stats.items() for key, value in table.items()}}

    # ------------------------------------------------------------------ client-side evaluation
    def client_eval_state(self, state: State, width: float, context: Any) -> State | None:
        """The state a client evaluates at ``width`` (FedBN: with its own norms); None: this
        client has no model at that width."""
        return state

    selectable_bases: ClassVar[bool] = False  # a width is made of bases a query may choose (Split-Mix)

    @property
    def mixes_on_demand(self) -> bool:
        """Whether any choice of bases can be served without data (no BN re-estimation)."""
        return False

    def served_model(self, state: State, width: float, robustness: float, bases: list[int], calibration: Callable[[], torch.Tensor]) -> StackedNet:
        """The model a query serves: by default the evaluated one (``calibration()`` gives inputs
        for BN statistics, asked only when the method needs them)."""
        return self.eval_model(state, width, robustness, calibration() if self.local_norms else None)

    @torch.no_grad()
    def clean_accuracy(
        self, state: State, x: torch.Tensor, y: torch.Tensor, robustness: float, calibration: torch.Tensor | None = None
    ) -> list[float]:
        """Accuracy of the served model at every width in ``widths()`` (one model per width)."""
        return [float((self.eval_model(state, w, robustness, calibration).to(x.device)(x).argmax(-1) == y).float().mean()) for w in self.widths()]

    # ------------------------------------------------------------------ client step
    @abstractmethod
    def client_model(self, received: State, instruction: Instruction, context: Any) -> tuple[StackedNet, list[str]]:
        """The model a client trains, holding the received tensors, and its units (state keys of
        its stacked chunks: ``["base3", "base4"]`` or ``["width"]``)."""

    @abstractmethod
    def client_tensors(self, model: StackedNet, instruction: Instruction, profile: NodeProfile, context: Any) -> State:
        """The trained tensors the client sends back (and what it keeps, e.g. FedBN's norms)."""

    def client_unit_builder(self, instruction: Instruction) -> Callable[[], nn.Module]:
        """Builds one unit's model on the client (per-unit techniques)."""
        return self.single_unit_model

    def client_hooks(self, rnd: ClientRound, instruction: Instruction) -> list[RoundHooks]:
        """The method's own hooks into local training (SHeteroFL's slimmable training)."""
        return []

    def client_jobs(self, received: State, instruction: Instruction) -> list[tuple[str, State, Instruction]]:
        """The models a client trains this round, as (state-key prefix, tensors, instruction):
        one by default; FedAvg one per width it was sent."""
        return [("", received, instruction)]


def method_class(name: str) -> type[Method]:
    import strategies  # noqa: F401  (registers every method)

    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, spec: SplitMixSpec, fedavg_all_clients: bool = False, budgets: Sequence[float] = ()) -> Method:
    return method_class(name)(spec, fedavg_all_clients, budgets)
