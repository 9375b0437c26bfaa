"""A UVC-compressed ViT as a physically smaller model, and the vocabulary that describes it.

UVC (``techniques/uvc_search.py``) decides, per base b and block l of a stacked
:class:`~models.vit.VisionTransformer`, which blocks, heads, value dims inside each head and MLP
neurons survive (a :class:`Selection`). This module is the structure side only — no training:

- :class:`ViTGeometry`: the sizes every count needs and the exact MACs of what a sliced model
  runs (the ops ``FlopCounterMode`` counts: patch conv, qkv/proj/fc1/fc2 linears, QKᵀ and AV,
  the CLS classifier), per block ``N·D·(2·d_h·H' + V) + N²·d_h·H' + N²·V + N·V·D + 2·N·D·M'``
  with H' heads, V value dims and M' neurons kept. Written so it also takes tensors, which makes
  it the differentiable resource model of the search. T0 dense: 633,408 MACs per base.
- :class:`SlicedViT`: k per-base ViTs built from the same :class:`~models.vit.Block` with a
  :class:`SlicedAttention` passed in (q/k keep d_h per head; each head keeps its own value dims,
  heads with equal v dims share one SDPA call), reloadable from its JSON architecture alone.
- :func:`slice_vit`: copies the surviving weights of a model into that smaller model; it computes
  what the masked model (UVC's masks applied to the unsliced one) computes.

It lives in ``models/`` because the compressed model is served and reloaded (architecture.json +
safetensors) without any of the search code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from models.blocks import StackedNet
from models.splitmix import split_stacked_state
from models.vit import Attention, Block, DualLayerNorm, Mlp, StackedLayerNorm, TokenLinear, VisionTransformer, attnscale_fused

ARCH_FORMAT = "splitmix-uvc-vit/1"


# ---------------------------------------------------------------------------------------------
# geometry, what survives, and exact MAC counts


@dataclass(frozen=True)
class ViTGeometry:
    """The sizes every count needs (per base); read off a built model, so any topology works."""

    num_bases: int
    depth: int
    tokens: int  # N, CLS included
    dim: int  # D
    heads: int  # H
    head_dim: int  # d_h
    hidden: int  # M
    embed_macs: int  # patch conv
    head_macs: int  # classifier on the CLS token

    @classmethod
    def from_model(cls, model: VisionTransformer) -> ViTGeometry:
        conv = model.patch_embed
        patch_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
        d = model.embed_dim
        mlp = cast(Mlp, model.blocks[0].mlp) if len(model.blocks) else None  # the stacked blocks' MLP of token linears
        hidden = cast(TokenLinear, mlp.fc1).out_per_base if mlp is not None else 0
        return cls(
            model.num_bases,
            len(model.blocks),
            model.num_tokens,
            d,
            model.num_heads,
            d // model.num_heads,
            hidden,
            (model.num_tokens - 1) * d * patch_in,
            d * model.num_classes,
        )

    def block_macs(self, heads: Any, vdims: Any, neurons: Any) -> Any:
        """MACs of one block keeping ``heads`` heads, ``vdims`` value dims in all, ``neurons``
        MLP neurons (ints or tensors, so the same formula is exact and differentiable)."""
        n, d, dh = self.tokens, self.dim, self.head_dim
        return n * d * (2 * dh * heads + vdims) + n * n * dh * heads + n * n * vdims + n * vdims * d + 2 * n * d * neurons

    def dense_macs(self) -> int:
        """All k bases, nothing pruned."""
        block = self.block_macs(self.heads, self.dim, self.hidden)
        return self.num_bases * (self.embed_macs + self.head_macs + self.depth * block)

    @property
    def fixed_macs(self) -> int:
        """What no pruning removes: patch embedding and classifier of every base."""
        return self.num_bases * (self.embed_macs + self.head_macs)


@dataclass
class Selection:
    """What survives, per base and block (the discrete UVC result).

    ``dims`` is False for every dim of a removed head; a kept block keeps ≥ 1 head, every kept
    head ≥ 1 value dim, and ≥ 1 neuron."""

    blocks: torch.Tensor  # (k, L) bool
    heads: torch.Tensor  # (k, L, H) bool
    dims: torch.Tensor  # (k, L, H, d_h) bool
    neurons: torch.Tensor  # (k, L, M) bool

    def clone(self) -> Selection:
        return Selection(self.blocks.clone(), self.heads.clone(), self.dims.clone(), self.neurons.clone())

    def macs(self, geom: ViTGeometry) -> int:
        """Exact MACs of the sliced model (equals ``FlopCounterMode`` / 2 on :func:`slice_vit`)."""
        per = geom.block_macs(self.heads.sum(-1), self.dims.sum((-1, -2)), self.neurons.sum(-1))
        return geom.fixed_macs + int((per * self.blocks).sum())

    def summary(self) -> dict[str, Any]:
        """Counts per base and block (JSON-ready), for cards and logs."""
        k, depth = self.blocks.shape
        return {
            "blocks_kept": self.blocks.sum(-1).tolist(),
            "heads_kept": (self.heads.sum(-1) * self.blocks).tolist(),
            "vdims_kept": (self.dims.sum((-1, -2)) * self.blocks).tolist(),
            "neurons_kept": (self.neurons.sum(-1) * self.blocks).tolist(),
            "shape": [k, depth],
        }


def dense_selection(geom: ViTGeometry) -> Selection:
    k, depth, h, dh, m = geom.num_bases, geom.depth, geom.heads, geom.head_dim, geom.hidden
    return Selection(
        torch.ones(k, depth, dtype=torch.bool),
        torch.ones(k, depth, h, dtype=torch.bool),
        torch.ones(k, depth, h, dh, dtype=torch.bool),
        torch.ones(k, depth, m, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------
# physical slicing


class SlicedAttention(nn.Module):
    """Attention with per-head value dims: q/k keep d_h, head i's v/proj part keeps ``v_dims[i]``.

    An :data:`~models.vit.AttnLayer` of one base once ``head_dim`` and ``v_dims`` are bound
    (``functools.partial``); ``num_heads`` is the number of kept heads. qkv rows: [q of every
    head | k of every head | v of head 0, head 1, …]; heads with equal consecutive v dims run as
    one SDPA call (the slicer orders heads by v dim)."""

    def __init__(self, dim: int, num_heads: int, num_bases: int, attn_scale: bool, *, head_dim: int, v_dims: list[int]) -> None:
        super().__init__()
        if num_bases != 1 or num_heads != len(v_dims):
            raise ValueError(
                f"a sliced attention is one base with one v dim per head; got {num_bases} bases, {num_heads} heads, {len(v_dims)} v dims"
            )
        self.head_dim, self.v_dims = head_dim, list(v_dims)
        h = len(v_dims)
        self.qkv = TokenLinear(dim, 2 * h * head_dim + sum(v_dims), 1)
        self.proj = TokenLinear(sum(v_dims), dim, 1)
        self.omega = nn.Parameter(torch.zeros(h)) if attn_scale else None
        self.groups: list[tuple[int, int, int, int]] = []  # (first head, heads, v dim, v offset)
        first, offset = 0, 0
        for i in range(1, h + 1):
            if i == h or v_dims[i] != v_dims[first]:
                self.groups.append((first, i - first, v_dims[first], offset))
                offset += (i - first) * v_dims[first]
                first = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kk, b, n, _ = x.shape  # kk = 1
        h, dh = len(self.v_dims), self.head_dim
        qkv = self.qkv(x).reshape(kk * b, n, -1)
        q = qkv[..., : h * dh].reshape(kk * b, n, h, dh).transpose(1, 2)
        key = qkv[..., h * dh : 2 * h * dh].reshape(kk * b, n, h, dh).transpose(1, 2)
        values = qkv[..., 2 * h * dh :]
        outs = []
        for first, count, vd, offset in self.groups:
            v = values[..., offset : offset + count * vd].reshape(kk * b, n, count, vd).transpose(1, 2)
            omega = None if self.omega is None else self.omega[first : first + count].view(count, 1, 1)
            out = attnscale_fused(q[:, first : first + count], key[:, first : first + count], v, omega)
            outs.append(out.transpose(1, 2).reshape(kk * b, n, count * vd))
        return self.proj(torch.cat(outs, -1).view(kk, b, n, -1))


class SlicedViT(StackedNet):
    """The compressed model: k per-base ViTs (one ``VisionTransformer`` with ``num_bases=1``
    each, its blocks the same :class:`~models.vit.Block` built with a :class:`SlicedAttention`
    and the kept MLP width, skipped blocks absent), logits averaged as in Split-Mix.

    Built from its JSON architecture alone (``self.architecture``), so a saved model reloads from
    architecture.json + safetensors without pickle."""

    def __init__(self, architecture: dict[str, Any]) -> None:
        super().__init__()
        if architecture.get("format") != ARCH_FORMAT:
            raise ValueError(f"architecture format {architecture.get('format')!r} is not {ARCH_FORMAT!r}")
        a = self.architecture = copy.deepcopy(architecture)
        self.num_classes, self.num_bases = int(a["num_classes"]), len(a["bases"])
        norm_layer = DualLayerNorm if a["dual_ln"] else StackedLayerNorm
        head_dim = a["embed_dim"] // a["num_heads"]
        bases = []
        for spec in a["bases"]:
            base = VisionTransformer(
                width=1.0,
                num_bases=1,
                num_classes=a["num_classes"],
                in_channels=a["in_channels"],
                image_size=a["image_size"],
                dual_bn=a["dual_ln"],
                patch_size=a["patch_size"],
                depth=0,
                embed_dim=a["embed_dim"],
                num_heads=a["num_heads"],
                attn_scale=a["attn_scale"],
                feat_scale=a["feat_scale"],
            )
            for blk in spec["blocks"]:
                attn_layer = partial(SlicedAttention, head_dim=head_dim, v_dims=blk["v_dims"])
                base.blocks.append(
                    Block(
                        a["embed_dim"],
                        len(blk["v_dims"]),
                        blk["hidden"],
                        1,
                        a["attn_scale"],
                        a["feat_scale"],
                        norm_layer=norm_layer,
                        attn_layer=attn_layer,
                    )
                )
            bases.append(base)
        self.bases = nn.ModuleList(bases)

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:  # per-base inputs (B, k, C, H, W)
            return torch.cat([cast(VisionTransformer, base).forward_bases(x[:, i : i + 1]) for i, base in enumerate(self.bases)], dim=1)
        return torch.cat([cast(VisionTransformer, base).forward_bases(x) for base in self.bases], dim=1)


def _head_order(sel: Selection, b: int, l: int) -> list[int]:
    """Kept heads ordered by v dim (descending), then index: equal v dims are contiguous."""
    kept = sel.heads[b, l].nonzero().flatten().tolist()
    return sorted(kept, key=lambda h: (-int(sel.dims[b, l, h].sum()), h))


def sliced_architecture(model: VisionTransformer, sel: Selection) -> dict[str, Any]:
    """The JSON description of ``model`` sliced by ``sel`` (sizes and which original groups survive)."""
    geom = ViTGeometry.from_model(model)
    bases = []
    for b in range(geom.num_bases):
        blocks = []
        for l in range(geom.depth):
            if not sel.blocks[b, l]:
                continue
            heads = _head_order(sel, b, l)
            blocks.append(
                {"index": l, "heads": heads, "v_dims": [int(sel.dims[b, l, h].sum()) for h in heads], "hidden": int(sel.neurons[b, l].sum())}
            )
        bases.append({"blocks": blocks})
    first = model.blocks[0] if len(model.blocks) else None
    return {
        "format": ARCH_FORMAT,
        "num_classes": model.num_classes,
        "in_channels": model.patch_embed.weight.shape[1],
        "image_size": int(round(math.sqrt(model.num_tokens - 1))) * model.patch_size,
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "num_heads": model.num_heads,
        "dual_ln": isinstance(model.norm, DualLayerNorm),
        "attn_scale": first is not None and cast(Attention, first.attn).omega is not None,
        "feat_scale": first is not None and first.featscale is not None,
        "bases": bases,
    }


@torch.no_grad()
def slice_vit(model: VisionTransformer, sel: Selection) -> SlicedViT:
    """Physically remove what ``sel`` removes; the result computes what the masked model does
    (``techniques.uvc_search.masked_copy``: the same selection as zeros in the unsliced model)."""
    geom = ViTGeometry.from_model(model)
    h, dh = geom.heads, geom.head_dim
    arch = sliced_architecture(model, sel)
    sliced = SlicedViT(arch)
    state: dict[str, torch.Tensor] = {}
    for b, base_state in enumerate(split_stacked_state(model.state_dict(), geom.num_bases)):
        for name, t in base_state.items():
            if not name.startswith("blocks."):
                state[f"bases.{b}.{name}"] = t
        for i, blk in enumerate(arch["bases"][b]["blocks"]):
            l, heads = blk["index"], blk["heads"]
            src, dst = f"blocks.{l}.", f"bases.{b}.blocks.{i}."
            for name, t in base_state.items():
                if (
                    name.startswith(tuple(src + part for part in ("norm1", "norm2", "featscale")))
                    or name == src + "attn.proj.bias"
                    or name == src + "mlp.fc2.bias"
                ):
                    state[dst + name[len(src) :]] = t
            dims = [sel.dims[b, l, hh].nonzero().flatten() for hh in heads]
            w = base_state[src + "attn.qkv.weight"].view(h, 3, dh, -1)
            bias = base_state[src + "attn.qkv.bias"].view(h, 3, dh)
            state[dst + "attn.qkv.weight"] = torch.cat(
                [w[heads, 0].flatten(0, 1), w[heads, 1].flatten(0, 1)] + [w[hh, 2, j] for hh, j in zip(heads, dims)]
            )
            state[dst + "attn.qkv.bias"] = torch.cat(
                [bias[heads, 0].flatten(), bias[heads, 1].flatten()] + [bias[hh, 2, j] for hh, j in zip(heads, dims)]
            )
            proj = base_state[src + "attn.proj.weight"].view(geom.dim, h, dh)
            state[dst + "attn.proj.weight"] = torch.cat([proj[:, hh, j] for hh, j in zip(heads, dims)], dim=1)
            if src + "attn.omega" in base_state:
                state[dst + "attn.omega"] = base_state[src + "attn.omega"][heads]
            keep = sel.neurons[b, l].nonzero().flatten()
            state[dst + "mlp.fc1.weight"] = base_state[src + "mlp.fc1.weight"][keep]
            state[dst + "mlp.fc1.bias"] = base_state[src + "mlp.fc1.bias"][keep]
            state[dst + "mlp.fc2.weight"] = base_state[src + "mlp.fc2.weight"][:, keep]
    sliced.load_state_dict({n: t.contiguous().clone() for n, t in state.items()}, strict=True)
    sliced.train(model.training)
    return sliced


__all__ = [
    "ARCH_FORMAT",
    "Selection",
    "SlicedAttention",
    "SlicedViT",
    "ViTGeometry",
    "dense_selection",
    "slice_vit",
    "sliced_architecture",
]
