"""Structured sparsity (arXiv 2202.04736, federated form), ``sparse-method = "structured"``.

The t-th time a client trains a unit it magnitude-prunes the *received* weights to sparsity
s_t = min(``sparsity``, 1 − 0.8^t) (IMP's 20 % per step) and refills to channel sparsity s_t
(per layer the channels with most surviving weight stay dense); it trains and uploads only those
channels. Computed from the global weights, the channels agree across the clients of a round that
have pruned the unit equally often. They are recomputed from scratch each time, so they need not
nest: a channel removed at step t can come back at step t + 1 when the global weights moved.
No weight rewinding: the global model moves every round (``splitmix prune`` does IMP with
rewinding to an early round of a finished run and slices physically). Mechanics:
``techniques/pruning.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from techniques.base import ServerContext, State, register_technique
from techniques.sparse_base import FixedMask, SparseTechnique, UnitContext, UnitMask, group_prunable
from techniques.sparsity import Masks

STRUCTURED_RATE = 0.2  # channel sparsity grows as 1 − 0.8^t, IMP's 20 % per step


def structured_mask(single: nn.Module, weights: dict[str, torch.Tensor], channel_sparsity: float) -> Masks:
    """Magnitude pruning at ``channel_sparsity`` then refill to that channel sparsity, on a
    single-unit model holding ``weights`` (the channel graph needs a real model).

    A deterministic function of the weights: every client that receives the same global unit in
    a round (and has pruned it as often) gets the same channels. Masks at growing sparsity are
    not nested (each is computed afresh from the weights received), so a client's kept channels
    can change between its steps, not only shrink."""
    from techniques.pruning import global_magnitude_prune, init_masks, refill

    params = dict(single.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if channel_sparsity <= 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    unstructured = global_magnitude_prune(single, init_masks(single), rate=channel_sparsity)
    masks = refill(single, unstructured, channel_sparsity=channel_sparsity)
    return {n: masks.get(n, torch.ones_like(w, dtype=torch.bool)).cpu() for n, w in weights.items()}


def structured_state(state: State, prunable_names: set[str], sparsity: float, single: nn.Module) -> State:
    """Each unit's conv/linear weights pruned to whole channels at ``sparsity`` (what a
    ``structured`` client ends at): the model such a run serves and is evaluated as."""
    out = dict(state)
    for _, names in group_prunable(state, prunable_names).items():
        masks = structured_mask(single, {name: state[key].cpu() for name, key in names.items()}, sparsity)
        for name, key in names.items():
            out[key] = state[key] * masks[name].to(state[key].device)
    return out


@register_technique
class Structured(SparseTechnique[None]):
    name = "structured"

    def served_state(self, state: State, ctx: ServerContext) -> State:
        cfg = self.sparse(ctx.run)
        if cfg.fraction != 1.0:
            return state
        return structured_state(state, ctx.prunable, cfg.sparsity, ctx.method.single_unit_model())

    def unit_mask(self, ctx: UnitContext) -> UnitMask:
        mask = FixedMask.from_config(ctx.record) if ctx.record is not None else FixedMask({})
        mask.steps += 1  # prune further each time this client meets the unit, from the received weights
        target = min(self.sparse_config(ctx.rnd.task).sparsity, 1.0 - (1.0 - STRUCTURED_RATE) ** mask.steps)
        if ctx.rnd.single_unit is None:
            raise ValueError("structured sparsity needs a single-unit model builder")
        mask.masks = structured_mask(ctx.rnd.single_unit(), {n: v.cpu() for n, v in ctx.views.items()}, target)
        return mask
