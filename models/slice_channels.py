"""Channel dependency graphs and physical channel slicing (structured lottery tickets).

A removable channel is an output channel of a conv/linear *producer*. Removing it touches three
places, which the graph lists per producer: the producer's weight rows (and bias), the batch norms
over those channels (both paths of a dual BN), and the input columns of every *consumer* that reads
the channel (a linear consumer after a flatten reads ``expand`` features per channel, channel-major).

What "the masked model" means: a channel is removed when its producer row is zero **and** every
consumer column reading it is zero — the masks :func:`channel_masks` builds (and refill in
``techniques/pruning.py``) zero both. Zeroing only the producer row would not remove the channel: its
BN still outputs ``beta - gamma·mean/sqrt(var+eps)`` (a constant), which the consumer would keep
reading. With the consumer columns zeroed that constant is multiplied by zero, so the
weight-masked model computes exactly what the model with the whole channel (BN output and
activation included) deleted computes, and :func:`slice_channels` builds that smaller model.

Graphs exist for ``DigitCNN`` (conv1→bn1→conv2→bn2→conv3→bn3→pool 2×2→flatten→fc1→bn4→fc2) and
``PreActResNet18`` (inside each block only: conv1→bn2→conv2; the residual-stream channels are
shared through the skip connections of a whole stage and are never removed). The classifier's
outputs are never removed. Stacked Split-Mix models are sliced per base and must keep the same
number of channels in every base so the result is again a uniform stack of k bases.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn

from models.blocks import DualBatchNorm, StackedConv2d, StackedLinear
from models.masks import Masks


@dataclass(frozen=True)
class ChannelNode:
    """One set of removable channels: who writes them, who normalises them, who reads them."""

    producer: str  # module path of the conv/linear whose output channels these are
    norms: tuple[str, ...]  # batch norms over exactly these channels
    consumers: tuple[tuple[str, int], ...]  # (module path, input features per channel)


def channel_graph(model: nn.Module) -> list[ChannelNode]:
    """The removable channel sets of ``model`` in forward order; raises for unknown families."""
    from models.cnn import DigitCNN
    from models.preresnet import PreActResNet18

    if isinstance(model, DigitCNN):
        k = model.num_bases
        c3 = model.conv3.out_channels // k
        expand = model.fc1.in_per_base // c3  # features per channel after the 2×2 pool + flatten
        return [
            ChannelNode("conv1", ("bn1",), (("conv2", 1),)),
            ChannelNode("conv2", ("bn2",), (("conv3", 1),)),
            ChannelNode("conv3", ("bn3",), (("fc1", expand),)),
            ChannelNode("fc1", ("bn4",), (("fc2", 1),)),
        ]
    if isinstance(model, PreActResNet18):
        return [ChannelNode(f"layers.{i}.conv1", (f"layers.{i}.bn2",), ((f"layers.{i}.conv2", 1),)) for i in range(len(model.layers))]
    raise NotImplementedError(
        f"no channel dependency graph for {type(model).__name__}; channel refill and slicing "
        "support DigitCNN and PreActResNet18 (block-internal channels only)"
    )


def num_bases(model: nn.Module) -> int:
    return int(getattr(model, "num_bases", 1))


def _weight(model: nn.Module, module_path: str) -> torch.Tensor:
    return cast(torch.Tensor, model.get_submodule(module_path).weight)


def per_base_counts(keep: torch.Tensor, k: int) -> list[int]:
    """Kept channels in each of the k bases of a ``(k·out,)`` keep vector."""
    return [int(c) for c in keep.view(k, -1).sum(dim=1)]


def kept_channels(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """Per producer, a bool ``(k·out,)`` vector: channels whose mask row keeps any weight.

    A producer without a mask keeps every channel.
    """
    keep = {}
    for node in channel_graph(model):
        w = _weight(model, node.producer)
        mask = masks.get(f"{node.producer}.weight")
        keep[node.producer] = torch.ones(w.shape[0], dtype=torch.bool) if mask is None else mask.reshape(w.shape[0], -1).any(dim=1)
    return keep


def _column_keep(keep: torch.Tensor, k: int, expand: int) -> torch.Tensor:
    """``(k, in_per_base)`` bool: which consumer input columns of each base are still read."""
    return keep.view(k, -1).repeat_interleave(expand, dim=1)


def channel_masks(model: nn.Module, keep: dict[str, torch.Tensor]) -> Masks:
    """Structural weight masks of a channel selection: producer rows and consumer columns.

    ``keep`` may name only some producers (the others keep everything). A layer that is both a
    consumer and a producer gets the AND of the two.
    """
    k = num_bases(model)
    graph = {node.producer: node for node in channel_graph(model)}
    out: Masks = {}

    def merge(module_path: str, mask: torch.Tensor) -> None:
        key = f"{module_path}.weight"
        out[key] = out[key] & mask if key in out else mask

    for producer, rows in keep.items():
        node = graph[producer]
        w = _weight(model, producer)
        merge(producer, rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone())
        for consumer, expand in node.consumers:
            cw = _weight(model, consumer)
            cols = _column_keep(rows, k, expand)  # (k, in_per_base)
            rows_per_base = cw.shape[0] // k
            col_mask = cols.repeat_interleave(rows_per_base, dim=0)  # (k·out_c, in_per_base)
            merge(consumer, col_mask.view(*col_mask.shape, *([1] * (cw.dim() - 2))).expand_as(cw).clone())
    return out


def _check_uniform(keep: dict[str, torch.Tensor], k: int) -> None:
    for producer, rows in keep.items():
        counts = per_base_counts(rows, k)
        if len(set(counts)) != 1 or counts[0] == 0:
            raise ValueError(
                f"'{producer}' keeps {counts} channels per base; slicing needs the same non-zero count "
                "in every base (use refill, which keeps equal counts)"
            )


def _check_removed_unread(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Slicing is exact only if no consumer still reads a removed channel."""
    structural = channel_masks(model, keep)
    for node in channel_graph(model):
        for consumer, _ in node.consumers:
            w = _weight(model, consumer)
            mask = structural[f"{consumer}.weight"].to(w.device)
            if bool((w.detach()[~mask] != 0).any()):
                raise ValueError(
                    f"'{consumer}' still reads channels removed from '{node.producer}'; "
                    "apply the channel masks (refill's masks) to the model before slicing"
                )


def _gather(weight: torch.Tensor, k: int, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """Rows kept (``(k·out,)`` bool) and per-base input columns kept (``(k, in)`` bool)."""
    w = weight.detach()
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is None:
        return w.clone()
    cols = cols.to(w.device)
    return torch.cat([chunk[:, cols[b]] for b, chunk in enumerate(w.chunk(k, dim=0))], dim=0).clone()


def _slice_layer(layer: nn.Module, k: int, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    layer_bias = cast(torch.Tensor | None, layer.bias)
    weight = _gather(cast(torch.Tensor, layer.weight), k, rows, cols)
    bias = None if layer_bias is None else layer_bias.detach().clone()
    if bias is not None and rows is not None:
        bias = bias[rows.to(bias.device)]
    out_pb, in_pb = weight.shape[0] // k, weight.shape[1]
    if isinstance(layer, StackedConv2d):
        new: StackedConv2d | StackedLinear = StackedConv2d(
            in_pb, out_pb, layer.kernel_size[0], k, stride=layer.stride[0], padding=cast(int, layer.padding[0]), bias=bias is not None
        )
    elif isinstance(layer, StackedLinear):
        new = StackedLinear(in_pb, out_pb, k, bias=bias is not None)
    else:
        raise TypeError(f"cannot slice a {type(layer).__name__}; expected StackedConv2d or StackedLinear")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            cast(torch.Tensor, new.bias).copy_(bias)  # built with a bias
    return new.to(weight.device).train(layer.training)


def _slice_bn(bn: nn.Module, rows: torch.Tensor) -> nn.Module:
    if isinstance(bn, DualBatchNorm):
        new = DualBatchNorm(int(rows.sum()), dims=2 if isinstance(bn.clean, nn.BatchNorm2d) else 1)
        new.clean, new.adv = _slice_batch_norm(bn.clean, rows), _slice_batch_norm(bn.adv, rows)
        new.route = bn.route
        return new.train(bn.training)
    return _slice_batch_norm(cast(nn.modules.batchnorm._BatchNorm, bn), rows)


_BN = TypeVar("_BN", bound=nn.modules.batchnorm._BatchNorm)


def _slice_batch_norm(bn: _BN, rows: torch.Tensor) -> _BN:
    new = type(bn)(int(rows.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
    rows = rows.to(bn.weight.device if bn.affine else rows.device)
    new = new.to(rows.device)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[rows])
            new.bias.copy_(bn.bias[rows])
        if bn.running_mean is not None:  # then both have every buffer (casts: torch types them Optional)
            cast(torch.Tensor, new.running_mean).copy_(bn.running_mean[rows])
            cast(torch.Tensor, new.running_var).copy_(cast(torch.Tensor, bn.running_var)[rows])
            cast(torch.Tensor, new.num_batches_tracked).copy_(cast(torch.Tensor, bn.num_batches_tracked))
    if bn.running_mean is None:  # static BN (make_static_bn_): no buffers at all
        new.running_mean = new.running_var = new.num_batches_tracked = None
    return new.train(bn.training)


def _replace(model: nn.Module, module_path: str, module: nn.Module) -> None:
    parent, _, attr = module_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def slice_channels(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` with only the kept channels (the original is untouched).

    ``keep``: per producer a bool ``(k·out,)`` vector (e.g. :func:`kept_channels` of refill's
    masks), with the same count in every base. Its outputs equal those of ``model`` — whose
    removed channels' consumer columns must already be zero (checked) — in eval and train mode.
    """
    graph = channel_graph(model)
    k = num_bases(model)
    keep = {p: r.to(torch.bool).cpu() for p, r in keep.items()}
    _check_uniform(keep, k)
    _check_removed_unread(model, keep)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for node in graph:
        if node.producer not in keep:
            continue
        r = keep[node.producer]
        rows[node.producer] = r
        for norm in node.norms:
            norms[norm] = r
        for consumer, expand in node.consumers:
            cols[consumer] = _column_keep(r, k, expand)
    sliced = copy.deepcopy(model)
    for path in set(rows) | set(cols):
        _replace(sliced, path, _slice_layer(model.get_submodule(path), k, rows.get(path), cols.get(path)))
    for path, r in norms.items():
        _replace(sliced, path, _slice_bn(model.get_submodule(path), r))
    return sliced
