"""Client-local UVC (arXiv 2203.08243), ``sparse-method = "uvc"``, for ViT clients under a FLOPs
budget.

Each round a short UVC search (``techniques/uvc_search.py``: per-block head / head-dim /
MLP-neuron counts and skip gates under a primal-dual FLOPs constraint, distilled from the received
model) on the client's own data picks what its bases keep, projected onto ``uvc-flops-ratio`` of
the dense MACs; the client trains and uploads only those weights (masks: the removed heads' proj
columns, neurons' fc1 rows / fc2 columns, and a skipped block's proj and fc2 — biases stay dense,
so a skipped block adds a constant). Masks differ per client, so the served model is the dense
aggregate. The search is part of the client's cost: its reported ``flops-fraction`` adds the
search's steps (:func:`search_cost`) to the masked training steps, so it can exceed 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from splitmix.sections import ConfigError, Section, option
from techniques.base import ClientRound, ServerContext, State, register_technique
from techniques.sparse_base import FixedMask, SparseRound, SparseTechnique, UnitContext, UnitMask

if TYPE_CHECKING:
    from models.vit import VisionTransformer
    from splitmix.config import RunConfig

SEARCH_STEPS = 30  # UVC search steps on the client's data each round
SEARCH_BATCH = 64  # their batch size (at most the client's data)


def search_cost(steps: int, search_batch: int, examples: int, train_batch: int) -> float:
    """The search's compute in dense training steps of ``train_batch`` examples: each search step
    runs the full (masked, gated) model forward and backward on ``search_batch`` examples, and
    the frozen teacher runs one forward pass (≈ ⅓ of a training step) over all examples."""
    return (steps * search_batch + examples / 3.0) / train_batch


@dataclass(frozen=True)
class UVCConfig(Section):
    flops_ratio: float = option(
        0.5, "client-local UVC: the client's MACs budget as a share of its dense bases", key="uvc-flops-ratio", lo=0, hi=1, lo_open=True
    )


@register_technique
class UVC(SparseTechnique[UVCConfig]):
    name = "uvc"
    Config = UVCConfig

    @classmethod
    def check(cls, run: RunConfig) -> None:
        if cls.enabled(run) and not run.model.is_vit:
            raise ConfigError(f"config key 'sparse-method' = 'uvc' compresses ViT bases; model = '{run.model.model}' is not a ViT")

    def served_state(self, state: State, ctx: ServerContext) -> State:
        return state  # masks differ per client: the aggregate stays dense

    def prepare(self, rnd: ClientRound, sparse: SparseRound) -> None:
        from techniques.uvc_search import uvc_masks

        data = rnd.data
        found = uvc_masks(
            cast("VisionTransformer", rnd.model),
            data.x.to(rnd.device),
            data.y.to(rnd.device),
            self.config.flops_ratio,
            steps=SEARCH_STEPS,
            seed=rnd.seed,
            batch_size=SEARCH_BATCH,
        )
        batch = min(SEARCH_BATCH, len(data))
        sparse.extra_flops = search_cost(SEARCH_STEPS, batch, len(data), rnd.task.train.batch_size)  # counted in flops-fraction
        self.found = {n: m for n, m in found.items() if n in sparse.params}

    def unit_mask(self, ctx: UnitContext) -> UnitMask:  # searched afresh on the received weights every round
        k = len(ctx.rnd.units)
        return FixedMask(
            {
                n: (self.found[n].chunk(k, 0)[ctx.index].clone() if n in self.found else torch.ones_like(v, dtype=torch.bool))
                for n, v in ctx.views.items()
            }
        )
