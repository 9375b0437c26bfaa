"""A small Vision Transformer, width-scalable and base-stackable (Split-Mix bases).

Pre-norm ViT with a CLS token and learned positional embeddings (timm's layout and names:
``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, ``head``). At width 1 the default is D = 256, 32 heads of dim 8,
MLP ratio 2, 4 blocks; width r scales the number of heads (head dim fixed), so the default
Split-Mix base (r = 1/8) on 8×8 digits is the reference "T0" of research/vit.md (D = 32, 4 heads,
MLP 64, patch 2, 17 tokens, 633,408 MACs).

Stacking follows ``models/blocks.py``: the k bases run as one batched computation on activations
laid out ``(k, B, N, D)`` (every token linear is one ``baddbmm``, attention runs on ``k·B``
sequences), and every parameter chunks along dim 0 into the tensors of a separately built base.
The qkv rows are head-major (head, q/k/v, head dim), so the leading rows of a wider model's qkv
are whole heads: HeteroFL-style leading slices (``models/slicing.py``) give a consistent
narrower ViT (timm's rows are q/k/v-major; converting its weights is a row permutation).

Options: dual LayerNorm (``dual_bn``: clean/adversarial affine paths, mixed by the robustness λ
through ``models.blocks.set_route``), AttnScale and FeatScale (arXiv 2203.05962, zero-initialised,
so off at round 0), and measurement helpers for over-smoothing (``patch_similarity``,
``high_frequency_ratio``) and attention-based regularisers (``attention_maps``).

One ViT, layers passed in (timm's ``Block(attn_layer=..., mlp_layer=..., norm_layer=...)``): the
simulation's stacked bases and a UVC-sliced base (``models/vit_sliced.py``) are both
:class:`VisionTransformer` / :class:`Block` and differ only in the layers they are built from.
As-ViT's topology search (``tools/asvit_scores.py``) scores this same network, one base of a
:class:`Topology`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import flop_counter

from models.blocks import DualBatchNorm, StackedConv2d, StackedLinear, StackedNet, expand_to_bases, scaled_channels
from models.registry import register_model

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon

# The layers a Block / VisionTransformer is built from, each called with the sizes of one layer
# and the number of stacked bases k (a layer that only exists for one base rejects k > 1).
NormLayer = Callable[[int, int], nn.Module]  # (dim, k): a norm over the last dim
AttnLayer = Callable[[int, int, int, bool], nn.Module]  # (dim, heads, k, attn_scale)
MlpLayer = Callable[[int, int, int], nn.Module]  # (dim, hidden, k)
LinearLayer = Callable[[int, int, int], nn.Linear | StackedLinear]  # (in, out, k): a token linear


def _register_cpu_sdpa_flops() -> None:
    """Let ``torch.utils.flop_counter`` (``models.cost.count_macs``) see fused attention on CPU.

    torch counts the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU flash kernel
    that ``F.scaled_dot_product_attention`` dispatches to for 4-D inputs, so a ViT would report
    no attention MACs at all. Same formula as torch's own (QKᵀ + AV as two bmm)."""
    registry = flop_counter.flop_registry
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in registry:
        registry[forward] = flop_counter.shape_wrapper(lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v))
    if backward is not None and backward not in registry:
        registry[backward] = flop_counter.shape_wrapper(
            lambda grad, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(grad, q, k, v)
        )


_register_cpu_sdpa_flops()


# ---------------------------------------------------------------------------------------------
# stacked layers on (k, B, ..., features) activations


class TokenLinear(StackedLinear):
    """k independent linear layers on per-base token tensors ``(k, B, ..., in)`` → ``(k, B, ..., out)``.

    Same parameter layout as :class:`StackedLinear` (weight ``(k·out, in)``), so pruning and
    Split-Mix helpers treat it alike; one ``baddbmm`` over the k bases.
    """

    def reset_parameters(self) -> None:
        # Fan-in scaled (LeCun) normal, std 1/sqrt(fan_in), not timm's fixed std 0.02: at base widths
        # (D = 32) std 0.02 gives each layer a gain of ~0.1, the CLS token's logits barely depend
        # on the image, and SGD (the clients' recipe) collapses to chance; a fan-in std keeps
        # every width trainable. Element-wise i.i.d., so every base is drawn independently.
        nn.init.trunc_normal_(self.weight, std=self.in_per_base**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, o, i = self.num_bases, self.out_per_base, self.in_per_base
        if k == 1:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(k, -1, i)
        weight = self.weight.view(k, o, i).transpose(1, 2)
        if self.bias is None:
            out = torch.bmm(flat, weight)
        else:
            out = torch.baddbmm(self.bias.view(k, 1, o), flat, weight)
        return out.view(*x.shape[:-1], o)


def _per_base(t: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(k·D,)`` per-base vector shaped to broadcast over ``(k, B, ..., D)``."""
    return t.view(k, *([1] * (like.dim() - 2)), -1)


class StackedLayerNorm(nn.Module):
    """k independent LayerNorms over the last dim of ``(k, B, ..., D)``; affine ``(k·D,)``."""

    is_layer_norm = True  # models.blocks.norm_state_keys: FedBN keeps these local

    def __init__(self, dim: int, num_bases: int = 1) -> None:
        super().__init__()
        self.dim, self.num_bases = dim, num_bases
        self.weight = nn.Parameter(torch.ones(num_bases * dim))
        self.bias = nn.Parameter(torch.zeros(num_bases * dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.num_bases
        return torch.addcmul(_per_base(self.bias, k, x), self.normalize(x), _per_base(self.weight, k, x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bases={self.num_bases}"


class DualLayerNorm(DualBatchNorm):
    """A clean and an adversarial LayerNorm behind one layer (dual BN's role in a ViT).

    Routed exactly like :class:`~models.blocks.DualBatchNorm` (``"clean"``, ``"adv"`` or a
    robustness λ: ``(1 − λ)·clean(x) + λ·adv(x)``). It subclasses DualBatchNorm only so that
    ``set_route``/``routed``/``recompute_bn_stats`` find it (they test ``isinstance``); it holds
    no batch norm and no running statistics. The adversarial path's tensors are named
    ``….adv.weight``/``….adv.bias``, which ``models.splitmix.is_adversarial_tensor`` recognises.
    """

    # Its paths are LayerNorms, not DualBatchNorm's batch norms: it borrows the routing only (see above).
    clean: StackedLayerNorm  # type: ignore[assignment]
    adv: StackedLayerNorm  # type: ignore[assignment]

    def __init__(self, dim: int, num_bases: int = 1) -> None:
        nn.Module.__init__(self)  # not DualBatchNorm.__init__: no batch norms here
        self.clean = StackedLayerNorm(dim, num_bases)
        self.adv = StackedLayerNorm(dim, num_bases)
        self.route = "clean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route == "clean" or route == 0.0:
            return self.clean(x)
        if route == "adv" or route == 1.0:
            return self.adv(x)
        # Both paths normalise identically; only the affine maps differ, so mix those.
        lam, k = float(route), self.clean.num_bases
        weight = (1.0 - lam) * self.clean.weight + lam * self.adv.weight
        bias = (1.0 - lam) * self.clean.bias + lam * self.adv.bias
        return torch.addcmul(_per_base(bias, k, x), self.clean.normalize(x), _per_base(weight, k, x))


# ---------------------------------------------------------------------------------------------
# attention with AttnScale


def attnscale_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor | None = None) -> torch.Tensor:
    """AttnScale through fused attention: ``(1 + ω)·SDPA(q, k, v) − ω·mean_tokens(v)``.

    Equals :func:`attnscale_explicit` because ``A_DC·v`` is the token mean of v for every query.
    ``omega`` broadcasts against the output (e.g. ``(H, 1, 1)`` for ``(B, H, N, d)``).
    """
    out = F.scaled_dot_product_attention(q, k, v)
    if omega is None:
        return out
    return (1.0 + omega) * out - omega * v.mean(dim=-2, keepdim=True)


def attnscale_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnScale with the attention matrix: ``Â = A_DC + (1 + ω)(A − A_DC)``, ``A_DC = 1/N``.

    Returns ``(Â·v, Â)``; with ``omega=None`` plain softmax attention and its matrix."""
    attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    if omega is not None:
        dc = 1.0 / attn.shape[-1]
        attn = dc + (1.0 + omega) * (attn - dc)
    return attn @ v, attn


class Attention(nn.Module):
    """Multi-head self-attention of k stacked bases; fused SDPA unless the matrix is asked for.

    ``record = True`` computes the attention matrix explicitly and keeps it (with its graph) in
    ``last_attention`` as ``(k, B, H, N, N)``: the matrix actually applied (Â with AttnScale).
    ``explicit = True`` takes the same explicit path without keeping the matrix: torch has no
    forward-mode AD for CPU fused attention, and As-ViT's length distortion is a ``jvp``.
    """

    def __init__(self, dim: int, num_heads: int, num_bases: int, attn_scale: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_bases = num_heads, dim // num_heads, num_bases
        self.qkv = TokenLinear(dim, 3 * dim, num_bases)  # rows: (head, q/k/v, head dim)
        self.proj = TokenLinear(dim, dim, num_bases)
        self.omega = nn.Parameter(torch.zeros(num_bases * num_heads)) if attn_scale else None
        self.record = False
        self.explicit = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(k, b, n, h, 3, d).permute(4, 0, 1, 3, 2, 5).reshape(3, k * b, h, n, d)
        q, key, v = qkv.unbind(0)
        omega = None
        if self.omega is not None:
            omega = self.omega.view(k, 1, h, 1, 1).expand(k, b, h, 1, 1).reshape(k * b, h, 1, 1)
        if self.record or self.explicit:
            out, attn = attnscale_explicit(q, key, v, omega)
            if self.record:
                self.last_attention = attn.view(k, b, h, n, n)
        else:
            out = attnscale_fused(q, key, v, omega)
        return self.proj(out.view(k, b, h, n, d).transpose(2, 3).reshape(k, b, n, h * d))


class FeatScale(nn.Module):
    """FeatScale on the attention-branch output: ``z + s_dc·DC(z) + s_hf·HC(z)`` (applied once).

    ``DC(z)`` is the token mean (CLS included), ``HC(z) = z − DC(z)``; the per-channel scales
    start at 0, so the branch is unchanged at initialisation.
    """

    def __init__(self, dim: int, num_bases: int) -> None:
        super().__init__()
        self.num_bases = num_bases
        self.dc = nn.Parameter(torch.zeros(num_bases * dim))
        self.hf = nn.Parameter(torch.zeros(num_bases * dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = self.num_bases
        dc = z.mean(dim=-2, keepdim=True)
        return z + _per_base(self.dc, k, z) * dc + _per_base(self.hf, k, z) * (z - dc)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``; ``linear_layer`` picks stacked token linears or torch's own."""

    def __init__(self, dim: int, hidden: int, num_bases: int, linear_layer: LinearLayer = TokenLinear) -> None:
        super().__init__()
        self.fc1 = linear_layer(dim, hidden, num_bases)
        self.fc2 = linear_layer(hidden, dim, num_bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + FS(Attn(LN(x)))``, then ``x + MLP(LN(x))``.

    The layers are passed in, as in timm, so that every ViT variant is this one block: the
    stacked bases (the defaults; ``norm_layer=DualLayerNorm`` for dual LN) and a UVC-sliced block
    (its attention keeps per-head value dims).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        num_bases: int = 1,
        attn_scale: bool = False,
        feat_scale: bool = False,
        *,
        norm_layer: NormLayer = StackedLayerNorm,
        attn_layer: AttnLayer = Attention,
        mlp_layer: MlpLayer = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, num_bases)
        self.attn = attn_layer(dim, num_heads, num_bases, attn_scale)
        self.featscale = FeatScale(dim, num_bases) if feat_scale else None
        self.norm2 = norm_layer(dim, num_bases)
        self.mlp = mlp_layer(dim, hidden, num_bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.attn(self.norm1(x))
        if self.featscale is not None:
            z = self.featscale(z)
        x = x + z
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# the model


def default_patch_size(image_size: int) -> int:
    """Patch 2 for 8×8 digits (16 patches), 4 for 28×28 / 32×32 (49 / 64 patches)."""
    return 2 if image_size <= 16 else 4


class VisionTransformer(StackedNet):
    """k stacked ViT bases; ``embed_dim``/``num_heads`` are the width-1 sizes, scaled by ``width``.

    ``dual_bn`` (named as for the conv families, so ``SplitMixSpec`` builds it unchanged) gives
    every LayerNorm a clean and an adversarial path. ``patch_size=None`` picks 2 for 8×8 inputs
    and 4 above.

    The layers are passed in (``norm_layer``, ``attn_layer``, ``mlp_layer``, ``head_layer``; by
    default the stacked ones); each layer keeps its own init (fan-in normal token linears) and the
    classifier starts at zero.
    """

    def __init__(
        self,
        width: float = 1.0,
        num_bases: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        dual_bn: bool = False,
        patch_size: int | None = None,
        depth: int = 4,
        embed_dim: int = 256,
        num_heads: int = 32,
        mlp_ratio: float = 2.0,
        attn_scale: bool = False,
        feat_scale: bool = False,
        *,
        norm_layer: NormLayer | None = None,
        attn_layer: AttnLayer = Attention,
        mlp_layer: MlpLayer = Mlp,
        head_layer: LinearLayer = TokenLinear,
    ) -> None:
        super().__init__()
        if norm_layer is not None and dual_bn:
            raise ValueError("dual_bn picks the norm layer (DualLayerNorm); pass either dual_bn or norm_layer")
        norm_layer = norm_layer or (DualLayerNorm if dual_bn else StackedLayerNorm)
        patch = patch_size or default_patch_size(image_size)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        head_dim = embed_dim // num_heads
        heads = scaled_channels(num_heads, width)  # width scales heads; head dim is fixed
        dim = heads * head_dim
        hidden = max(1, int(round(dim * mlp_ratio)))
        k = num_bases
        self.num_bases, self.num_classes = k, num_classes
        self.embed_dim, self.num_heads, self.patch_size = dim, heads, patch
        self.num_tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = StackedConv2d(in_channels, dim, patch, k, stride=patch, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(k, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(k, self.num_tokens, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # before the blocks are built: the RNG order every seeded run has used
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads, hidden, k, attn_scale, feat_scale, norm_layer=norm_layer, attn_layer=attn_layer, mlp_layer=mlp_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(dim, k)
        self.head = head_layer(dim, num_classes, k)
        # Zero classifier (as in timm's jax init): logits start at 0 and the backbone gets no
        # gradient until the head has picked informative directions, which keeps SGD at the
        # clients' learning rates (0.05) out of the early collapse onto a constant token.
        nn.init.zeros_(self.head.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` (shared) or ``(B, k, C, H, W)`` (per base) → tokens ``(k, B, N, D)``."""
        k, d = self.num_bases, self.embed_dim
        x = self.patch_embed(expand_to_bases(x, k))  # (B, k·D, h, w)
        b = x.shape[0]
        x = x.reshape(b, k, d, -1).permute(1, 0, 3, 2)  # (k, B, patches, D)
        x = torch.cat([self.cls_token.unsqueeze(1).expand(k, b, 1, d), x], dim=2)
        return x + self.pos_embed.unsqueeze(1)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens ``(k, B, N, D)`` after every block (with their graph)."""
        tokens, outs = self.embed(x), []
        for block in self.blocks:
            tokens = block(tokens)
            outs.append(tokens)
        return outs

    def forward_with_tokens(
        self, x: torch.Tensor, record_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One forward pass that also returns what the diversity regularizers look at:
        logits ``(B, k, classes)``, tokens after the embedding and after the last block
        ``(k, B, N, D)``, and (``record_attention``) block 1's attention ``(k, B, H, N, N)``."""
        first = tokens = self.embed(x)
        attn0 = cast(Attention, self.blocks[0].attn)  # the stacked blocks' attention (it records its matrix)
        attn0.record = record_attention
        try:
            for block in self.blocks:
                tokens = block(tokens)
            attention = attn0.last_attention
        finally:
            attn0.record, attn0.last_attention = False, None
        logits = self.head(self.norm(tokens[:, :, 0])).transpose(0, 1)
        return logits, first, tokens, attention

    def qkv_matrices(self) -> list[torch.Tensor]:
        """Every block's fused q/k/v weight per base as ``(3D, D)`` with W_q, W_k, W_v stacked in
        that order (the stored rows interleave heads: (head, q/k/v, head dim))."""
        k, h, d, dim = self.num_bases, self.num_heads, self.embed_dim // self.num_heads, self.embed_dim
        out: list[torch.Tensor] = []
        for block in self.blocks:
            w = cast(Attention, block.attn).qkv.weight.view(k, h, 3, d, dim).permute(0, 2, 1, 3, 4).reshape(k, 3 * h * d, dim)
            out.extend(w.unbind(0))
        return out

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        logits = self.head(self.norm(tokens[:, :, 0]))  # CLS token, (k, B, classes)
        return logits.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# a base's topology (what As-ViT's search chooses)


@dataclass(frozen=True)
class Topology:
    """A plain ViT topology (what As-ViT's search chooses); ``dim`` must be a multiple of ``heads``."""

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float

    def __post_init__(self) -> None:
        if min(self.patch, self.dim, self.depth, self.heads) < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"invalid topology {self}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> Topology:
        return cls(int(d["patch"]), int(d["dim"]), int(d["depth"]), int(d["heads"]), float(d["mlp_ratio"]))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"p{self.patch}-d{self.dim}-L{self.depth}-h{self.heads}-m{self.mlp_ratio:g}"


TopologyLike = Topology | Mapping[str, float]


def as_topology(t: TopologyLike) -> Topology:
    return t if isinstance(t, Topology) else Topology.from_dict(t)


# ---------------------------------------------------------------------------------------------
# measurement helpers


def patch_similarity(model: VisionTransformer, x: torch.Tensor, per_base: bool = False) -> torch.Tensor:
    """Mean pairwise cosine similarity of the patch tokens (CLS excluded) after each block.

    Over-smoothing shows as values rising towards 1 with depth. Returns ``(depth,)`` averaged over
    the batch and the bases, or ``(depth, k)`` with ``per_base``. Differentiable (wrap it in
    ``torch.no_grad()`` to measure only).
    """
    sims = []
    for tokens in model.block_outputs(x):
        unit = F.normalize(tokens[:, :, 1:], dim=-1)  # (k, B, n, D)
        n = unit.shape[2]
        total = unit.sum(dim=2).pow(2).sum(dim=-1)  # ‖Σ t̂‖² = n + Σ_{i≠j} cos
        sims.append(((total - n) / (n * (n - 1))).mean(dim=1))  # (k,)
    out = torch.stack(sims)
    return out if per_base else out.mean(dim=1)


def high_frequency_ratio(model: VisionTransformer, x: torch.Tensor, per_base: bool = False) -> torch.Tensor:
    """‖HC[X_l]‖_F / ‖X_l‖_F after each block (HC = tokens minus their mean, CLS included):
    the share of the signal attention's low-pass filtering has not removed yet."""
    ratios = []
    for tokens in model.block_outputs(x):
        hc = tokens - tokens.mean(dim=2, keepdim=True)
        ratios.append((hc.flatten(2).norm(dim=-1) / tokens.flatten(2).norm(dim=-1)).mean(dim=1))
    out = torch.stack(ratios)
    return out if per_base else out.mean(dim=1)


def attention_maps(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """The attention matrices of every block for ``x``, each ``(B, k, H, N, N)`` (with graph).

    Runs one forward pass with explicit attention (fused SDPA exposes no matrix); with AttnScale
    these are the rescaled matrices Â that are applied."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attns:
        m.record = True
    try:
        model.forward_bases(x)
        maps = [cast(torch.Tensor, m.last_attention).transpose(0, 1) for m in attns]  # recorded by the forward pass
    finally:
        for m in attns:
            m.record, m.last_attention = False, None
    return maps


# ---------------------------------------------------------------------------------------------
# registry


@register_model("vit")
def vit(width: float = 1.0, **kwargs) -> VisionTransformer:
    return VisionTransformer(width=width, **kwargs)


@register_model("vit_attnscale")
def vit_attnscale(width: float = 1.0, **kwargs) -> VisionTransformer:
    return VisionTransformer(width=width, attn_scale=True, **kwargs)


@register_model("vit_featscale")
def vit_featscale(width: float = 1.0, **kwargs) -> VisionTransformer:
    return VisionTransformer(width=width, feat_scale=True, **kwargs)
