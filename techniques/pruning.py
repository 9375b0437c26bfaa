"""Structured lottery tickets (arXiv 2202.04736): masks, IMP with rewinding, refill, and a greedy
row grouping (mask only; no kernel) in place of the paper's regroup.

Masks are kept apart from training, as in torch-pruning: a mask set is a dict
``{"conv1.weight": bool tensor of the weight's shape}`` and every function here is a pure function
of (model weights, masks) except :func:`apply_masks_`/:func:`rewind_` and the IMP driver, which
write weights. Any training loop plugs in through ``train_fn(model, masks)``: it trains in place
and re-applies the masks after every optimizer step (:func:`apply_masks_`).

Stacked Split-Mix models (k bases side by side, chunks along dim 0) are pruned, refilled and
grouped **per base**: every base is an independent network, and refill keeps the same channel
count in every base so the sliced model is again a uniform stack (``models/slice_channels.py``).
Batch norms are never pruned; the classifier is pruned only when asked, and its outputs are never
removed (refill only zeroes the input columns that read removed channels).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from models.blocks import StackedLinear
from models.masks import Masks
from models.slice_channels import channel_graph, channel_masks, num_bases, per_base_counts

TrainFn = Callable[[nn.Module, Masks], None]


# ---------------------------------------------------------------------------------------------
# masks


def prunable_names(model: nn.Module, include_classifier: bool = False) -> list[str]:
    """Weight names of every conv/linear layer; the last linear (the classifier) only if asked."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, StackedLinear))]
    last_linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, StackedLinear))]
    if last_linear and not include_classifier:
        names.remove(last_linear[-1])
    return names


def init_masks(model: nn.Module, names: list[str] | None = None) -> Masks:
    """All-ones masks over ``names`` (default: :func:`prunable_names`)."""
    params = dict(model.named_parameters())
    return {n: torch.ones(params[n].shape, dtype=torch.bool) for n in (names or prunable_names(model))}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero every masked weight in place (call after each optimizer step while training a ticket)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model


@torch.no_grad()
def rewind_(model: nn.Module, checkpoint: dict[str, torch.Tensor], masks: Masks) -> nn.Module:
    """Weight rewinding: every tensor (BN included) back to ``checkpoint``, then the mask applied."""
    model.load_state_dict(checkpoint)
    return apply_masks_(model, masks)


def _per_base(t: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    return t.chunk(k, dim=0)


@torch.no_grad()
def global_magnitude_prune(model: nn.Module, masks: Masks, rate: float, names: list[str] | None = None, per_base: bool = True) -> Masks:
    """One IMP step: remove ``round(rate · surviving)`` of the surviving weights with the smallest
    |w|, ranked globally over ``names`` (default: the prunable layers present in ``masks``).

    ``per_base``: rank within each base of a stack separately, so every base keeps exactly the
    same count (bases are independent networks). Masks of other layers pass through unchanged.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"prune rate must be in [0, 1), got {rate}")
    params = dict(model.named_parameters())
    names = [n for n in (names or prunable_names(model)) if n in masks]
    k = num_bases(model) if per_base else 1
    new = dict(masks)
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(k):
        w = [_per_base(params[n].detach(), k)[b].reshape(-1) for n in names]
        m = [_per_base(masks[n].to(params[n].device), k)[b].reshape(-1) for n in names]
        flat_w, flat_m = torch.cat(w).abs(), torch.cat(m)
        n_remove = int(round(rate * int(flat_m.sum())))
        score = torch.where(flat_m, flat_w, torch.full_like(flat_w, math.inf))
        keep = flat_m.clone()
        keep[torch.argsort(score, stable=True)[:n_remove]] = False
        for n, part in zip(names, keep.split([t.numel() for t in w])):
            pieces[n].append(part)
    for n in names:
        new[n] = torch.cat([p.view(-1, *params[n].shape[1:]) for p in pieces[n]], dim=0).cpu()
    return new


def imp_sparsity(rate: float, rounds: int) -> float:
    """Sparsity after ``rounds`` IMP rounds removing ``rate`` of the survivors each (before rounding)."""
    return 1.0 - (1.0 - rate) ** rounds


# ---------------------------------------------------------------------------------------------
# refill: channel-wise sparsity


def _rank_rows(count: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Row order, most surviving weights first; ties broken by larger surviving |w| sum."""
    by_mag = torch.argsort(magnitude, descending=True, stable=True)
    return by_mag[torch.argsort(count[by_mag], descending=True, stable=True)]


@torch.no_grad()
def refill(model: nn.Module, masks: Masks, channel_sparsity: float | None = None) -> Masks:
    """Refill: per layer and per base keep the channels with the most surviving weights, dense, and
    remove the rest — channel-wise sparsity.

    Each producer of the model's channel graph keeps ``n = max(1, round(d · out))`` channels in
    every base, where d is the layer's mask density over the input columns still alive after the
    upstream layers were refilled (so removed inputs do not count twice), or ``1 − channel_sparsity``
    when given. Kept rows become dense over the alive inputs; removed channels also lose the
    consumer columns that read them (next layer's inputs, fc1's 4 features per channel), which is
    what makes the masked model equal to the sliced one (see ``models/slice_channels.py``). The
    classifier's outputs are kept; its mask (added if absent) only loses those input columns.
    """
    if channel_sparsity is not None and not 0.0 <= channel_sparsity < 1.0:
        raise ValueError(f"channel sparsity must be in [0, 1), got {channel_sparsity}")
    k = num_bases(model)
    params = dict(model.named_parameters())
    keep: dict[str, torch.Tensor] = {}
    for node in channel_graph(model):  # forward order: upstream keeps are known
        name = f"{node.producer}.weight"
        w = params[name].detach().cpu()
        alive = channel_masks(model, keep).get(name, torch.ones_like(w, dtype=torch.bool))
        mask = masks.get(name, torch.ones_like(w, dtype=torch.bool)).cpu() & alive
        out = w.shape[0] // k
        if channel_sparsity is None:
            density = float(mask.sum()) / max(1, int(alive.sum()))
        else:
            density = 1.0 - channel_sparsity
        n_keep = max(1, min(out, int(round(density * out))))
        count = mask.reshape(k, out, -1).sum(dim=2)
        magnitude = (w.abs() * mask).reshape(k, out, -1).sum(dim=2)
        rows = torch.zeros(k, out, dtype=torch.bool)
        for b in range(k):
            rows[b, _rank_rows(count[b], magnitude[b])[:n_keep]] = True
        keep[node.producer] = rows.view(-1)
    structural = channel_masks(model, keep)
    new = dict(masks)
    for name, smask in structural.items():
        if name.removesuffix(".weight") in keep:  # producer: kept rows dense (over alive inputs)
            new[name] = smask
        else:  # consumer only (classifier, residual layers): its own mask minus the removed inputs
            new[name] = masks.get(name, torch.ones_like(smask)).cpu() & smask
    return new


# ---------------------------------------------------------------------------------------------
# greedy row grouping (mask only; no kernel): a stand-in for the paper's regroup


@dataclass
class RowGroupLayer:
    """Block structure of one layer: per base, the (rows, columns) of every dense block."""

    blocks: list[list[tuple[torch.Tensor, torch.Tensor]]]
    target: int  # surviving weights of the unstructured mask
    kept: int  # weights kept by the block mask
    retained: float  # fraction of the unstructured survivors that the block mask keeps


@dataclass
class RowGroupReport:
    layers: dict[str, RowGroupLayer] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Totals: kept vs target weights, retained survivors, number and mean shape of blocks."""
        blocks = [(len(r), len(c)) for layer in self.layers.values() for base in layer.blocks for r, c in base if len(c)]
        target = sum(layer.target for layer in self.layers.values())
        kept = sum(layer.kept for layer in self.layers.values())
        retained = sum(layer.retained * layer.target for layer in self.layers.values()) / max(1, target)
        return {
            "target": target,
            "kept": kept,
            "retained": retained,
            "blocks": len(blocks),
            "mean_block_rows": sum(r for r, _ in blocks) / max(1, len(blocks)),
            "mean_block_cols": sum(c for _, c in blocks) / max(1, len(blocks)),
            "in_blocks": 1.0,  # every kept weight lies in a dense rows × columns block by construction
        }


def _group_rows(mask: torch.Tensor, rows_per_group: int) -> list[torch.Tensor]:
    """Greedy row clustering: seed with the row keeping the most weights, add the rows whose
    surviving columns overlap the seed's most (ties: denser rows first), repeat."""
    counts = mask.sum(dim=1)
    remaining = torch.argsort(counts, descending=True, stable=True)
    groups = []
    m = mask.float()
    while remaining.numel():
        seed = remaining[0]
        overlap = m[remaining] @ m[seed]
        order = _rank_rows(overlap, counts[remaining].float())
        order = torch.cat([torch.tensor([0]), order[order != 0]])  # the seed always leads its group
        take = order[:rows_per_group]
        groups.append(remaining[take].sort().values)
        left = torch.ones(remaining.numel(), dtype=torch.bool)
        left[take] = False
        remaining = remaining[left]
    return groups


def _row_group_matrix(mask: torch.Tensor, weight: torch.Tensor, rows_per_group: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Block mask of one base's ``out × (in·kh·kw)`` matrix keeping at most ``mask.sum()`` weights."""
    groups = _group_rows(mask, rows_per_group)
    target = int(mask.sum())
    # Candidate unit: one column of one row group, |group| weights. Rank units by surviving count
    # in the group, then by surviving magnitude, and keep units while they fit in the target.
    counts = torch.stack([mask[g].sum(dim=0) for g in groups])  # (groups, cols)
    mags = torch.stack([(weight[g].abs() * mask[g]).sum(dim=0) for g in groups])
    sizes = torch.tensor([len(g) for g in groups]).repeat_interleave(mask.shape[1])
    order = _rank_rows(counts.reshape(-1).float(), mags.reshape(-1))
    chosen = torch.zeros(counts.numel(), dtype=torch.bool)
    prefix = sizes[order].cumsum(0) <= target  # the leading units that fit, in rank order
    chosen[order[prefix]] = True
    budget = target - int(sizes[order[prefix]].sum())
    for unit in order[~prefix][sizes[order[~prefix]] <= budget].tolist():  # top up with smaller units
        if int(sizes[unit]) <= budget:
            chosen[unit] = True
            budget -= int(sizes[unit])
        if budget == 0:
            break
    chosen = chosen.view(len(groups), mask.shape[1])
    block_mask = torch.zeros_like(mask)
    blocks = []
    for gi, g in enumerate(groups):
        cols = chosen[gi].nonzero().flatten()
        block_mask[g.unsqueeze(1), cols.unsqueeze(0)] = True
        blocks.append((g, cols))
    return block_mask, blocks


@torch.no_grad()
def greedy_row_grouping(model: nn.Module, masks: Masks, rows_per_group: int = 8) -> tuple[Masks, RowGroupReport]:
    """Greedy row grouping (mask only; no kernel): each layer's unstructured mask turned into dense
    blocks (group-wise sparsity), in place of the paper's regroup.

    The paper gathers surviving weights into dense blocks by hypergraph partitioning of the rows.
    This is a greedy stand-in: per layer and base, the weight matrix (conv weights viewed as
    out × in·kh·kw) has its rows clustered into groups of ``rows_per_group`` with similar column
    support (:func:`_group_rows`), then whole columns of a group — a dense ``|group| × 1`` unit —
    are kept in order of how many survivors they hold until the layer's surviving count is
    reached. Each group's kept columns would form one dense block (a gathered GEMM), but no such
    kernel exists here: the result is a mask, run at dense cost, and no speed is claimed for it.
    The kept count is at most the unstructured count and short of it by less than one unit
    (``rows_per_group``).
    """
    k = num_bases(model)
    params = dict(model.named_parameters())
    new = dict(masks)
    report = RowGroupReport()
    for name, mask in masks.items():
        w = params[name].detach().cpu()
        mask = mask.cpu()
        out = w.shape[0] // k
        pieces, blocks = [], []
        for b in range(k):
            mb = mask[b * out : (b + 1) * out].reshape(out, -1)
            wb = w[b * out : (b + 1) * out].reshape(out, -1)
            block_mask, base_blocks = _row_group_matrix(mb, wb, min(rows_per_group, out))
            pieces.append(block_mask)
            blocks.append(base_blocks)
        new_mask = torch.cat(pieces, dim=0).view_as(mask)
        new[name] = new_mask
        target = int(mask.sum())
        report.layers[name] = RowGroupLayer(
            blocks=blocks,
            target=target,
            kept=int(new_mask.sum()),
            retained=float((new_mask & mask).sum()) / max(1, target),
        )
    return new, report


# ---------------------------------------------------------------------------------------------
# reports


def sparsity_report(model: nn.Module, masks: Masks) -> dict:
    """Weight sparsity (over the masked layers) and, per layer, weight and channel sparsity.

    Channel sparsity counts output rows with no surviving weight; ``channels_per_base`` lists the
    kept rows of each base.
    """
    k = num_bases(model)
    layers = {}
    total = zeros = 0
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1).any(dim=1)
        layers[name] = {
            "weight_sparsity": 1.0 - float(mask.sum()) / mask.numel(),
            "channel_sparsity": 1.0 - float(rows.sum()) / rows.numel(),
            "channels_per_base": per_base_counts(rows, k),
        }
        total += mask.numel()
        zeros += mask.numel() - int(mask.sum())
    return {"weight_sparsity": zeros / max(1, total), "zeros": zeros, "total": total, "layers": layers}


# ---------------------------------------------------------------------------------------------
# IMP driver


Structure = Literal["none", "refill", "greedy-row-groups"]


@dataclass
class IMPResult:
    masks: Masks
    history: list[dict]  # one sparsity report per round (plus "round" and, for greedy-row-groups, "blocks")


def iterative_magnitude_pruning(
    model: nn.Module,
    train_fn: TrainFn,
    rounds: int,
    rate: float = 0.2,
    rewind_state: dict[str, torch.Tensor] | None = None,
    structure: Structure = "none",
    names: list[str] | None = None,
    per_base: bool = True,
    rows_per_group: int = 8,
    final_train: bool = True,
    trained: bool = False,
) -> IMPResult:
    """IMP with weight rewinding: ``rounds`` × (train → prune ``rate`` of the survivors →
    refill/row grouping → rewind survivors to ``rewind_state``), then one last training of the ticket.

    ``rewind_state``: the early checkpoint (default: the model's state now, i.e. rewinding to
    initialisation). ``train_fn(model, masks)`` trains in place and keeps the masks applied.
    ``trained``: the model arrives trained (e.g. a finished federated run that passed through
    ``rewind_state``), so round 1 prunes it as is and only later rounds train.
    """
    if structure not in ("none", "refill", "greedy-row-groups"):
        raise ValueError(f"structure must be 'none', 'refill' or 'greedy-row-groups', got {structure!r}")
    checkpoint = copy.deepcopy(rewind_state if rewind_state is not None else model.state_dict())
    masks = init_masks(model, names)
    prune_names = list(masks)
    history: list[dict] = []
    for r in range(1, rounds + 1):
        if r > 1 or not trained:
            train_fn(model, masks)
        masks = global_magnitude_prune(model, masks, rate, prune_names, per_base)
        extra: dict = {}
        if structure == "refill":
            masks = refill(model, masks)
        elif structure == "greedy-row-groups":
            masks, report = greedy_row_grouping(model, masks, rows_per_group)
            extra["blocks"] = report.summary()
        rewind_(model, checkpoint, masks)
        history.append({"round": r, **sparsity_report(model, masks), **extra})
    if final_train:
        train_fn(model, masks)
    return IMPResult(masks=masks, history=history)


def one_shot_refill(model: nn.Module, channel_sparsity: float, names: list[str] | None = None) -> Masks:
    """Post-training shortcut: refill straight to a channel sparsity (channels ranked by |w| sum),
    e.g. for ``splitmix prune RUN`` before physically slicing; apply with :func:`apply_masks_`."""
    return refill(model, init_masks(model, names), channel_sparsity=channel_sparsity)
