"""Diversity regularizers for ViTs (Diverse-ViT, arXiv 2203.06345) as client loss terms.

The paper reduces redundancy at three levels: patch embeddings (within the last layer, and
between the first and last layer), attention heads (block 1) and weights (the q/k/v
projections). Each term here is a plain function of tensors, so it works with any ViT that
exposes them: the token sequence after patch + position embedding, the last block's output
before the final LayerNorm, block 1's post-softmax attention, and the ``attn.qkv`` weights.

Formulas follow the reference code (VITA-Group/Diverse-ViT ``reg.py``); ĥ = h / max(‖h‖, 1e-8),
"patches" are the tokens after dropping the ``prefix_tokens`` leading ones (CLS):

- :func:`patch_cosine_diversity` — ``mean_{b,i,j} ⟨ĥ_i, ĥ_j⟩`` over the n×n patch matrix of
  the last layer, diagonal included, signed (``Loss_cosine``).
- :func:`patch_contrastive_diversity` — ``S_ij = ⟨ĥ¹_i, ĥ^L_j⟩``;
  ``mean_{b,i} −log(e^{S_ii} / (e^{S_ii} + e^{mean_{j≠i} S_ij}))`` (``Loss_contrastive``).
- :func:`attention_head_diversity` — ``mean_{b,h,h'} ⟨â_h, â_h'⟩`` with ``a_h = vec(A_h)``
  (``Loss_cosine_attn``).
- :func:`weight_condition_loss` — ``Σ (σ_max² − σ_min²)²`` over the W_q, W_k, W_v chunks of each
  qkv weight (``Loss_condition_orth_weight``). The reference estimates the two eigenvalues of
  MᵀM with one power-iteration step from a random vector, which is noisy and gives 0/0 = NaN
  for an exactly orthogonal M; here they are the exact singular values (``svdvals``, whose
  gradient is stable even for repeated values).

The released DeiT-S script (``script/run_deit_small_diverse.sh``) sets these four terms to
0.5, 0.5, 1e-4, 5e-4 (:meth:`DiversityConfig.released_regularizers`) **and** ``--mixing_coef 1``:
a patch-wise CutMix term (``mix.py``'s ``Mixup_diversity`` gives every patch the label of the
image it was cut from; ``reg.py``'s ``Loss_mixing`` adds the soft-target cross-entropy of every
patch token's logits to the CLS loss and divides the sum by the token count). That term is not
implemented here (our ViTs classify the CLS token only and the clients' recipe has no mixing),
so no preset claims the released configuration; the four coefficients are for DeiT-S and tiny
models will need retuning. All default to 0 (off).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn import functional as F

from splitmix.sections import ConfigError, Section, option, section_fields
from techniques.base import ClientRound, RoundHooks, Technique, register_technique

if TYPE_CHECKING:
    from models.vit import VisionTransformer
    from splitmix.config import RunConfig

_EPS = 1e-8


def _unit(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, as the reference does: ``h / max(‖h‖, 1e-8)``."""
    return h / h.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _patches(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (batch, tokens, dim), got shape {tuple(tokens.shape)}")
    return tokens[:, prefix_tokens:]


def patch_cosine_diversity(tokens: torch.Tensor, prefix_tokens: int = 1, include_diagonal: bool = True) -> torch.Tensor:
    """Mean pairwise cosine similarity of the patch tokens of one layer (lower = more diverse).

    ``L_cos = mean_{b,i,j} ⟨ĥ_{b,i}, ĥ_{b,j}⟩`` over all n×n pairs, **diagonal included** and
    signed, as in the reference; so n identical tokens give 1 and n orthonormal ones give 1/n.
    ``include_diagonal=False`` averages the n(n−1) off-diagonal pairs only (orthonormal → 0).
    ``tokens`` is ``(B, N, D)``; the first ``prefix_tokens`` (CLS) are dropped.
    """
    h = _unit(_patches(tokens, prefix_tokens))
    sim = h @ h.transpose(1, 2)  # (B, n, n)
    if include_diagonal:
        return sim.mean()
    n = sim.shape[-1]
    if n < 2:
        raise ValueError("need at least two patch tokens for off-diagonal similarity")
    off = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)
    return (off / (n * (n - 1))).mean()


def patch_contrastive_diversity(first: torch.Tensor, last: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """Cross-layer patch contrastive loss: a late token should stay closest to its own early token.

    With ``S_ij = ⟨ĥ¹_{b,i}, ĥ^L_{b,j}⟩`` (first-layer patch i vs last-layer patch j), the
    positive is ``S_ii`` and the negatives are averaged **inside one exponential** (reference
    code, temperature 1):

        L_con = mean_{b,i} −log( e^{S_ii} / (e^{S_ii} + e^{(1/(n−1)) Σ_{j≠i} S_ij}) )
              = mean_{b,i} softplus(neg_i − S_ii).

    Gradients flow into both layers. Orthonormal tokens with H¹ = H^L give log(1 + e⁻¹).
    """
    h1 = _unit(_patches(first, prefix_tokens))
    hl = _unit(_patches(last, prefix_tokens))
    if h1.shape != hl.shape:
        raise ValueError(f"first and last layer tokens differ in shape: {tuple(h1.shape)} vs {tuple(hl.shape)}")
    n = h1.shape[1]
    if n < 2:
        raise ValueError("need at least two patch tokens for the contrastive term")
    sim = h1 @ hl.transpose(1, 2)  # (B, n, n)
    pos = sim.diagonal(dim1=1, dim2=2)
    neg = (sim.sum(-1) - pos) / (n - 1)
    return F.softplus(neg - pos).mean()


def attention_head_diversity(attention: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the heads' attention maps of one block.

    ``a_{b,h} = vec(A_{b,h}) ∈ ℝ^{N²}``; ``L_attn = mean_{b,h,h'} ⟨â_{b,h}, â_{b,h'}⟩``, diagonal
    included (identical heads → 1; heads with disjoint supports → 1/H). ``attention`` is the
    post-softmax map ``(B, H, N, N)``; the reference uses block 1 only.
    """
    if attention.dim() != 4:
        raise ValueError(f"attention must be (batch, heads, N, N), got shape {tuple(attention.shape)}")
    a = _unit(attention.flatten(2))  # (B, H, N²)
    return (a @ a.transpose(1, 2)).mean()


def condition_number(weight: torch.Tensor) -> torch.Tensor:
    """Exact condition number ``σ_max / σ_min`` of a matrix (inf when it is singular)."""
    s = torch.linalg.svdvals(weight)
    return s[..., 0] / s[..., -1]


def weight_condition_loss(weights: Iterable[torch.Tensor], chunks: int = 3) -> torch.Tensor:
    """Weight conditioning penalty from exact singular values (0 iff each chunk is c·orthogonal).

    Each weight is split along dim 0 into ``chunks`` blocks (3 for a fused ``attn.qkv.weight``
    of shape (3D, D) → W_q, W_k, W_v; 1 for a plain matrix). For each block M (used transposed,
    as the reference does; singular values do not change):

        L_w = Σ_blocks (λ_max(MᵀM) − λ_min(MᵀM))² = Σ_blocks (σ_max² − σ_min²)²

    so diag(3, 2, 1) → (9 − 1)² = 64 and c·Q (Q orthogonal) → 0.
    """
    total: torch.Tensor | None = None
    for w in weights:
        for m in torch.chunk(w, chunks, dim=0):
            s = torch.linalg.svdvals(m.transpose(-2, -1))
            term = (s[0].square() - s[-1].square()).square()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("weight_condition_loss needs at least one weight")
    return total


def qkv_weights(model: nn.Module, suffix: str = "attn.qkv.weight") -> list[torch.Tensor]:
    """The fused q/k/v weights of every block, found by timm's parameter name."""
    return [p for name, p in model.named_parameters() if name.endswith(suffix)]


@dataclass(frozen=True)
class DiversityConfig:
    """Coefficient of each diversity term (0 = off: the term is not even computed)."""

    patch_cosine: float = 0.0
    patch_contrastive: float = 0.0
    attention_heads: float = 0.0
    weight_condition: float = 0.0
    prefix_tokens: int = 1  # leading non-patch tokens (CLS) dropped by the patch terms

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"diversity coefficient '{f.name}' must be >= 0, got {value}")

    @classmethod
    def released_regularizers(cls) -> DiversityConfig:
        """The released DeiT-S script's coefficients of these four terms (0.5 / 0.5 / 1e-4 / 5e-4),
        without its patch-wise CutMix term (``--mixing_coef 1``, not implemented here)."""
        return cls(patch_cosine=0.5, patch_contrastive=0.5, attention_heads=1e-4, weight_condition=5e-4)

    @property
    def enabled(self) -> bool:
        return any((self.patch_cosine, self.patch_contrastive, self.attention_heads, self.weight_condition))


def diversity_terms(
    cfg: DiversityConfig,
    tokens_by_layer: Sequence[torch.Tensor] | None,
    attention_by_layer: Sequence[torch.Tensor] | None,
    weights: Iterable[torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The unweighted value of every enabled term (for logging); disabled terms are absent.

    ``tokens_by_layer[0]`` is H¹ (patch + position embedding, CLS included, the input to block
    1) and ``tokens_by_layer[-1]`` is H^L (last block output, before the final norm);
    ``attention_by_layer[0]`` is block 1's post-softmax attention; ``weights`` the qkv weights.
    """
    terms: dict[str, torch.Tensor] = {}
    if cfg.patch_cosine or cfg.patch_contrastive:
        if not tokens_by_layer:
            raise ValueError("patch diversity terms need tokens_by_layer")
        if cfg.patch_cosine:
            terms["patch_cosine"] = patch_cosine_diversity(tokens_by_layer[-1], cfg.prefix_tokens)
        if cfg.patch_contrastive:
            terms["patch_contrastive"] = patch_contrastive_diversity(tokens_by_layer[0], tokens_by_layer[-1], cfg.prefix_tokens)
    if cfg.attention_heads:
        if not attention_by_layer:
            raise ValueError("the attention-head term needs attention_by_layer")
        terms["attention_heads"] = attention_head_diversity(attention_by_layer[0])
    if cfg.weight_condition:
        if weights is None:
            raise ValueError("the weight-condition term needs weights")
        terms["weight_condition"] = weight_condition_loss(weights)
    return terms


def diversity_loss(
    cfg: DiversityConfig,
    tokens_by_layer: Sequence[torch.Tensor] | None,
    attention_by_layer: Sequence[torch.Tensor] | None,
    weights: Iterable[torch.Tensor] | None,
) -> torch.Tensor:
    """``Σ_term coefficient · term`` to add to the task loss; exactly 0 when every term is off."""
    terms = diversity_terms(cfg, tokens_by_layer, attention_by_layer, weights)
    if not terms:
        layers = tokens_by_layer or attention_by_layer
        ref = layers[0] if layers else None
        return torch.zeros((), device=ref.device, dtype=ref.dtype) if ref is not None else torch.zeros(())
    return sum(getattr(cfg, name) * value for name, value in terms.items())


def stacked_vit_diversity(cfg: DiversityConfig, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, k, classes)`` of a stacked ViT (``models/vit.py``) and its diversity loss,
    from the same forward pass.

    The k bases are independent networks with summed losses (``clients/recipe.py``), so each
    term is each base's value summed over the bases: the token/attention terms are computed on
    the bases folded into the batch (their mean) and multiplied by k; the weight term already
    sums over every base's W_q, W_k, W_v.
    """
    vit = cast("VisionTransformer", model)
    logits, first, last, attention = vit.forward_with_tokens(x, record_attention=cfg.attention_heads > 0)
    k, b, n, d = first.shape
    tokens = [first.reshape(k * b, n, d), last.reshape(k * b, n, d)]
    attn = [attention.reshape(k * b, *attention.shape[2:])] if attention is not None else None
    weights = vit.qkv_matrices() if cfg.weight_condition else None
    terms = diversity_terms(cfg, tokens, attn, weights)
    loss = torch.zeros((), device=logits.device, dtype=logits.dtype)
    for name, value in terms.items():
        loss = loss + getattr(cfg, name) * value * (1 if name == "weight_condition" else k)
    return logits, loss


# --------------------------------------------------------------------------- the technique plugin
@dataclass(frozen=True)
class DiversitySection(Section):
    patch_cosine: float = option(0.0, "ViT: weight of the patch-wise cosine term", key="diversity-patch-cosine", lo=0)
    patch_contrastive: float = option(0.0, "ViT: weight of the patch-wise contrastive term", key="diversity-patch-contrastive", lo=0)
    attention_heads: float = option(0.0, "ViT: weight of the attention-head diversity term", key="diversity-heads", lo=0)
    weight_condition: float = option(0.0, "ViT: weight of the q/k/v weight-condition term", key="diversity-condition", lo=0)

    def terms(self) -> DiversityConfig:
        return DiversityConfig(self.patch_cosine, self.patch_contrastive, self.attention_heads, self.weight_condition)


class _DiversityHooks(RoundHooks):
    def __init__(self, terms: DiversityConfig) -> None:
        self.forward = lambda model, x: stacked_vit_diversity(terms, model, x)


@register_technique
class Diversity(Technique[DiversitySection]):
    """Diverse-ViT loss terms on the clean forward pass of local training (summed over bases)."""

    name = "diversity"
    Config = DiversitySection

    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        return run.techniques[cls.name].terms().enabled  # type: ignore[attr-defined]

    @classmethod
    def check(cls, run: RunConfig) -> None:
        section = run.techniques[cls.name]
        on = [key for key, f in section_fields(type(section)) if getattr(section, f.name)]
        if on and not run.model.is_vit:
            raise ConfigError(
                f"config key '{on[0]}' needs a ViT model (model = vit, vit_attnscale or vit_featscale), not model = '{run.model.model}'"
            )

    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        return _DiversityHooks(self.config.terms())
