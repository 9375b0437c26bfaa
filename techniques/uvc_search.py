"""UVC — Unified Visual Transformer Compression (arXiv 2203.08243) for our stacked ViT: the search.

The mechanics of the UVC technique — everything that trains, searches or optimises — used by
the client-local technique (``sparse-method = "uvc"``: :func:`uvc_masks`) and by the offline
tool ``tools/compress.py`` (search, budget projection, fine-tuning on a finished run). No file
I/O. What a result *is* (:class:`~models.vit_sliced.ViTGeometry`, :class:`~models.vit_sliced.Selection`)
and the physically sliced model (:class:`~models.vit_sliced.SlicedViT`, :func:`~models.vit_sliced.slice_vit`)
are model structure and live in ``models/vit_sliced.py``, which serves and reloads a compressed
model without this code. Facts follow research/vit.md §1 (from the reference code); deviations
are listed at the end.

**What is compressed, per base b and block l** (a width-w Split-Mix model stacks k bases; every
base is compressed on its own — its own counts, gates and masks — because the bases are independent
networks; k = 1 is a plain model):

- ``s0``: heads removed, ``r[h]``: value dims removed inside head h, ``s1``: MLP neurons removed.
  Continuous, used through ⌈·⌉ with a straight-through estimator; stored as a *fraction of the
  group count* (u = s/ub) so one step size fits 4 heads and 64 neurons alike.
- Group scores are squared L2 norms of input columns: of ``attn.proj`` for heads (all d_h
  columns) and value dims (one column), of ``mlp.fc2`` for neurons. The ⌈s⌉ lowest go. Masks zero
  proj columns (heads/dims) and fc2 columns + fc1 rows/bias (neurons); q/k dims are never
  pruned, so a sliced head keeps q/k dim d_h while its v/proj dim shrinks.
- Skip gates: 2 logits per (base, block), init [−1, +1], Gumbel-softmax τ = 0.5 while searching,
  ``X ← π1·Block(X) + π0·X``; afterwards the block is kept iff g1 > g0. A skipped block in an
  unsliced model = its proj and fc2 weights *and biases* zeroed: ``Block`` computes
  ``x + FS(proj(·)) + fc2(·)`` and FeatScale maps 0 to 0, so the block is exactly the identity.

**Resource function**: exact MACs of what the sliced model runs (:meth:`ViTGeometry.block_macs
<models.vit_sliced.ViTGeometry.block_macs>`), per block times π1, summed over blocks and bases;
differentiable in (s, r, π). T0 dense: 633,408 MACs per base.

**Search** (primal–dual, one step per batch): the task loss is the distillation loss from the
frozen dense model (α = 0.1, T = 1, per base), the weights take AdamW + a proximal shrink of the
currently pruned groups (÷(1 + 2η·dual)); s, r take ∇ = y·∂Ψ/∂s + z·∂R/∂s (Ψ_⌈s⌉ the least-s
sum: its derivative is the next-smallest score), ∞-norm clipped per tensor, box-projected; gates
take ∂L/∂g + z·w_g·∂R/∂g averaged over ``gate_interval`` steps (SGD momentum); duals ascend
(y += η_y·Ψ, p += η_p·Ψ, z ← max(0, z + η_z·(R − B)), η_z = 1 ramping ×1, 5, 9, 13, 17). The
search alone brings the hard ratio R within ``overshoot``·B of B (measured: 0.510 at B = 0.5,
0.306 at B = 0.3, 10 epochs on a digits ViT). Then, as a labelled last step,
:func:`project_to_budget` guarantees R ≤ B (drop lowest-priority groups; optionally refill up to
B; not part of UVC) and :func:`finetune` trains the fixed masks with distillation.

**Baseline**: :func:`magnitude_selection` — the same scores, the same head and neuron counts in
every block and base (as uniform as the budget allows), no learning.

**Masks**: :func:`selection_masks` realises a selection as bool masks in the unsliced model (the
"masked model", what clients train and what :func:`masked_copy` builds); the sliced model
(``models.vit_sliced.slice_vit``) computes exactly what the masked model computes.

Deviations from the reference code (deliberate): the KL term is averaged over the batch (the
code divides by batch·classes); no Mixup/CutMix/label smoothing; the z-gradient clamp of (R−B) is
not applied (it zeroes ∂R/∂s whenever R − B > 0.5, i.e. for every budget below 0.5 at the start);
warm-up uses the deterministic gate softmax instead of fixed (0.5, 0.5) (our blocks are trained at
π1 = 1, halving them breaks the pretrained function); gate gradients are a plain mean; the z dual
ascends on the hard-gated cost (what is deployed). Because our searches have ~100 steps where the
reference has ~60,000 (30 ImageNet epochs): the ∞-norm clip is per tensor (u0, ur, u1; the
reference clips s = heads + neurons together, in counts), the count step is
max(0.02, ``s_travel``/steps); a primal step (and a gate flip) may not take R farther from B than
it was unless it stays within ``overshoot``·B (:meth:`UVCSearch._damped_update`,
:meth:`UVCSearch._hold_gates`: without it ⌈·⌉ makes similar blocks drop a head at the same step
and the lagging z drives R to 0.14 and back for B = 0.3, and every gate flips after the first);
w_g = 0.05 (reference 5e-4, where z grows ~100× larger) and the gate lr 1.0 (reference 0.1 over
~1,250 gate updates, we have ~10–15); the weight lr is rescaled for tiny datasets (``UVCConfig``).
Before these, the search stopped at R = 0.74–0.79 for B = 0.5 and no gate ever skipped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from models.blocks import ModuleT, StackedNet
from models.masks import Masks
from models.vit import Attention, Mlp, VisionTransformer
from models.vit_sliced import Selection, ViTGeometry

StepHook = Callable[[dict[str, float]], None]


# ---------------------------------------------------------------------------------------------
# group scores and selections from counts


@dataclass
class GroupScores:
    """Squared L2 norms of weight columns (float64): the only importance UVC uses."""

    heads: torch.Tensor  # (k, L, H): proj input columns of the head
    dims: torch.Tensor  # (k, L, H, d_h): one proj input column
    neurons: torch.Tensor  # (k, L, M): one fc2 input column


def _scored_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn.proj`` and ``mlp.fc2`` weights of a stacked block (UVC's groups are their input columns)."""
    return cast(Attention, block.attn).proj.weight, cast(Mlp, block.mlp).fc2.weight


@torch.no_grad()
def group_scores(model: VisionTransformer) -> GroupScores:
    geom = ViTGeometry.from_model(model)
    k, d, h, dh = geom.num_bases, geom.dim, geom.heads, geom.head_dim
    dims, neurons = [], []
    for block in model.blocks:
        proj_w, fc2_w = _scored_weights(block)
        proj = proj_w.detach().double().view(k, d, h, dh)
        dims.append(proj.pow(2).sum(1))  # proj input columns are head-major: (head, dim)
        fc2 = fc2_w.detach().double().view(k, d, -1)
        neurons.append(fc2.pow(2).sum(1))
    dims_t = torch.stack(dims, 1)
    return GroupScores(dims_t.sum(-1), dims_t, torch.stack(neurons, 1))


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, ascending (ties by index: deterministic)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def select_by_counts(scores: GroupScores, s0: torch.Tensor, r: torch.Tensor, s1: torch.Tensor, blocks: torch.Tensor | None = None) -> Selection:
    """Remove the ``s0`` lowest heads, the ``r[h]`` lowest dims of each kept head and the ``s1``
    lowest neurons (integer counts, (k, L), (k, L, H), (k, L)) of every base and block."""
    heads = _ranks(scores.heads) >= s0.long().unsqueeze(-1)
    dims = (_ranks(scores.dims) >= r.long().unsqueeze(-1)) & heads.unsqueeze(-1)
    neurons = _ranks(scores.neurons) >= s1.long().unsqueeze(-1)
    if blocks is None:
        blocks = torch.ones(heads.shape[:2], dtype=torch.bool)
    return Selection(blocks.clone(), heads, dims, neurons)


# ---------------------------------------------------------------------------------------------
# masks in the unsliced model


def _rows(keep: torch.Tensor, cols: int) -> torch.Tensor:
    """(k, out) row keep → (k·out, cols) weight mask."""
    k, out = keep.shape
    return keep.unsqueeze(-1).expand(k, out, cols).reshape(k * out, cols)


def _cols(keep: torch.Tensor, rows: int) -> torch.Tensor:
    """(k, in) column keep → (k·rows, in) weight mask."""
    k, width = keep.shape
    return keep.unsqueeze(1).expand(k, rows, width).reshape(k * rows, width)


def selection_masks(model: VisionTransformer, sel: Selection, dead: bool = True) -> Masks:
    """Bool masks (state-dict names and shapes) realising ``sel`` in the unsliced model.

    Always: proj columns of removed heads/dims, fc1 rows + bias and fc2 columns of removed
    neurons, and for a skipped block proj and fc2 weights *and biases* (the block becomes the
    identity). ``dead`` also zeroes weights that no longer matter (qkv rows of removed heads and
    value dims, everything linear in a skipped block), so the mask shows every saved weight."""
    geom = ViTGeometry.from_model(model)
    k, d, h, dh = geom.num_bases, geom.dim, geom.heads, geom.head_dim
    masks: Masks = {}
    for l in range(geom.depth):
        keep = sel.blocks[:, l]  # (k,)
        vcols = sel.dims[:, l].reshape(k, d) & keep.unsqueeze(-1)
        neurons = sel.neurons[:, l] & keep.unsqueeze(-1)
        p = f"blocks.{l}."
        masks[p + "attn.proj.weight"] = _cols(vcols, d)
        masks[p + "attn.proj.bias"] = keep.repeat_interleave(d)
        masks[p + "mlp.fc1.weight"] = _rows(neurons, d)
        masks[p + "mlp.fc1.bias"] = neurons.reshape(-1).clone()
        masks[p + "mlp.fc2.weight"] = _cols(neurons, d)
        masks[p + "mlp.fc2.bias"] = masks[p + "attn.proj.bias"].clone()
        if dead:
            qk = (sel.heads[:, l] & keep.unsqueeze(-1)).unsqueeze(-1).expand(k, h, dh)
            rows = torch.stack([qk, qk, sel.dims[:, l] & keep.view(k, 1, 1)], dim=2)  # (k, head, q/k/v, dim)
            masks[p + "attn.qkv.weight"] = _rows(rows.reshape(k, 3 * d), d)
            masks[p + "attn.qkv.bias"] = rows.reshape(-1).clone()
    return masks


def selection_from_masks(model: VisionTransformer, masks: Masks) -> Selection:
    """Inverse of :func:`selection_masks` (e.g. to slice a client's :func:`uvc_masks` result):
    a block is kept iff its proj bias survives, value dims are proj columns, neurons fc1 rows."""
    geom = ViTGeometry.from_model(model)
    k, d, h, dh = geom.num_bases, geom.dim, geom.heads, geom.head_dim
    blocks, dims, neurons = [], [], []
    for l in range(geom.depth):
        p = f"blocks.{l}."
        blocks.append(masks[p + "attn.proj.bias"].view(k, d).any(-1))
        dims.append(masks[p + "attn.proj.weight"].view(k, d, d).any(1).view(k, h, dh))
        neurons.append(masks[p + "mlp.fc1.bias"].view(k, -1).clone())
    dims_t = torch.stack(dims, 1)
    return Selection(torch.stack(blocks, 1), dims_t.any(-1), dims_t, torch.stack(neurons, 1))


@torch.no_grad()
def apply_masks_(model: ModuleT, masks: Masks) -> ModuleT:
    """Zero every masked-out entry in place (after each optimizer step while fine-tuning)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))
    return model


def masked_copy(model: VisionTransformer, sel: Selection) -> VisionTransformer:
    """A copy of ``model`` with ``sel`` applied as zeros (the "masked model")."""
    return apply_masks_(copy.deepcopy(model), selection_masks(model, sel))


# ---------------------------------------------------------------------------------------------
# differentiable pieces


class _SteCeil(torch.autograd.Function):
    """⌈x⌉ forward, identity backward (UVC's ``SteCeil``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    return _SteCeil.apply(x)


def resource_macs(
    geom: ViTGeometry, s0: torch.Tensor, r: torch.Tensor, s1: torch.Tensor, head_kept: torch.Tensor, pi1: torch.Tensor | None = None
) -> torch.Tensor:
    """MACs as a differentiable function of the (ceil'd) counts and the keep-gates.

    ``s0``, ``s1``: (k, L); ``r``: (k, L, H); ``head_kept``: (k, L, H) 0/1 (which heads the
    scores remove, so only kept heads' r count); ``pi1``: (k, L) keep weights (None: all 1).
    At integer counts consistent with ``head_kept`` it equals :meth:`Selection.macs`."""
    heads = geom.heads - s0
    vdims = geom.dim - geom.head_dim * s0 - (r * head_kept).sum(-1)
    per = geom.block_macs(heads, vdims, geom.hidden - s1)
    if pi1 is not None:
        per = per * pi1
    return geom.fixed_macs + per.sum()


def least_sum(scores: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ψ = sum of the ``count`` smallest scores along the last dim, and ∂Ψ/∂count = the next
    smallest score (0 when nothing is left) — UVC's ``LeastSsum`` forward/backward."""
    ordered = torch.sort(scores, dim=-1).values
    n = ordered.shape[-1]
    c = count.long().clamp(0, n).unsqueeze(-1)
    cum = torch.cat([torch.zeros_like(ordered[..., :1]), ordered.cumsum(-1)], -1)
    psi = cum.gather(-1, c).squeeze(-1)
    nxt = torch.cat([ordered, torch.zeros_like(ordered[..., :1])], -1).gather(-1, c).squeeze(-1)
    return psi, nxt


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """(1−α)·CE + α·T²·KL(teacher ‖ student) on per-base logits ``(B, k, C)``: each base is
    distilled from its own dense counterpart; summed over bases like ``per_base_loss``, the KL
    averaged over the batch."""
    b, k, _ = student.shape
    ce = F.cross_entropy(student.transpose(1, 2), y.unsqueeze(1).expand(-1, k)) * k
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="sum", log_target=True) / b
    return (1.0 - alpha) * ce + alpha * t * t * kl


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard Gumbel samples (seeded through ``generator``)."""
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp_(1e-10, 1.0 - 1e-10)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """Soft Gumbel-softmax over the last dim with given ``noise`` (so the same sample can be
    rebuilt for a second gradient: the task loss and the resource term)."""
    return torch.softmax((logits + noise) / tau, dim=-1)


def gated_forward(
    model: VisionTransformer, x: torch.Tensor, weight_masks: dict[str, torch.Tensor] | None = None, pi: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-base logits ``(B, k, C)`` with weights multiplied by ``weight_masks`` (gradients flow
    to the kept entries only) and every block gated ``π1·Block(X) + π0·X`` (``pi``: (k, L, 2))."""
    k = model.num_bases
    masks = weight_masks or {}
    masked = {n: p * masks[n] for n, p in model.named_parameters() if n in masks}
    tokens = model.embed(x)
    for l, block in enumerate(model.blocks):
        prefix = f"blocks.{l}."
        local = {n[len(prefix) :]: t for n, t in masked.items() if n.startswith(prefix)}
        out = functional_call(block, local, (tokens,)) if local else block(tokens)
        if pi is not None:
            g = pi[:, l].to(out.dtype)
            out = g[:, 1].view(k, 1, 1, 1) * out + g[:, 0].view(k, 1, 1, 1) * tokens
        tokens = out
    return model.head(model.norm(tokens[:, :, 0])).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# search


@dataclass
class UVCConfig:
    """Hyperparameters; reference values in comments, rescaled where our datasets are ~100× smaller."""

    flops_ratio: float = 0.5  # B (reference scripts: 0.5)
    tau: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    lr: float = 5e-4  # AdamW on weights (reference 1e-4 at batch 512)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    s_lr: float = 0.02  # per step, in fractions of the group count (reference 0.02 in counts)
    s_travel: float = 2.0  # the primal step is at least s_travel / (post-warm-up steps)
    overshoot: float = 0.02  # once R is within overshoot·B of B, a primal step may not leave that band
    gate_lr: float = 1.0  # reference 0.1 over ~1,250 gate updates; we have ~10-15
    gate_momentum: float = 0.9
    gate_weight_decay: float = 1e-4
    gate_weight: float = 0.05  # w_g (reference 5e-4 with a z ~100x larger than ours)
    gate_interval: int = 10  # reference 50
    dual_init: float = 1e-3
    y_lr: float = 1e-4  # η_y = η_p (reference value)
    z_lr: float = 1.0  # η_z base (reference 1), × (1, 5, 9, 13, 17) over the post-warm-up steps
    z_schedule: tuple[float, ...] = (1.0, 5.0, 9.0, 13.0, 17.0)
    warmup_fraction: float = 0.2


class UVCSearch:
    """Stage 1: joint weights / counts / gates / duals under a FLOPs budget (trains ``model`` in place)."""

    def __init__(self, model: VisionTransformer, cfg: UVCConfig, total_steps: int, seed: int = 0) -> None:
        self.model, self.cfg, self.total = model, cfg, max(1, total_steps)
        g = self.geom = ViTGeometry.from_model(model)
        k, depth, h = g.num_bases, g.depth, g.heads
        self.dense = g.dense_macs()
        self.budget = cfg.flops_ratio * self.dense
        self.ub = {"s0": h, "r": g.head_dim, "s1": g.hidden}
        f64: dict[str, Any] = dict(dtype=torch.float64)
        self.u0, self.ur, self.u1 = torch.zeros(k, depth, **f64), torch.zeros(k, depth, h, **f64), torch.zeros(k, depth, **f64)
        self.gates = torch.tensor([-1.0, 1.0], **f64).repeat(k, depth, 1).requires_grad_(True)
        self.y = torch.full((k, depth, 2), cfg.dual_init, **f64)
        self.p = torch.full((k, depth, h), cfg.dual_init, **f64)
        self.z = cfg.dual_init
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gate_opt = torch.optim.SGD([self.gates], lr=cfg.gate_lr, momentum=cfg.gate_momentum, weight_decay=cfg.gate_weight_decay)
        self.gate_acc, self.gate_count = torch.zeros_like(self.gates), 0
        self.gen = torch.Generator().manual_seed(seed)
        self.warmup = int(round(cfg.warmup_fraction * self.total))
        self.step_index = 0

    # ---- counts and selections
    def _upper(self, name: str) -> float:
        ub = self.ub[name]
        return (ub - 1) / ub - 1e-9  # ⌈u·ub⌉ ≤ ub − 1: never all heads, all dims of a head, all neurons

    def counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.ceil(self.u0 * self.ub["s0"]), torch.ceil(self.ur * self.ub["r"]), torch.ceil(self.u1 * self.ub["s1"]))

    def kept_blocks(self) -> torch.Tensor:
        return self.gates[..., 1].detach() > self.gates[..., 0].detach()

    def selection(self, scores: GroupScores | None = None, hard_gates: bool = True) -> Selection:
        s0, r, s1 = self.counts()
        blocks = self.kept_blocks() if hard_gates else None
        return select_by_counts(group_scores(self.model) if scores is None else scores, s0, r, s1, blocks)

    def ratio(self, scores: GroupScores | None = None) -> float:
        """Exact MACs ratio of the current hard selection."""
        return self.selection(scores).macs(self.geom) / self.dense

    # ---- one step
    def _lr(self) -> float:
        return 0.5 * self.cfg.lr * (1.0 + math.cos(math.pi * min(self.step_index, self.total) / self.total))

    def _s_step(self) -> float:
        """Primal step of the counts: the reference 0.02, or larger so that the post-warm-up steps can
        move a count across ``s_travel`` of its range (the reference has ~60,000 such steps, we ~100)."""
        return max(self.cfg.s_lr, self.cfg.s_travel / max(1, self.total - self.warmup))

    def _z_lr(self) -> float:
        sched = self.cfg.z_schedule
        span = max(1, self.total - self.warmup)
        phase = min(len(sched) - 1, (self.step_index - self.warmup) * len(sched) // span)
        return self.cfg.z_lr * sched[max(0, phase)]

    def step(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
        cfg, model, geom = self.cfg, self.model, self.geom
        warm = self.step_index < self.warmup
        scores = group_scores(model)
        sel = self.selection(scores, hard_gates=False)
        weight_masks = {
            n: t.float()
            for n, t in selection_masks(model, sel, dead=False).items()
            if n.endswith(("proj.weight", "fc1.weight", "fc1.bias", "fc2.weight"))
        }
        noise = torch.zeros_like(self.gates) if warm else gumbel_noise(tuple(self.gates.shape), self.gen)
        pi = gumbel_softmax(self.gates if not warm else self.gates.detach(), cfg.tau, noise)
        lr = self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        model.train()
        loss = kd_loss(gated_forward(model, x, weight_masks, pi), teacher, y, cfg.alpha, cfg.temperature)
        self.opt.zero_grad(set_to_none=True)
        self.gates.grad = None
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        self._prox(sel, lr)
        out = {"loss": float(loss.detach()), "ratio": sel.macs(geom) / self.dense, "z": float(self.z)}
        if not warm:
            self._primal_dual(scores, sel, noise)
        self.step_index += 1
        out["ratio_hard"] = self.ratio()
        return out

    @torch.no_grad()
    def _prox(self, sel: Selection, lr: float) -> None:
        """Exact prox of η·dual·‖group‖² on the currently removed groups: ÷(1 + 2η·dual)."""
        g = self.geom
        k, d = g.num_bases, g.dim
        for l, block in enumerate(self.model.blocks):
            head_f = torch.where(sel.heads[:, l], 1.0, 1.0 / (1.0 + 2 * lr * self.y[:, l, 0:1]))  # (k, H)
            dim_f = torch.where(sel.dims[:, l] | ~sel.heads[:, l].unsqueeze(-1), 1.0, 1.0 / (1.0 + 2 * lr * self.p[:, l].unsqueeze(-1)))  # (k, H, dh)
            factor = (head_f.unsqueeze(-1) * dim_f).reshape(k, 1, d).float()
            w, w2 = _scored_weights(block)
            w.copy_((w.view(k, d, d) * factor).view_as(w))
            neuron_f = torch.where(sel.neurons[:, l], 1.0, 1.0 / (1.0 + 2 * lr * self.y[:, l, 1:2])).float()
            w2.copy_((w2.view(k, d, -1) * neuron_f.unsqueeze(1)).view_as(w2))

    def _damped_update(self, values: list[torch.Tensor], moves: list[torch.Tensor], uppers: list[float]) -> None:
        """Apply the primal moves, finest groups first (neurons, value dims, heads), each shrunk
        (×1, ½, ¼, ⅛, 0) until the hard ratio is no farther from B than before or within
        ``overshoot``·B of it. Ours, not UVC's: ⌈·⌉ turns small steps of similar blocks into
        simultaneous jumps of whole heads, and with ~100 steps (not ~60,000) the lagging z then
        drives R far past B and back (0.3 budget: 1 → 0.14 → 0.39 → 0.24 in 10 epochs)."""
        budget, tol = self.cfg.flops_ratio, self.cfg.overshoot * self.cfg.flops_ratio
        scores = group_scores(self.model)
        for i in (2, 1, 0):
            u, start = values[i], values[i].clone()
            before = self.ratio(scores)
            for factor in (1.0, 0.5, 0.25, 0.125, 0.0):
                u.copy_((start + factor * moves[i]).clamp_(0.0, uppers[i]))
                now = self.ratio(scores)
                if abs(now - budget) <= max(abs(before - budget), tol):
                    break

    @torch.no_grad()
    def _hold_gates(self, before: torch.Tensor, kept: torch.Tensor) -> None:
        """Undo (and stop the momentum of) the gate steps that flip a block's hard decision when
        the flip takes R farther from B than before and out of the ``overshoot`` band — the
        counts' damping rule (:meth:`_damped_update`) for the gates, most confident flip first.
        Without it z, which lags, keeps pushing after the first skip and every block goes."""
        budget, tol = self.cfg.flops_ratio, self.cfg.overshoot * self.cfg.flops_ratio
        margin = self.gates[..., 1] - self.gates[..., 0]
        flipped = (margin > 0) != kept
        order = sorted(flipped.nonzero().tolist(), key=lambda bl: -abs(float(margin[bl[0], bl[1]])))
        after = self.gates.detach().clone()
        self.gates.copy_(before)
        buf = self.gate_opt.state[self.gates].get("momentum_buffer")
        for b, l in order:
            start = self.ratio()
            self.gates[b, l] = after[b, l]
            if abs(self.ratio() - budget) > max(abs(start - budget), tol):
                self.gates[b, l] = before[b, l]
                if buf is not None:
                    buf[b, l] = 0.0
        unflipped = ~flipped
        self.gates[unflipped] = after[unflipped]

    def _primal_dual(self, scores: GroupScores, sel: Selection, noise: torch.Tensor) -> None:
        cfg, g = self.cfg, self.geom
        pi = gumbel_softmax(self.gates, cfg.tau, noise)  # the sample the forward used, a fresh graph
        u0, ur, u1 = (t.clone().requires_grad_(True) for t in (self.u0, self.ur, self.u1))
        s0, r, s1 = ste_ceil(u0 * g.heads), ste_ceil(ur * g.head_dim), ste_ceil(u1 * g.hidden)
        ratio = resource_macs(g, s0, r, s1, sel.heads.double(), pi[..., 1]) / self.dense
        d0, dr, d1, dgate = torch.autograd.grad(ratio, [u0, ur, u1, self.gates])
        # least-s sums: of heads, of each kept head's dims, of neurons
        c0, cr, c1 = (t.detach() for t in (s0, r, s1))
        psi0, next0 = least_sum(scores.heads, c0)
        psir, nextr = least_sum(scores.dims, cr)
        kept = sel.heads.double()
        psir, nextr = psir * kept, nextr * kept
        psi1, next1 = least_sum(scores.neurons, c1)
        grads = [
            self.y[..., 0] * next0 * g.heads + self.z * d0,
            self.p * nextr * g.head_dim + self.z * dr,
            self.y[..., 1] * next1 * g.hidden + self.z * d1,
        ]
        values, uppers = [self.u0, self.ur, self.u1], [self._upper("s0"), self._upper("r"), self._upper("s1")]
        for grad, u, hi in zip(grads, values, uppers):  # no push out of the box
            grad[(u <= 0) & (grad > 0)] = 0.0
            grad[(u >= hi) & (grad < 0)] = 0.0
        step = self._s_step()
        moves = [-step * grad / max(1.0, float(grad.abs().max())) for grad in grads]  # ∞-norm clip to 1 per tensor, SGD
        self._damped_update(values, moves, uppers)
        # gates: task gradient + z·w_g·∂R/∂g, averaged over gate_interval steps
        task = self.gates.grad if self.gates.grad is not None else torch.zeros_like(self.gates)
        self.gate_acc += task + self.z * cfg.gate_weight * dgate
        self.gate_count += 1
        if self.gate_count >= cfg.gate_interval:
            self.gates.grad = self.gate_acc / self.gate_count
            before, kept = self.gates.detach().clone(), self.kept_blocks()
            self.gate_opt.step()
            self._hold_gates(before, kept)
            self.gate_acc.zero_()
            self.gate_count = 0
        self.gates.grad = None
        # dual ascent, projected to ≥ 0
        self.y[..., 0] += cfg.y_lr * psi0
        self.y[..., 1] += cfg.y_lr * psi1
        self.p += cfg.y_lr * psir
        self.z = max(0.0, self.z + self._z_lr() * (self.ratio() - cfg.flops_ratio))


# ---------------------------------------------------------------------------------------------
# budget projection and the magnitude baseline


def _energy(scores: GroupScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores as fractions of their block's total (proj energy for heads and dims, fc2 for neurons)."""
    proj = scores.heads.sum(-1, keepdim=True).clamp_min(1e-30)
    return scores.heads / proj, scores.dims / proj.unsqueeze(-1), scores.neurons / scores.neurons.sum(-1, keepdim=True).clamp_min(1e-30)


def _candidates(
    geom: ViTGeometry, sel: Selection, energy: tuple[torch.Tensor, ...], b: int, l: int, add: bool
) -> list[tuple[float, str, tuple[int, ...], int]]:
    """The next group to remove (or, ``add``, to restore) in base b, block l of each kind:
    (energy per MAC, kind, index, MACs)."""
    eh, ed, en = (e[b, l] for e in energy)
    n, d, dh = geom.tokens, geom.dim, geom.head_dim
    heads, dims, neurons = sel.heads[b, l], sel.dims[b, l], sel.neurons[b, l]
    out: list[tuple[float, str, tuple[int, ...], int]] = []
    pick = torch.argmax if add else torch.argmin
    # neuron
    pool = ~neurons if add else neurons
    if (add and pool.any()) or (not add and int(neurons.sum()) > 1):
        vals = torch.where(pool, en, -math.inf if add else math.inf)
        j = int(pick(vals))
        cost = 2 * n * d
        out.append((float(en[j]) / cost, "neuron", (j,), cost))
    # value dim inside a kept head
    pool_d = (~dims & heads.unsqueeze(-1)) if add else (dims & (dims.sum(-1, keepdim=True) > 1))
    if pool_d.any():
        vals = torch.where(pool_d, ed, -math.inf if add else math.inf)
        flat = int(pick(vals.flatten()))
        hh, j = divmod(flat, dh)
        cost = 2 * n * d + n * n
        out.append((float(ed[hh, j]) / cost, "dim", (hh, j), cost))
    # whole head (removal only; a restored head comes back with all its dims)
    if add:
        pool_h = ~heads
    else:
        pool_h = heads if int(heads.sum()) > 1 else torch.zeros_like(heads)
    if pool_h.any():
        vals = torch.where(pool_h, eh, -math.inf if add else math.inf)
        hh = int(pick(vals))
        v = dh if add else int(dims[hh].sum())
        cost = n * d * (2 * dh + v) + n * n * (dh + v) + n * v * d
        out.append((float(eh[hh]) / cost, "head", (hh,), cost))
    return out


def _apply(sel: Selection, b: int, l: int, kind: str, index: tuple[int, ...], keep: bool) -> None:
    if kind == "neuron":
        sel.neurons[b, l, index[0]] = keep
    elif kind == "dim":
        sel.dims[b, l, index[0], index[1]] = keep
    else:
        sel.heads[b, l, index[0]] = keep
        sel.dims[b, l, index[0]] = keep


def project_to_budget(
    geom: ViTGeometry, sel: Selection, scores: GroupScores, budget_macs: float, gate_margin: torch.Tensor | None = None, fill: bool = False
) -> Selection:
    """Deterministic: while over ``budget_macs``, remove the group (neuron, value dim or head of a
    kept block) with the least score energy per MAC saved; if none is left, skip the kept block
    with the smallest gate margin g1 − g0 (the deepest without gates). ``fill`` then restores
    removed groups (most energy per MAC first) while the budget still holds, so the result lands
    just under the budget. Raises ``ValueError`` if even skipping every block cannot meet it."""
    sel = sel.clone()
    energy = _energy(scores)
    k, depth = sel.blocks.shape
    macs = sel.macs(geom)
    while macs > budget_macs:
        best = None
        for b in range(k):
            for l in range(depth):
                if not sel.blocks[b, l]:
                    continue
                for cand in _candidates(geom, sel, energy, b, l, add=False):
                    if best is None or cand[0] < best[0][0]:
                        best = (cand, b, l)
        if best is not None:
            (_, kind, index, _), b, l = best
            _apply(sel, b, l, kind, index, False)
        else:
            alive = sel.blocks.nonzero().tolist()
            if not alive:
                raise ValueError(f"budget of {budget_macs:.0f} MACs is below the patch embedding + classifier cost {geom.fixed_macs}")
            margin = gate_margin if gate_margin is not None else -torch.arange(depth, dtype=torch.float64).expand(k, depth)
            b, l = min(alive, key=lambda bl: (float(margin[bl[0], bl[1]]), -bl[1], bl[0]))
            sel.blocks[b, l] = False
        macs = sel.macs(geom)
    if fill:
        while True:
            best = None
            for b in range(k):
                for l in range(depth):
                    if not sel.blocks[b, l]:
                        continue
                    for cand in _candidates(geom, sel, energy, b, l, add=True):
                        if macs + cand[3] <= budget_macs and (best is None or cand[0] > best[0][0]):
                            best = (cand, b, l)
            if best is None:
                break
            (_, kind, index, cost), b, l = best
            _apply(sel, b, l, kind, index, True)
            macs = sel.macs(geom)
    return sel


def magnitude_selection(model: VisionTransformer, flops_ratio: float, generator: torch.Generator | None = None) -> Selection:
    """Baseline: the same ``h`` heads and ``m`` neurons kept in every block and base (the most
    uniform pair, i.e. the largest min(h/H, m/M), whose MACs fit the budget; ties: more MACs),
    heads and neurons chosen by the squared L2 norm of their proj / fc2 columns; no learning.
    With ``generator``: the same counts, heads and neurons drawn at random (the random control)."""
    geom = ViTGeometry.from_model(model)
    budget = flops_ratio * geom.dense_macs()
    best: tuple[float, int, int, int] | None = None
    for h in range(1, geom.heads + 1):
        for m in range(1, geom.hidden + 1):
            macs = geom.fixed_macs + geom.num_bases * geom.depth * geom.block_macs(h, h * geom.head_dim, m)
            if macs <= budget:
                key = (min(h / geom.heads, m / geom.hidden), macs, h, m)
                if best is None or key > best:
                    best = key
    if best is None:
        raise ValueError(f"flops ratio {flops_ratio:g} is below what one head and one neuron per block cost")
    _, _, h, m = best
    k, depth = geom.num_bases, geom.depth
    s0 = torch.full((k, depth), geom.heads - h)
    scores = group_scores(model)
    if generator is not None:
        scores = GroupScores(*(torch.rand(t.shape, generator=generator, dtype=t.dtype) for t in (scores.heads, scores.dims, scores.neurons)))
    return select_by_counts(scores, s0, torch.zeros(k, depth, geom.heads), torch.full((k, depth), geom.hidden - m))


# ---------------------------------------------------------------------------------------------
# training loops


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i : i + batch] for i in range(0, n, batch) if min(n, i + batch) - i >= 2]


@torch.no_grad()
def teacher_logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Per-base logits ``(B, k, C)`` of the frozen dense model (computed once per dataset)."""
    was = model.training
    model.eval()
    out = torch.cat([cast(StackedNet, model).forward_bases(x[i : i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def uvc_search(
    model: VisionTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: UVCConfig,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    teacher: torch.Tensor | None = None,
    on_step: StepHook | None = None,
) -> UVCSearch:
    """Run stage 1 for ``steps`` batches (training ``model`` in place); returns the search state
    (its :meth:`UVCSearch.selection` is the learned result, before budget projection)."""
    teacher = teacher_logits(model, x) if teacher is None else teacher
    search = UVCSearch(model, cfg, steps, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    done = 0
    while done < steps:
        for idx in _batches(len(x), batch_size, gen):
            info = search.step(x[idx], y[idx], teacher[idx])
            done += 1
            if on_step is not None:
                on_step(info)
            if done >= steps:
                break
    model.eval()
    return search


def finetune(
    model: VisionTransformer,
    sel: Selection,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher: torch.Tensor,
    epochs: int,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    alpha: float = 0.1,
    temperature: float = 1.0,
    seed: int = 0,
    on_step: StepHook | None = None,
) -> Masks:
    """Stage 2: masks fixed (skipped blocks as identity), distillation loss, AdamW with cosine
    decay, masks re-applied after every step. Trains in place; returns the masks."""
    masks = selection_masks(model, sel)
    apply_masks_(model, masks)
    gen = torch.Generator().manual_seed(seed + 2)
    total = max(1, epochs * len(_batches(len(x), batch_size, torch.Generator().manual_seed(0))))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step = 0
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(x), batch_size, gen):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            loss = kd_loss(model.forward_bases(x[idx]), teacher[idx], y[idx], alpha, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            apply_masks_(model, masks)
            step += 1
            if on_step is not None:
                on_step({"loss": float(loss.detach())})
    model.eval()
    return masks


def uvc_masks(
    model: VisionTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    flops_ratio: float,
    steps: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    config: UVCConfig | None = None,
) -> Masks:
    """For a client with a FLOPs budget: a short UVC search on (x, y) over a copy of ``model``
    (1 or k stacked bases), projected onto the budget; returns bool masks (state-dict names and
    shapes, block linears only — every other tensor is kept) that realise the result in the
    unsliced model: apply them (``apply_masks_``) and the model computes what the sliced one
    would, at ≤ ``flops_ratio`` of the dense MACs. ``model`` itself is not changed."""
    cfg = replace(config, flops_ratio=flops_ratio) if config is not None else UVCConfig(flops_ratio=flops_ratio)
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    search = uvc_search(work, x, y, cfg, steps, batch_size=min(batch_size, len(x)), seed=seed)
    geom = search.geom
    gates = search.gates.detach()
    sel = project_to_budget(
        geom, search.selection(), group_scores(work), flops_ratio * geom.dense_macs(), gate_margin=gates[..., 1] - gates[..., 0], fill=True
    )
    return selection_masks(model, sel)


__all__ = [
    "GroupScores",
    "Masks",
    "StepHook",
    "UVCConfig",
    "UVCSearch",
    "apply_masks_",
    "finetune",
    "gated_forward",
    "group_scores",
    "gumbel_noise",
    "gumbel_softmax",
    "kd_loss",
    "least_sum",
    "magnitude_selection",
    "masked_copy",
    "project_to_budget",
    "resource_macs",
    "select_by_counts",
    "selection_from_masks",
    "selection_masks",
    "ste_ceil",
    "teacher_logits",
    "uvc_masks",
    "uvc_search",
]
