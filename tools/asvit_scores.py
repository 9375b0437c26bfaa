"""As-ViT (arXiv 2202.11921): training-free ViT topology search and scaling, for small plain ViTs.

The scoring, search and study behind ``splitmix search-topology`` (``tools/topology_search.py``).
It evaluates networks on inputs and data and trains them briefly (the Kendall study), so it is a
tool; the network it scores is the project's one ViT, :class:`models.vit.MiniViT` (the
reference's plain layers and init passed in), and :class:`models.vit.Topology` describes it.

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

Ranking (``grow.py``): dense ranks of κ (ascending) and of length distortion (descending),
smallest rank sum first. Ties at the same rank sum are broken by the metric with the larger
relative range (max − min)/max over the candidates, in its own direction (the reference code
compares only the first two tied candidates and takes an argmin for both metrics; fixed here).

The reference searches a 4-stage Swin-like space with REINFORCE; our space is a plain ViT
(patch size, embedding dim, depth, heads, MLP ratio) small enough to score exhaustively.
:func:`grow_topology` is the reference's greedy grow loop adapted to one stage;
:func:`scale_topology` is a closed-form shortcut (documented there).

The scoring functions take ``build`` (topology → model; default :class:`models.vit.MiniViT`)
and ``features`` (model, x → pooled features) callables to score another model family.

:func:`kendall_study` scores candidates, trains each briefly on digits
(:func:`short_train_accuracy`) and reports Kendall τ (:func:`kendall_tau`, τ-b) of each score
against accuracy.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from models.cost import count_params
from models.vit import MiniViT, Topology, TopologyLike, as_topology

if TYPE_CHECKING:
    from splitmix.data import ArrayData

    DataPair = tuple[ArrayData, ArrayData]

# ----------------------------------------------------------------------------- the search space


def topology_grid(
    patch: Sequence[int] = (2, 4),
    dim: Sequence[int] = (16, 32, 64),
    depth: Sequence[int] = (2, 4, 6),
    heads: Sequence[int] = (1, 2, 4),
    mlp_ratio: Sequence[float] = (2.0, 4.0),
    image_size: int = 8,
) -> list[Topology]:
    """Every valid combination (the default is research/vit.md §4.4's grid for 8×8 digits)."""
    out = []
    for p, d, l, h, m in itertools.product(patch, dim, depth, heads, mlp_ratio):
        if image_size % p == 0 and d % h == 0:
            out.append(Topology(p, d, l, h, float(m)))
    return out


def sample_topologies(n: int, seed: int, grid: Sequence[Topology] | None = None) -> list[Topology]:
    """``n`` distinct topologies drawn from ``grid`` with a seeded generator."""
    grid = list(grid if grid is not None else topology_grid())
    idx = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed))[:n]
    return [grid[i] for i in idx.tolist()]


# ----------------------------------------------------------------------------- the scored network


def build_mini_vit(topology: TopologyLike, image_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The default builder: As-ViT's plain ViT (:class:`models.vit.MiniViT`) of ``topology``."""
    return MiniViT(topology, image_size, in_channels, num_classes)


Builder = Callable[[Topology], nn.Module]
Features = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token features before the final norm averaged over tokens (As-ViT's ``forward_features[1]``)."""
    out = cast(MiniViT, model).forward_features(x)
    return out.mean(dim=1) if out.dim() == 3 else out.flatten(1)


def without_layernorm(model: nn.Module) -> nn.Module:
    """A deep copy with every ``nn.LayerNorm`` replaced by ``nn.Identity`` (As-ViT ``switch_norm('id')``)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, child_name, nn.Identity())
    return model


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


INITS = ("model", "kaiming")


def reinit_kaiming(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-in, ReLU gain) conv/linear weights and zero biases, in place.

    As-ViT's ``teg.py`` defines this init but scores with the model's own (trunc-normal 0.02).
    With 0.02 the residual branches of a plain ViT are ~0.02² at init and attention is nearly
    uniform, so both scores see mostly the patch embedding (depth and heads barely move them);
    this init makes the blocks count, but without LayerNorm the length distortion then grows
    steeply with depth, and on digits it tracked short-training accuracy worse (Kendall τ of the
    rank sum 0.09 vs 0.68 over 27 candidates), so it is an option, not the default.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
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
    init: str = "model",
    build: Builder = build_mini_vit,
    features: Features = pooled_features,
) -> TopologyScore:
    """Length distortion and NTK κ of ``topology``, each averaged over ``repeats`` inits.

    Deterministic for a seed: repeat r uses init seed f(seed, r) (global RNG forked, so the
    caller's stream is untouched) and circle r drawn from the same seed, so every candidate is
    scored on the same circles. Scores are computed in float64: κ of a tiny ViT at init reaches
    1e7–1e12, where float32 gradients would leave λ_min to rounding noise. ``ntk_inputs``
    default: 16 uniform-noise images from the seed (data-free; the reference uses one batch of
    real training images — pass a public batch, never client data). ``init``: "model" (the
    builder's own, as the reference) or "kaiming" (:func:`reinit_kaiming`).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got '{init}'")
    t = as_topology(topology)
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


def rank_scores(scores: Sequence[TopologyScore]) -> list[TopologyScore]:
    """Best first by rank sum of (length distortion ↓, κ ↑); ties by the wider-ranging metric."""
    les = [s.length_distortion for s in scores]
    kappas = [s.ntk_cond for s in scores]
    r_le, r_k = _dense_ranks(les, descending=True), _dense_ranks(kappas, descending=False)
    ranked = [replace(s, rank_length=a, rank_ntk=b) for s, a, b in zip(scores, r_le, r_k)]
    by_ntk = _relative_range(kappas) > _relative_range(les)
    tiebreak = (lambda s: s.ntk_cond) if by_ntk else (lambda s: -s.length_distortion)
    return sorted(ranked, key=lambda s: (s.rank_sum, tiebreak(s)))  # stable for full ties


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


def short_train_accuracy(
    topology: TopologyLike,
    data: DataPair | None = None,
    steps: int = 150,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    build: Builder = build_mini_vit,
) -> float:
    """Test accuracy after ``steps`` AdamW steps (cosine lr) from a seeded init.

    ``data`` is ``(train, test)`` with ``.x`` (N, C, H, W) and ``.y``; default: the embedded
    sklearn digits split (``splitmix.data.load_split``).
    """
    if data is None:
        from splitmix.data import load_split

        data = (load_split("digits", "", True), load_split("digits", "", False))
    train, test = data
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_init_seed(seed, 0) + 2)
        model = build(as_topology(topology))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train.y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())


def kendall_study(
    candidates: Sequence[TopologyLike],
    steps: int = 150,
    seed: int = 0,
    repeats: int = 3,
    n_pts: int = 64,
    data: DataPair | None = None,
    init: str = "model",
) -> dict:
    """Training-free scores vs short-training accuracy on ``candidates``, with Kendall τ of each.

    The NTK batch is 16 training images (the reference uses real images); accuracy is on the
    test split. τ is reported for length distortion, −κ and −rank-sum against accuracy.
    """
    if data is None:
        from splitmix.data import load_split

        data = (load_split("digits", "", True), load_split("digits", "", False))
    idx = torch.randperm(len(data[0].y), generator=torch.Generator().manual_seed(seed))[:16]
    start = time.perf_counter()
    result = search_topology(
        candidates, seed, repeats=repeats, n_pts=n_pts, ntk_inputs=data[0].x[idx], input_shape=tuple(data[0].x.shape[1:]), init=init
    )
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    acc = {s.topology: short_train_accuracy(s.topology, data, steps, seed) for s in result.ranked}
    train_s = time.perf_counter() - start
    rows: list[dict[str, Any]] = [
        {
            **s.topology.to_dict(),
            "name": str(s.topology),
            "params": s.params,
            "length_distortion": s.length_distortion,
            "ntk_cond": s.ntk_cond,
            "rank_sum": s.rank_sum,
            "accuracy": acc[s.topology],
        }
        for s in result.ranked
    ]
    accs = [r["accuracy"] for r in rows]
    return {
        "rows": rows,
        "best": str(result.best),
        "tau_length_distortion": kendall_tau([r["length_distortion"] for r in rows], accs),
        "tau_neg_ntk_cond": kendall_tau([-r["ntk_cond"] for r in rows], accs),
        "tau_neg_rank_sum": kendall_tau([-r["rank_sum"] for r in rows], accs),
        "tau_params": kendall_tau([r["params"] for r in rows], accs),
        "score_seconds": score_s,
        "train_seconds": train_s,
    }
