"""As-ViT (arXiv 2202.11921): training-free ViT topology search and scaling, for small plain ViTs.

The scoring, search and study behind ``splitmix search-topology`` (``tools/topology_search.py``).
It evaluates networks on inputs and data and trains them briefly (the Kendall study), so it is a
tool. The network it scores is the one ``simulate`` trains: one Split-Mix base,
:class:`models.vit.VisionTransformer` with a single base (its stacked layers; attention taken
through the explicit-softmax path, which forward-mode AD supports), described by a
:class:`models.vit.Topology`.

Two scores, computed at initialisation and averaged over ``repeats`` seeded inits, follow the
reference code (VITA-Group/AsViT ``lib/procedures/teg.py``, ``ntk.py``, ``search/grow.py``):

- **Length distortion** (expressivity, higher is better). A circle
  ``x(θ) = r·U[cos θ, sin θ]`` (r = 1 as in the reference) in input space (U: an orthonormal basis of a random plane,
  θ = linspace(0, 2π, n_pts)) is pushed through the network with **every LayerNorm replaced by
  Identity**; f = token features before the final norm, averaged over tokens. The reference sums
  ``‖∂f(x(θ))/∂θ‖`` over θ (no Δθ), which scales with n_pts; here that sum is divided by the same
  sum for the input curve (n_pts·r), i.e. the output/input curve-length ratio — rankings are
  unchanged. ∂f/∂θ is one forward-mode ``jvp`` per batch instead of one backward per coordinate.
- **NTK condition number** κ = λ_max/λ_min of Θ = GGᵀ (trainability, lower is better), with
  LayerNorms kept, g_i = ∂(Σ_d f_d(x_i))/∂W over the parameters whose name contains "weight"
  (the same features f; the classifier head gets no gradient), on a batch of 16 inputs.
  NaN or λ_min ≤ 0 ⇒ κ = inf ("bad", ranked last; the reference gives it the worst κ seen).

Initialisation for scoring: Kaiming-normal fan-in (teg.py's ``kaiming_normal_fanin_init``) on
every linear and the patch-embedding conv, biases 0, LayerNorms and tokens as built. The
reference defines that init in teg.py but its ``TEG.set_network`` re-applies the model's own
trunc-normal(0.02) (``_init_weights``); on our small bases 0.02 leaves the residual branches at
~0.02² of the stream, so heads and MLP ratio barely move either score (2 vs 4 heads: length
distortion 0.20741969 vs 0.20741967) — a deviation, chosen so that the shape being searched is
seen by the scores. ``init="model"`` scores the base with the init ``simulate`` trains from.

Search (the reference's ``reinforce.py`` samples shapes at a fixed hidden dim 32 and depth
[1, 1, 1, 1]): the candidates share one base embedding dim and one depth — the run's — and
differ in shape only (patch size, heads, MLP ratio); size is changed afterwards by
:func:`grow_topology` (``grow.py``'s loop, one stage) or :func:`scale_topology`.

Ranking (``grow.py``): each score is rounded to the precision ``grow.py`` declares for it
(``TYPE2ROUND``: κ 2 decimals, length distortion 5), then dense ranks of κ (ascending) and of
length distortion (descending), smallest rank sum first. grow.py declares that precision but
applies it only in a commented-out print, ranking the raw values; rounding before ranking is
our deviation, so that differences at noise level tie instead of deciding. Ties at the same rank
sum are broken by the metric with the larger relative range (max − min)/max over the
candidates, in its own direction (the reference compares only the first two tied candidates and
takes an argmin for both metrics); a complete tie keeps candidate order, as the reference's
argmin keeps the first.

:func:`kendall_study` scores candidates, trains each briefly on digits
(:func:`short_train_accuracy`, the base as ``simulate`` builds it) and reports Kendall τ
(:func:`kendall_tau`, τ-b) of each score against validation accuracy (test accuracy reported).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from models.blocks import StackedLinear
from models.cost import count_params
from models.registry import create_model
from models.vit import Attention, DualLayerNorm, StackedLayerNorm, Topology, TopologyLike, VisionTransformer, as_topology

if TYPE_CHECKING:
    from splitmix.data import ArrayData

# ----------------------------------------------------------------------------- the search space


def topology_grid(
    dim: int = 32,
    depth: int = 4,
    patch: Sequence[int] = (2, 4),
    heads: Sequence[int] = (1, 2, 4, 8),
    mlp_ratio: Sequence[float] = (2.0, 3.0, 4.0),
    image_size: int = 8,
) -> list[Topology]:
    """Every valid shape (patch, heads, MLP ratio) at one fixed base ``dim`` and ``depth``.

    Size is fixed so the search compares shapes, not sizes (the reference searches at a fixed
    hidden dim and depth); the defaults are the default Split-Mix base (dim 32, depth 4).
    """
    out = []
    for p, h, m in itertools.product(patch, heads, mlp_ratio):
        if image_size % p == 0 and dim % h == 0:
            out.append(Topology(p, dim, depth, h, float(m)))
    return out


def sample_topologies(n: int, seed: int, grid: Sequence[Topology]) -> list[Topology]:
    """``n`` distinct topologies drawn from ``grid`` with a seeded generator (all if n ≥ len)."""
    idx = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed))[:n]
    return [grid[i] for i in idx.tolist()]


# ----------------------------------------------------------------------------- the scored network


def build_base_vit(topology: TopologyLike, image_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """One Split-Mix base of ``topology``: the ViT ``simulate`` trains, built as simulate builds it
    (the model registry's ``vit``), one base."""
    t = as_topology(topology)
    return create_model(
        "vit",
        width=1.0,
        num_bases=1,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        patch_size=t.patch,
        depth=t.depth,
        embed_dim=t.dim,
        num_heads=t.heads,
        mlp_ratio=t.mlp_ratio,
    )


Builder = Callable[[Topology], nn.Module]
Features = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens after the last block, before the final norm, averaged over tokens (As-ViT's ``forward_features[1]``)."""
    return cast(VisionTransformer, model).block_outputs(x)[-1][0].mean(dim=1)


_NORMS = (nn.LayerNorm, StackedLayerNorm, DualLayerNorm)


def without_layernorm(model: nn.Module) -> nn.Module:
    """A deep copy with every LayerNorm replaced by ``nn.Identity`` (As-ViT ``switch_norm('id')``)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _NORMS):
                setattr(module, child_name, nn.Identity())
    return model


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run every :class:`Attention` through explicit softmax (jvp/vmap-able), restored after."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        m.explicit = True
    try:
        yield model
    finally:
        for m in layers:
            m.explicit = False


# ----------------------------------------------------------------------------- scores


def circle_inputs(shape: Sequence[int], n_pts: int, generator: torch.Generator, radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``x(θ) = r·U[cos θ, sin θ]`` on a random plane's circle and their tangents dx/dθ.

    ``shape`` is one input's (C, H, W); U holds the left singular vectors of a Gaussian
    (C·H·W)×2 matrix, so ``‖dx/dθ‖ = r`` everywhere. Returns two ``(n_pts, *shape)`` tensors.
    """
    u = torch.linalg.svd(torch.randn(math.prod(shape), 2, generator=generator), full_matrices=False)[0]
    theta = torch.linspace(0.0, 2 * math.pi, n_pts)
    pts = radius * torch.stack([theta.cos(), theta.sin()], 1) @ u.T
    tangents = radius * torch.stack([-theta.sin(), theta.cos()], 1) @ u.T
    return pts.reshape(n_pts, *shape), tangents.reshape(n_pts, *shape)


def curve_length(model: nn.Module, points: torch.Tensor, tangents: torch.Tensor, features: Features = pooled_features) -> float:
    """The reference's L^E = Σ_θ ‖∂f(x(θ))/∂θ‖₂ (no Δθ), by one forward-mode jvp."""
    with torch.no_grad():
        _, d = cast(tuple[torch.Tensor, torch.Tensor], jvp(lambda x: features(model, x), (points,), (tangents,)))  # no aux: a pair
    return float(d.flatten(1).norm(dim=1).sum())


def length_distortion(model: nn.Module, points: torch.Tensor, tangents: torch.Tensor, features: Features = pooled_features) -> float:
    """Output/input curve-length ratio of the circle through ``model`` with LayerNorm → Identity."""
    l_in = float(tangents.flatten(1).norm(dim=1).sum())
    return curve_length(without_layernorm(model), points, tangents, features) / l_in


def ntk_condition_number(model: nn.Module, inputs: torch.Tensor, features: Features = pooled_features) -> float:
    """κ = λ_max/λ_min of the empirical NTK of Σ_d f_d over the "weight" parameters (inf if bad)."""
    net = _FeatureNet(model, features)
    named = {k: v.detach() for k, v in net.named_parameters()}
    weights = {k: v for k, v in named.items() if "weight" in k}
    others = {k: v for k, v in named.items() if "weight" not in k}

    def scalar(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, {**w, **others}, (x.unsqueeze(0),)).sum()

    grads = vmap(grad(scalar), in_dims=(None, 0))(weights, inputs)
    g = torch.cat([t.reshape(inputs.shape[0], -1) for t in grads.values()], dim=1).double()
    eig = torch.linalg.eigvalsh(g @ g.T)
    kappa = float(eig[-1] / eig[0])
    return kappa if math.isfinite(kappa) and eig[0] > 0 else math.inf


class _FeatureNet(nn.Module):
    """``features(model, x)`` as a module, so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, features: Features):
        super().__init__()
        self.model, self.features = model, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.model, x)


@dataclass(frozen=True)
class TopologyScore:
    """Both training-free scores of one topology (means over the seeded inits) and its size."""

    topology: Topology
    length_distortion: float  # higher is better
    ntk_cond: float  # lower is better; inf = bad gradients
    params: int
    rank_length: int = -1
    rank_ntk: int = -1

    @property
    def rank_sum(self) -> int:
        return self.rank_length + self.rank_ntk


def _init_seed(seed: int, repeat: int) -> int:
    return (seed * 1_000_003 + repeat * 7919 + 12345) % (2**63)


INITS = ("kaiming", "model")
# grow.py's TYPE2ROUND: decimals each score is compared at ('exp' = length distortion, 'ntk' = κ)
ROUND = {"length_distortion": 5, "ntk_cond": 2}


def reinit_kaiming(model: nn.Module) -> nn.Module:
    """teg.py's ``kaiming_normal_fanin_init``: Kaiming-normal (fan-in, ReLU gain) weights, zero biases, in place.

    Applied to every ``nn.Linear``, conv (the patch embedding) and stacked token linear; norms and
    the CLS/position tokens keep their init, as in the reference.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, StackedLinear)):
            nn.init.kaiming_normal_(cast(torch.Tensor, m.weight), mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(cast(torch.Tensor, m.bias))
    return model


def score_topology(
    topology: TopologyLike,
    seed: int = 0,
    *,
    repeats: int = 3,
    n_pts: int = 64,
    ntk_inputs: torch.Tensor | None = None,
    input_shape: Sequence[int] = (1, 8, 8),
    radius: float = 1.0,
    init: str = "kaiming",
    build: Builder | None = None,
    features: Features = pooled_features,
) -> TopologyScore:
    """Length distortion and NTK κ of ``topology``, each averaged over ``repeats`` inits.

    Deterministic for a seed: repeat r uses init seed f(seed, r) (global RNG forked, so the
    caller's stream is untouched) and circle r drawn from the same seed, so every candidate is
    scored on the same circles. Scores are computed in float64: κ of a tiny ViT at init reaches
    1e7–1e12, where float32 gradients would leave λ_min to rounding noise. ``ntk_inputs``
    default: 16 uniform-noise images from the seed (data-free; the reference uses one batch of
    real training images — pass a public batch, never client data). ``init``: "kaiming"
    (:func:`reinit_kaiming`, the default) or "model" (the init ``simulate`` trains from).
    ``build`` default: :func:`build_base_vit` for ``input_shape``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got '{init}'")
    t = as_topology(topology)
    if build is None:
        build = lambda top: build_base_vit(top, image_size=input_shape[-1], in_channels=input_shape[0])  # noqa: E731
    if ntk_inputs is None:
        ntk_inputs = torch.rand(16, *input_shape, generator=torch.Generator().manual_seed(seed))
    les, kappas, params = [], [], 0
    for r in range(repeats):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_init_seed(seed, r))
            model = build(t)
            if init == "kaiming":
                reinit_kaiming(model)
        model = model.double().eval()  # eval: no dropout / batch statistics in the scores
        params = count_params(model)
        pts, tan = circle_inputs(input_shape, n_pts, torch.Generator().manual_seed(_init_seed(seed, r) + 1), radius)
        with explicit_attention(model):
            le = length_distortion(model, pts.double(), tan.double(), features)
            les.append(le if math.isfinite(le) else -math.inf)
            kappas.append(ntk_condition_number(model, ntk_inputs.double(), features))
    return TopologyScore(t, sum(les) / repeats, sum(kappas) / repeats, params)


def _dense_ranks(values: Sequence[float], descending: bool) -> list[int]:
    """Rank 0 = best; equal values share a rank and the next distinct value gets +1 (reference)."""
    distinct = sorted(set(values), reverse=descending)
    position = {v: i for i, v in enumerate(distinct)}
    return [position[v] for v in values]


def _relative_range(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2 or max(finite) == 0:
        return 0.0
    return (max(finite) - min(finite)) / abs(max(finite))


def _rounded(value: float, metric: str) -> float:
    return round(value, ROUND[metric]) if math.isfinite(value) else value


def rank_scores(scores: Sequence[TopologyScore]) -> list[TopologyScore]:
    """Best first by rank sum of (length distortion ↓, κ ↑), each rounded as grow.py declares;
    ties by the wider-ranging metric, then candidate order."""
    les = [_rounded(s.length_distortion, "length_distortion") for s in scores]
    kappas = [_rounded(s.ntk_cond, "ntk_cond") for s in scores]
    r_le, r_k = _dense_ranks(les, descending=True), _dense_ranks(kappas, descending=False)
    ranked = [(replace(s, rank_length=a, rank_ntk=b), le, kappa) for s, a, b, le, kappa in zip(scores, r_le, r_k, les, kappas)]
    by_ntk = _relative_range(kappas) > _relative_range(les)
    ranked.sort(key=lambda item: (item[0].rank_sum, item[2] if by_ntk else -item[1]))  # stable for full ties
    return [item[0] for item in ranked]


@dataclass(frozen=True)
class SearchResult:
    best: Topology
    ranked: list[TopologyScore]  # best first
    seconds: float


def search_topology(
    candidates: Sequence[TopologyLike],
    seed: int = 0,
    *,
    max_params: int | None = None,
    **score_kw,
) -> SearchResult:
    """Score every candidate (:func:`score_topology` keywords), drop those over ``max_params``, rank.

    ``ranked[0]`` / ``best`` is the seed topology.
    """
    start = time.perf_counter()
    scores = [score_topology(c, seed, **score_kw) for c in candidates]
    if max_params is not None:
        scores = [s for s in scores if s.params <= max_params]
    if not scores:
        raise ValueError("no candidate topology fits the parameter budget")
    ranked = rank_scores(scores)
    return SearchResult(ranked[0].topology, ranked, time.perf_counter() - start)


# ----------------------------------------------------------------------------- scaling


def _round_dim(dim: float, heads: int) -> int:
    return max(heads, int(round(dim / heads)) * heads)


def scale_topology(topology: TopologyLike, factor: float) -> Topology:
    """Grow (factor > 1) or shrink ``topology`` to about ``factor`` × its parameters, in one step.

    Simplification of As-ViT's grow loop: a block holds ≈ (4 + 2·mlp_ratio)·dim² parameters,
    so params ∝ depth·dim²; the factor is split evenly (in log) between depth and width:
    depth × √factor and dim × factor^¼ (rounded to a multiple of heads). Patch, heads and MLP
    ratio are kept. Use :func:`grow_topology` for the score-driven rule.
    """
    if factor <= 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    t = as_topology(topology)
    depth = max(1, int(round(t.depth * math.sqrt(factor))))
    return replace(t, depth=depth, dim=_round_dim(t.dim * factor**0.25, t.heads))


def grow_candidates(topology: Topology, ratios: Sequence[float] = (0.05, 0.10, 0.15, 0.20)) -> list[Topology]:
    """One grow step: {+1 block, +0 blocks} × {dim × (1 + r)}, r ∈ {0} ∪ ratios, minus "no change".

    As-ViT's candidates add one block to one of 4 stages *and* widen by r (16 candidates); a
    plain ViT has one stage, so "widen only" is added to keep a depth-vs-width choice.
    """
    out: list[Topology] = []
    for extra in (1, 0):
        for r in (0.0, *ratios):
            dim = topology.dim if r == 0 else max(topology.dim + topology.heads, _round_dim(topology.dim * (1 + r), topology.heads))
            cand = replace(topology, depth=topology.depth + extra, dim=dim)
            if cand != topology and cand not in out:
                out.append(cand)
    return out


def grow_topology(
    start: TopologyLike,
    target_params: int,
    seed: int = 0,
    hard_limit: int | None = None,
    max_steps: int = 32,
    **score_kw,
) -> list[TopologyScore]:
    """As-ViT's greedy grow loop: each step keeps the best-ranked candidate of :func:`grow_candidates`.

    Candidates over ``hard_limit`` params are dropped (reference: 110M); the loop stops once
    ``target_params`` is reached (reference: 80M) or nothing fits. Returns the family, start first;
    params increase strictly.
    """
    t = as_topology(start)
    family = [search_topology([t], seed, **score_kw).ranked[0]]
    while family[-1].params < target_params and len(family) <= max_steps:
        try:
            step = search_topology(grow_candidates(family[-1].topology), seed, max_params=hard_limit, **score_kw)
        except ValueError:
            break
        family.append(step.ranked[0])
    return family


# ----------------------------------------------------------------------------- correlation study


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b (ties corrected, as ``scipy.stats.kendalltau``); NaN if either is constant.

    τ_b = Σ_{i<j} sgn(a_i − a_j)·sgn(b_i − b_j) / √(#pairs untied in a · #pairs untied in b).
    """
    if len(a) != len(b):
        raise ValueError(f"sequences differ in length: {len(a)} vs {len(b)}")
    num = untied_a = untied_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            sa = (a[i] > a[j]) - (a[i] < a[j])
            sb = (b[i] > b[j]) - (b[i] < b[j])
            num += sa * sb
            untied_a += sa != 0
            untied_b += sb != 0
    denom = math.sqrt(untied_a * untied_b)
    return num / denom if denom else math.nan


def digits_splits(seed: int = 0, val_fraction: float = 0.2) -> tuple[ArrayData, ArrayData, ArrayData]:
    """(fit, validation, test) of the embedded digits: the train split cut by a seeded permutation."""
    from splitmix.data import ArrayData, load_split

    train, test = load_split("digits", "", True), load_split("digits", "", False)
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(order)))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    return ArrayData(train.x[fit_idx], train.y[fit_idx]), ArrayData(train.x[val_idx], train.y[val_idx]), test


def short_train_accuracy(
    topology: TopologyLike,
    data: tuple[ArrayData, ArrayData, ArrayData],
    steps: int = 150,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
) -> tuple[float, float]:
    """(validation, test) accuracy of one base after ``steps`` AdamW steps (cosine lr).

    The base is built as ``simulate`` builds it (:func:`build_base_vit`, its own init), from a
    seed; ``data`` is ``(fit, validation, test)`` with ``.x`` (N, C, H, W) and ``.y``.
    """
    fit, val, test = data
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_init_seed(seed, 0) + 2)
        model = build_base_vit(topology, image_size=fit.x.shape[-1], in_channels=fit.x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(fit.y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(fit.x[idx]), fit.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return tuple(float((model(d.x).argmax(1) == d.y).float().mean()) for d in (val, test))  # type: ignore[return-value]


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


def kendall_study(
    candidates: Sequence[TopologyLike],
    steps: int = 150,
    seed: int = 0,
    train_seeds: int = 2,
    repeats: int = 3,
    n_pts: int = 64,
    data: tuple[ArrayData, ArrayData, ArrayData] | None = None,
    init: str = "kaiming",
    lr: float = 1e-2,
) -> dict[str, Any]:
    """Training-free scores vs short-training accuracy on ``candidates``, with Kendall τ of each.

    The NTK batch is 16 fit images (the reference uses real training images). Each candidate is
    trained from ``train_seeds`` seeds; τ is taken against the mean validation accuracy, and
    against the mean test accuracy for the report only (nothing here is chosen on test data).
    τ is reported for length distortion, −κ, −rank sum and parameter count.
    """
    data = data if data is not None else digits_splits(seed)
    fit = data[0]
    idx = torch.randperm(len(fit.y), generator=torch.Generator().manual_seed(seed))[:16]
    start = time.perf_counter()
    result = search_topology(candidates, seed, repeats=repeats, n_pts=n_pts, ntk_inputs=fit.x[idx], input_shape=tuple(fit.x.shape[1:]), init=init)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for s in result.ranked:
        accs = [short_train_accuracy(s.topology, data, steps, seed + i, lr=lr) for i in range(train_seeds)]
        rows.append(
            {
                **s.topology.to_dict(),
                "name": str(s.topology),
                "params": s.params,
                "length_distortion": s.length_distortion,
                "ntk_cond": s.ntk_cond,
                "rank_sum": s.rank_sum,
                "val_accuracy": _mean_std([a[0] for a in accs]),
                "test_accuracy": _mean_std([a[1] for a in accs]),
            }
        )
    train_s = time.perf_counter() - start
    taus: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        acc = [r[f"{split}_accuracy"]["mean"] for r in rows]
        taus[split] = {
            "length_distortion": kendall_tau([r["length_distortion"] for r in rows], acc),
            "neg_ntk_cond": kendall_tau([-r["ntk_cond"] for r in rows], acc),
            "neg_rank_sum": kendall_tau([-r["rank_sum"] for r in rows], acc),
            "params": kendall_tau([r["params"] for r in rows], acc),
        }
    return {"rows": rows, "best": str(result.best), "tau": taus, "score_seconds": score_s, "train_seconds": train_s}
