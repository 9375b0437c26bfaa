"""The methods the harness can run, behind one interface.

A method says what the global model is (``initial_state``), which strategy trains it
(``strategy``), which widths it can serve, and how to build the model the server evaluates at a
width and robustness λ. The round loop (``server/federation.py``) and the evaluator only talk to
this interface, so every method runs with the same clients, partitions, budgets, seeds, training
budget and evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Callable

import torch

from models.blocks import StackedNet, norm_state_keys, recompute_bn_stats, set_route
from models.slicing import slice_state
from models.splitmix import SplitMixSpec, build_mixture, init_global_state, load_stacked, select_bases
from strategies.base import FederatedStrategy
from strategies.fedavg import full_width
from strategies.heterofl import WidthSliceStrategy, budget_width
from strategies.splitmix import SplitMixStrategy

LrSchedule = Callable[[int], float]


class Method(ABC):
    name: str = ""

    def __init__(self, spec: SplitMixSpec, fedavg_all_clients: bool = False) -> None:
        self.spec = spec
        self.fedavg_all_clients = fedavg_all_clients

    @abstractmethod
    def initial_state(self, seed: int) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> FederatedStrategy: ...

    def widths(self) -> list[float]:
        """The widths this method can serve (the Split-Mix grid k·r by default)."""
        return self.spec.widths()

    @abstractmethod
    def cost_model(self, width: float) -> StackedNet:
        """A model with the parameters and MACs of what is served at ``width``."""

    @abstractmethod
    def eval_model(self, state: dict[str, torch.Tensor], width: float, robustness: float, calibration: torch.Tensor) -> StackedNet:
        """The model served at ``width`` and λ, in eval mode."""

    @torch.no_grad()
    def clean_accuracy(self, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, robustness: float) -> list[float]:
        """Accuracy of the served model at every width in ``widths()`` (one model per width)."""
        return [float((self.eval_model(state, w, robustness, x).to(x.device)(x).argmax(-1) == y).float().mean()) for w in self.widths()]


class SplitMix(Method):
    name = "splitmix"

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        return init_global_state(self.spec, seed)

    def strategy(self, task_json, fraction, min_clients, seed, lr_at):
        return SplitMixStrategy(self.spec, task_json, fraction, min_clients, seed, lr_at)

    def cost_model(self, width: float) -> StackedNet:
        # same params/MACs with or without running statistics; tracked BN runs on one input
        return replace(self.spec, track_stats=True).build(self.spec.bases_for_width(width))

    def _served(self, state, num_bases: int, robustness: float, calibration: torch.Tensor) -> StackedNet:
        """The first ``num_bases`` bases mixed; with static BN, statistics re-estimated on data."""
        indices = list(range(num_bases))
        if self.spec.track_stats:
            return build_mixture(self.spec, state, indices, robustness)
        model = replace(self.spec, track_stats=True).build(num_bases)
        load_stacked(model, select_bases(state, indices), allow_missing_stats=True)
        recompute_bn_stats(model, calibration)
        set_route(model, float(robustness))
        return model.eval()

    def eval_model(self, state, width, robustness, calibration):
        return self._served(state, self.spec.bases_for_width(width), robustness, calibration)

    @torch.no_grad()
    def base_accuracy(self, state, x, y) -> list[float]:
        """Each base's own accuracy (λ = 0): what `query --select best` ranks bases by."""
        logits = self._served(state, self.spec.num_bases, 0.0, x).to(x.device).forward_bases(x)
        return (logits.argmax(-1) == y.unsqueeze(1)).float().mean(0).tolist()

    @torch.no_grad()
    def clean_accuracy(self, state, x, y, robustness):
        """All widths from one pass: every base's logits once, width k = mean of the first k
        (per-channel BN statistics are per base, so re-estimating them on all N bases at once
        gives each base the same statistics as in any smaller mixture)."""
        model = self._served(state, self.spec.num_bases, robustness, x).to(x.device)
        logits = model.forward_bases(x)  # (B, N, C)
        n = self.spec.num_bases
        mixed = logits.cumsum(dim=1) / torch.arange(1, n + 1, device=x.device).view(1, n, 1)
        return (mixed.argmax(-1) == y.unsqueeze(1)).float().mean(0).tolist()


class HeteroFL(Method):
    name = "heterofl"
    recompute_bn = False  # re-estimate BN statistics on data before evaluating

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        state = self.spec.build_width(1.0).state_dict()
        return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def local_keys(self) -> frozenset[str]:
        return frozenset()

    def width_of(self):
        return budget_width

    def strategy(self, task_json, fraction, min_clients, seed, lr_at):
        return WidthSliceStrategy(
            self.spec, task_json, fraction, min_clients, seed, lr_at, width_of=self.width_of(), local_keys=self.local_keys()
        )

    def cost_model(self, width: float) -> StackedNet:
        return self.spec.build_width(width, track_stats=True)  # same params/MACs; runs on one input

    def eval_model(self, state, width, robustness, calibration):
        model = self.spec.build_width(width, track_stats=True)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in state}
        missing, _ = model.load_state_dict(slice_state(state, shapes), strict=False)
        if self.recompute_bn or not self.spec.track_stats:
            recompute_bn_stats(model, calibration)
        elif any(not k.endswith("num_batches_tracked") for k in missing):
            raise KeyError(f"global state lacks {missing[:3]}")
        set_route(model, float(robustness))
        return model.eval()


class SHeteroFL(HeteroFL):
    """HeteroFL with static BN: no running statistics while training; the server re-estimates
    them on the evaluation inputs (unlabelled) before it evaluates any width."""

    name = "sheterofl"
    recompute_bn = True

    def __init__(self, spec: SplitMixSpec, fedavg_all_clients: bool = False) -> None:
        super().__init__(replace(spec, track_stats=False), fedavg_all_clients)


class FedAvg(HeteroFL):
    name = "fedavg"

    def widths(self) -> list[float]:
        return [1.0]

    def width_of(self):
        return full_width(self.fedavg_all_clients)


class FedBN(FedAvg):
    """FedAvg with client-local BN. The server never holds the clients' BN, so it evaluates the
    shared weights with BN statistics re-estimated on the evaluation inputs and the BN affine
    parameters at their initial values."""

    name = "fedbn"
    recompute_bn = True

    def local_keys(self) -> frozenset[str]:
        return frozenset(norm_state_keys(self.spec.build_width(1.0)))


METHODS: dict[str, type[Method]] = {m.name: m for m in (SplitMix, HeteroFL, SHeteroFL, FedAvg, FedBN)}


def make_method(name: str, spec: SplitMixSpec, fedavg_all_clients: bool = False) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; allowed: {', '.join(METHODS)}")
    return METHODS[name](spec, fedavg_all_clients)
