"""FedAvg as the Split-Mix paper runs it: **one independent model per width**, each trained by
FedAvg with every client whose budget affords that width (``fedavg-clients = "capable"``), or,
labelled as breaking the budgets, with every client (``"all"``: the variant the paper greys
out). The widths are the run's budget levels (``budgets``), so only the narrowest one — the
smallest budget — respects every client's budget when all clients train it.

The global state holds every width's model under a ``w<width>/`` prefix. A client gets the
models of every width it trains in one message and trains them one after the other (one
optimizer each: the same as one FedAvg run per width); each model is the example-weighted mean
over its trainers. Batch-norm statistics follow the run's ``bn-stats`` (tracked by default).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from models.blocks import StackedNet, norm_state_keys
from splitmix.protocol import WIDTH, Instruction, NodeProfile
from strategies.heterofl import HeteroFL, WidthOf, WidthSliceStrategy
from strategies.registry import State, register_method, width_tag


class PerWidthStrategy(WidthSliceStrategy):
    """Sends a client the whole model of every width up to its own (its norms left out when
    they stay local)."""

    def __init__(self, *args, model_widths: list[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_widths = model_widths
        self._norms: dict[float, set[str]] = {}

    def _local(self, width: float) -> set[str]:
        if not self.local_keys:
            return set()
        if width not in self._norms:
            self._norms[width] = norm_state_keys(self.spec.build_width(width))
        return self._norms[width]

    def payload(self, width: float) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for w in self.model_widths:
            if w <= width + 1e-9:
                prefix, local = width_tag(w) + "/", self._local(w)
                out.update({k: v for k, v in self._state.items() if k.startswith(prefix) and k[len(prefix) :] not in local})
        return out


def trainable_width(widths: list[float], all_clients: bool) -> WidthOf:
    """The widest model a client trains (it trains every narrower one too); None: none."""

    def width_of(profile: NodeProfile) -> float | None:
        if all_clients:
            return max(widths)
        affordable = [w for w in widths if w <= profile.budget + 1e-9]
        return max(affordable) if affordable else None

    return width_of


@register_method
class FedAvg(HeteroFL):
    name = "fedavg"
    common_sparse_start = True
    bn_regime: ClassVar[str | None] = None  # the run's bn-stats
    count_clients = False  # FedAvg: example-weighted
    scaler = False

    def widths(self) -> list[float]:
        return self.budgets or [1.0]

    def respects_budgets(self, width: float) -> bool:
        """``fedavg-clients = "all"`` makes every client train every width: only the widths
        within the smallest budget respect every budget (the paper greys out the others)."""
        return not self.fedavg_all_clients or width <= min(self.budgets or [1.0]) + 1e-9

    def initial_state(self, seed: int) -> State:
        torch.manual_seed(seed)
        state: State = {}
        for width in self.widths():
            model = self.spec.build_width(width)
            state.update({f"{width_tag(width)}/{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")})
        return state

    def width_state(self, state: State, width: float) -> State:
        prefix = width_tag(width) + "/"
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    def width_of(self) -> WidthOf:
        return trainable_width(self.widths(), self.fedavg_all_clients)

    strategy_class = PerWidthStrategy

    def strategy_options(self) -> dict[str, Any]:
        return {"model_widths": self.widths()}

    def client_model(self, received: State, instruction: Instruction, context: object) -> tuple[StackedNet, list[str]]:
        """The width model, as its own unit (``w0.5``): per-unit technique state (masks, optimizer
        moments) is kept apart for each width model a client trains."""
        model, _ = super().client_model(received, instruction, context)
        return model, [width_tag(float(instruction.extra[WIDTH]))]

    def client_jobs(self, received: State, instruction: Instruction) -> list[tuple[str, State, Instruction]]:
        """One job per width model received, narrowest first."""
        by_width: dict[float, State] = {}
        for key, value in received.items():
            tag, _, rest = key.partition("/")
            by_width.setdefault(float(tag[1:]), {})[rest] = value
        return [(f"{width_tag(w)}/", state, replace(instruction, extra={**instruction.extra, WIDTH: w})) for w, state in sorted(by_width.items())]
