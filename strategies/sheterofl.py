"""SHeteroFL, as the Split-Mix paper and its code (``federated/core.py``: ``SHeteFederation``)
define it: HeteroFL plus *slimmable training* — on every batch a client trains every width of the
run's budget levels that its budget affords (its own and each narrower one), summing their
losses before the one optimizer step (the official loop back-propagates each width's loss into
the same gradients, then steps). The narrower widths are the leading slices of the client's own
parameters, so one update trains the nested sub-networks jointly. Static BN, Scaler and
aggregation are HeteroFL's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from clients.recipe import class_loss, present_classes
from models.blocks import routed
from models.slicing import leading_slices
from splitmix.protocol import SLIM_WIDTHS, WIDTH, Instruction
from strategies.heterofl import HeteroFL, WidthSliceStrategy, cached_slice_model
from strategies.registry import LrSchedule, register_method
from techniques.base import ClientRound, RoundHooks


@dataclass
class SlimmableTraining(RoundHooks):
    """Adds, on each batch, the loss of every narrower width (a leading slice of the trained
    parameters, run through that width's own static-BN network)."""

    narrower: Sequence[tuple[float, nn.Module]]
    present: torch.Tensor | None = None  # masked cross-entropy: the client's classes

    def __post_init__(self) -> None:
        self.extra_loss = self._narrower_losses

    def _narrower_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        params = dict(model.named_parameters())
        for _width, narrow in self.narrower:
            narrow.train()
            shapes = {k: tuple(v.shape) for k, v in narrow.named_parameters()}
            sliced = {k: params[k][leading_slices(shape)] for k, shape in shapes.items()}
            with routed(narrow, "clean"):
                logits = functional_call(narrow, sliced, (x,))
            total = total + class_loss(logits, y, self.present)
        return total


@register_method
class SHeteroFL(HeteroFL):
    name = "sheterofl"

    def slim_widths(self, width: float) -> list[float]:
        """The widths a client of ``width`` trains on every batch: the run's budget levels up to
        its own (just its own when the levels are unknown)."""
        levels = [w for w in self.budgets if w <= width + 1e-9]
        return sorted(set(levels) | {width})

    def strategy(self, task_json: str, fraction: float, min_clients: int, seed: int, lr_at: LrSchedule) -> WidthSliceStrategy:
        strategy = super().strategy(task_json, fraction, min_clients, seed, lr_at)
        strategy.extra_of = lambda profile, width: {SLIM_WIDTHS: self.slim_widths(width)}
        return strategy

    def client_hooks(self, rnd: ClientRound, instruction: Instruction) -> list[RoundHooks]:
        width = float(instruction.extra[WIDTH])
        widths = [float(w) for w in instruction.extra.get(SLIM_WIDTHS, [width])]  # type: ignore[union-attr]
        narrower = [(w, cached_slice_model(self.spec, w, self.scaler)) for w in widths if w < width - 1e-9]
        present = present_classes(rnd.data.y, self.spec.num_classes) if rnd.task.train.masked_loss else None
        return [SlimmableTraining(narrower, present)]
