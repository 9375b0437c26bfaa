"""``splitmix prune RUN``: structured lottery tickets (arXiv 2202.04736) as a post-training step.

The model a finished run serves at width W and robustness λ (for Split-Mix the k = W/r bases
stacked into one batched network, :meth:`server.query.Run.served`) is pruned channel-wise and
physically sliced into a smaller dense model of the same family:

1. **IMP with weight rewinding and refill** (:func:`techniques.pruning.iterative_magnitude_pruning`,
   ``structure="refill"``, ``trained=True``): the federated run is IMP's first training, so round 1
   prunes the served model as trained; ``--imp-rounds`` N × (remove ``--rate`` R of the surviving
   weights by global magnitude, ranked per base → refill: every layer keeps its channels with the
   most survivors, dense, as many as its surviving weight density allows (the official
   ``prune_model_custom_fillback``, criterion ``remain``) → rewind the survivors to the **early
   checkpoint** → fine-tune ``--epochs`` E, except after the last round). The early checkpoint is
   the same width/λ mixture built from ``rewind.safetensors`` — the served weights after round
   ``rewind-round`` of the run (:meth:`server.query.Run.module_from`, the code path of the run's own
   model). Only layers whose output channels can be removed are magnitude-pruned (the producers of
   :func:`models.slice_channels.channel_graph`); their consumers lose the columns reading removed
   channels. R defaults to ``1 − (1 − S)^(1/N)``, so N rounds land near S; where IMP lands per
   layer is its allocation (unequal: global magnitude ranking prunes some layers more).
2. **Final refill keeping IMP's allocation** (:func:`imp_allocation`, :func:`exact_refill`): IMP's
   kept channels per layer k_l are scaled by one common factor so that the *global* channel
   sparsity over all producers (1 − Σ kept / Σ dense, per base) is exactly ``--channel-sparsity``
   S (rounded to whole channels; largest remainder, each layer in [1, dense]). Per-layer
   sparsities stay IMP's up to that factor — they are not all S. Within a layer the channels IMP
   kept come first; if a layer grows, the removed channels with the largest trained |w| come
   back. Then rewind to the early checkpoint and fine-tune the ticket (E epochs).
   ``--random-control`` also trains two random structured controls, rewound and fine-tuned
   identically (same rewind point, epochs, rate and batch order), and reports their accuracy:
   random channels at the ticket's count per layer, and random channels at S in every layer.
   ``--rewind final`` rewinds to the trained weights instead (prune and fine-tune; for runs
   without ``rewind.safetensors``); the default refuses such runs.
3. **Slice** (:func:`models.slice_channels.slice_channels`): the removed channels are deleted
   (weights, both BN paths, consumer columns); the sliced model computes exactly what the masked
   one does (checked on the test set).

Fine-tuning: SGD (momentum and weight decay of the run, ``--lr`` default 0.01, cosine decay within
each stage, the run's batch size), masks re-applied after every optimizer step
(:func:`techniques.pruning.apply_masks_`), each base with its own cross-entropy
(:func:`clients.recipe.per_base_loss` on ``forward_bases``, as in Split-Mix). At λ = 0 the batches
go through the clean BN path only (the adversarial path is not trained; the pruned model is meant
to be served at λ = 0). At λ > 0 the loss is that of an adversarial client, (1 − λ)·L_clean(clean
BN) + λ·L_adv(adv BN) with PGD from the run's config, so both BN paths match the weights they
normalise and the λ-mix serves as trained; that costs (PGD steps + 2) forwards per batch.

**Data**: a federated server holds no training data. This step runs where data is: in a
deployment the data holder (a client, or a site holding data under the same partitioning) runs
it on its own partition (``--partition I``); in simulation the default is the union of the run's
client partitions (the run's dataset, partitioning and seed from its ``config.json``). The run's
test set is only used to report accuracy.

Output folder (``--out``, default ``<run>/pruned-w<W>-cs<S>[-l<λ>][-best]``)::

    model.safetensors   the sliced stacked model's state (tensors only; no pickle)
    architecture.json   how to rebuild it: family, bases, every conv/linear/BN's sliced shape, λ
    model_card.json     run, width, λ, bases, channel sparsity requested/achieved per layer, weight
                        sparsity, IMP's allocation, the rewind point, params and MACs dense vs
                        sliced, test accuracy dense/masked/sliced (and of the random control),
                        CPU ms/batch dense vs sliced (eager and BN-folded) and the speedups
    history.json, .csv  one row per fine-tuning stage: IMP round r (r ≥ 2) trains the masks of
                        round r − 1 from the rewind point, then "final" trains the ticket; each row
                        has the channel sparsity of those masks (mean and per layer, cs-<layer>),
                        the weight sparsity, test accuracy before fine-tuning (the rewound ticket)
                        and after, the mean per-base loss, steps and seconds

:func:`load_pruned` rebuilds the sliced model from ``architecture.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from clients.recipe import per_base_loss
from models.blocks import DualBatchNorm, StackedConv2d, StackedLinear, StackedNet, frozen_bn_stats, per_base_inputs, routed, set_route
from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.masks import Masks
from models.registry import create_model
from models.slice_channels import channel_graph, channel_masks, kept_channels, num_bases, slice_channels
from splitmix.adversarial import pgd_linf
from splitmix.data import ArrayData, client_train_data, test_data
from techniques.pruning import apply_masks_, iterative_magnitude_pruning, prunable_names, rewind_

FORMAT = "splitmix-pruned/1"
WEIGHTS, ARCHITECTURE, CARD = "model.safetensors", "architecture.json", "model_card.json"
Reporter = Callable[[str], None]


class PruneError(ValueError):
    """An input ``splitmix prune`` cannot use (the message names the option and what is allowed)."""


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class PruneSettings:
    width: float
    channel_sparsity: float
    robustness: float = 0.0
    select: str = "first"
    imp_rounds: int = 3
    rate: float | None = None  # None: 1 - (1 - S)^(1/N)
    epochs: int = 2
    lr: float = 0.01
    batch_size: int | None = None  # None: the run's batch size
    partition: int | None = None  # None: union of every client partition
    seed: int = 0
    timing_repeats: int = 7
    timing_batch: int = 256
    rewind: str = "early"  # early: rewind.safetensors; final: the trained weights (prune and fine-tune)
    random_control: bool = False

    def __post_init__(self) -> None:
        def bad(option: str, value: Any, allowed: str) -> PruneError:
            return PruneError(f"--{option} {value!r} is out of range; allowed: {allowed}")

        if not isinstance(self.channel_sparsity, (int, float)) or not 0.0 <= self.channel_sparsity < 1.0:
            raise bad("channel-sparsity", self.channel_sparsity, "[0, 1)")
        if self.imp_rounds < 0:
            raise bad("imp-rounds", self.imp_rounds, "an integer >= 0")
        if self.rate is not None and not 0.0 <= self.rate < 1.0:
            raise bad("rate", self.rate, "[0, 1)")
        if self.epochs < 0:
            raise bad("epochs", self.epochs, "an integer >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "a number > 0")
        if self.batch_size is not None and self.batch_size < 2:
            raise bad("batch-size", self.batch_size, "an integer >= 2")
        if self.rewind not in ("early", "final"):
            raise PruneError(f"--rewind {self.rewind!r} is unknown; allowed: early, final")
        if self.select not in ("first", "best"):
            raise PruneError(f"--select {self.select!r} is unknown; allowed: first, best")
        if self.timing_repeats < 1 or self.timing_batch < 1:
            raise bad("repeats", self.timing_repeats, "an integer >= 1")

    @property
    def imp_rate(self) -> float:
        """Per-round prune rate: given, or derived so that N rounds reach S on average."""
        if self.rate is not None:
            return self.rate
        if self.imp_rounds == 0:
            return 0.0
        return 1.0 - (1.0 - self.channel_sparsity) ** (1.0 / self.imp_rounds)


@dataclass
class PruneResult:
    folder: Path
    card: dict[str, Any]
    history: list[dict[str, Any]]
    dense: nn.Module  # the served mixture, as trained
    masked: nn.Module  # the fine-tuned ticket, masks applied (dense shapes)
    sliced: nn.Module  # the same function, physically smaller
    masks: Masks = field(repr=False, default_factory=dict)


# ---------------------------------------------------------------------------------------------
# helpers


def _producer_names(model: nn.Module) -> list[str]:
    return [f"{node.producer}.weight" for node in channel_graph(model)]


@torch.no_grad()
def _accuracy(model: nn.Module, data: ArrayData, batch: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        correct += int((model(data.x[i : i + batch]).argmax(-1) == data.y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(data))


@torch.no_grad()
def batched_logits(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``model``'s logits on ``x`` in eval mode, a batch at a time (post-training checks)."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def _rank(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorted by ``keys`` descending, lexicographically (first key most significant)."""
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        order = order[torch.argsort(key[order], descending=True, stable=True)]
    return order


def imp_allocation(imp_kept: dict[str, int], dense: dict[str, int], channel_sparsity: float) -> dict[str, int]:
    """Channels per base each producer keeps in the final ticket: IMP's counts ``imp_kept`` scaled
    by one factor c so that Σ kept = T = round((1 − S)·Σ dense) (at least one per layer), i.e. the
    *global* channel sparsity is S while the per-layer shares stay IMP's.

    Each layer starts at floor(c·k_l) clamped to [1, dense_l]; the channels still missing (or in
    excess, after clamping) go one at a time to the layer furthest below (above) c·k_l, ties to the
    earlier layer. E.g. k = (2, 8, 8, 32) of (8, 16, 32, 64) at S = 0.5: T = 60, c = 60/50,
    c·k = (2.4, 9.6, 9.6, 38.4) → (2, 9, 9, 38) → (2, 10, 10, 38)."""
    names = list(imp_kept)
    total = sum(dense[n] for n in names)
    target = min(total, max(len(names), int(round((1.0 - channel_sparsity) * total))))
    scale = target / max(1, sum(imp_kept.values()))
    ideal = {n: scale * imp_kept[n] for n in names}
    kept = {n: min(dense[n], max(1, math.floor(ideal[n]))) for n in names}
    while sum(kept.values()) < target:
        grow = max((n for n in names if kept[n] < dense[n]), key=lambda n: ideal[n] - kept[n])
        kept[grow] += 1
    while sum(kept.values()) > target:
        shrink = max((n for n in names if kept[n] > 1), key=lambda n: kept[n] - ideal[n])
        kept[shrink] -= 1
    return kept


@torch.no_grad()
def exact_refill(model: nn.Module, masks: Masks, kept: dict[str, int], reference: dict[str, torch.Tensor]) -> Masks:
    """Channel masks keeping exactly ``kept[producer]`` channels per base in every producer of the
    channel graph (:func:`imp_allocation`), dense over the inputs still alive, ranked by surviving
    weights in ``masks``, then surviving |w| of ``model``, then |w| in ``reference`` (the trained
    weights), so where a layer keeps more channels than IMP left it, the removed ones come back in
    order of their trained magnitude. Consumer-only layers (the classifier, residual convs) get
    only the columns reading removed channels zeroed."""
    k = num_bases(model)
    params = dict(model.named_parameters())
    keep: dict[str, torch.Tensor] = {}
    for node in channel_graph(model):
        name = f"{node.producer}.weight"
        w = params[name].detach().cpu()
        ones = torch.ones_like(w, dtype=torch.bool)
        alive = channel_masks(model, keep).get(name, ones)
        mask = masks.get(name, ones).cpu() & alive
        out = w.shape[0] // k
        n_keep = max(1, min(out, kept[node.producer]))
        count = mask.reshape(k, out, -1).sum(dim=2).float()
        magnitude = (w.abs() * mask).reshape(k, out, -1).sum(dim=2)
        trained = (reference[name].detach().cpu().abs() * alive).reshape(k, out, -1).sum(dim=2)
        rows = torch.zeros(k, out, dtype=torch.bool)
        for b in range(k):
            rows[b, _rank(count[b], magnitude[b], trained[b])[:n_keep]] = True
        keep[node.producer] = rows.view(-1)
    return channel_masks(model, keep)


def random_channel_masks(model: nn.Module, kept: dict[str, int], seed: int) -> Masks:
    """The lottery-ticket control: ``kept[producer]`` channels per base drawn uniformly at random
    in every producer (the same counts as the ticket, so the same channel sparsity per layer)."""
    k = num_bases(model)
    gen = torch.Generator().manual_seed(seed)
    keep: dict[str, torch.Tensor] = {}
    for node in channel_graph(model):
        out = model.get_parameter(f"{node.producer}.weight").shape[0] // k
        rows = torch.zeros(k, out, dtype=torch.bool)
        for b in range(k):
            rows[b, torch.randperm(out, generator=gen)[: kept[node.producer]]] = True
        keep[node.producer] = rows.view(-1)
    return channel_masks(model, keep)


def _random_control(dense: nn.Module, kept: dict[str, int], checkpoint: dict[str, torch.Tensor], tuner, kind: str, order_seed: int) -> dict[str, Any]:
    """Random channels at ``kept`` per layer, rewound to ``checkpoint`` and fine-tuned by ``tuner``
    with the ticket's batch order: the ticket's lottery-ticket control."""
    model = copy.deepcopy(dense).train()
    masks = random_channel_masks(model, kept, tuner.settings.seed)
    rewind_(model, checkpoint, masks)
    tuner.stage_name, tuner.order_seed = f"random-{kind}", order_seed
    tuner(model, masks)
    return {"accuracy": tuner.history[-1]["accuracy"], "accuracy_before_fine_tune": tuner.history[-1]["accuracy_before"], "kept_per_base": kept}


def _kept_per_base(model: nn.Module, masks: Masks) -> dict[str, int]:
    """Kept channels per base of every producer (refilled masks keep the same count in every base)."""
    k = num_bases(model)
    return {p: int(rows.sum()) // k for p, rows in kept_channels(model, masks).items()}


def _dense_per_base(model: nn.Module) -> dict[str, int]:
    k = num_bases(model)
    return {node.producer: model.get_parameter(f"{node.producer}.weight").shape[0] // k for node in channel_graph(model)}


def load_rewind_point(run, width: float, robustness: float, select: str) -> tuple[nn.Module, int]:
    """The served model at ``width``/λ built from the run's ``rewind.safetensors`` and the round it
    was written after; :class:`PruneError` (one line, what to do) when the run has none."""
    from safetensors import safe_open

    from server.store import REWIND, load_weights

    path = Path(run.folder) / REWIND
    if not path.is_file():
        raise PruneError(
            f"run '{run.folder}' has no {REWIND} (early weights for IMP's rewinding): train it with rewind-round between 1 and "
            "num-rounds, or pass --rewind final to rewind to the trained weights (prune and fine-tune, not a lottery ticket)"
        )
    try:
        state = load_weights(path)
        with safe_open(str(path), framework="pt") as fh:
            rnd = int((fh.metadata() or {}).get("round", 0))
        return run.module_from(state, width, robustness, select), rnd
    except (ValueError, RuntimeError, KeyError) as exc:
        raise PruneError(f"run '{run.folder}': {REWIND} cannot be loaded: {exc}") from None


def _weight_sparsity(model: nn.Module, masks: Masks) -> float:
    """Masked-out share of every conv/linear weight (classifier included)."""
    params = dict(model.named_parameters())
    names = prunable_names(model, include_classifier=True)
    total = sum(params[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in names)
    return 1.0 - kept / max(1, total)


def _channel_report(model: nn.Module, masks: Masks) -> dict[str, dict[str, Any]]:
    """Per producer: dense and kept channels per base, channel sparsity."""
    k = num_bases(model)
    keep = kept_channels(model, masks)
    report = {}
    for producer, rows in keep.items():
        counts = [int(c) for c in rows.view(k, -1).sum(dim=1)]
        out = rows.numel() // k
        report[producer] = {
            "dense_per_base": out,
            "kept_per_base": counts[0] if len(set(counts)) == 1 else counts,
            "channel_sparsity": 1.0 - float(rows.sum()) / rows.numel(),
        }
    return report


def _time_models(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per forward of each model, interleaved (one forward each per repeat)."""
    times: dict[str, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(x)
            model(x)
        for _ in range(repeats):
            for key, model in models.items():
                start = time.perf_counter()
                model(x)
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def run_training_data(run, partition: int | None, error: type[ValueError] = PruneError) -> tuple[ArrayData, str, Any]:
    """A finished run's training data for post-training steps (``prune``, ``compress``): the union
    of its client partitions, or one; problems raise ``error`` naming what is wrong."""
    from splitmix.config import ConfigError, RunConfig

    try:
        sim = RunConfig.from_mapping(run.config["run_config"])
    except (ConfigError, KeyError) as exc:
        raise error(f"run '{run.folder}' has an unreadable config.json: {exc}") from None
    data_cfg = sim.data_config()
    n = data_cfg.num_partitions
    if partition is not None and not 0 <= partition < n:
        raise error(f"--partition {partition} is out of range; the run has {n} client partitions: [0, {n})")
    ids = [partition] if partition is not None else list(range(n))
    try:
        parts = [client_train_data(data_cfg, i) for i in ids]
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"the run's training data is not available here: {exc}") from None
    data = ArrayData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    source = f"client partition {partition} of {n}" if partition is not None else f"union of all {n} client partitions"
    return data, f"{sim.data.dataset} ({sim.data.partition}): {source}", sim


# ---------------------------------------------------------------------------------------------
# fine-tuning


class _FineTuner:
    """``train_fn(model, masks)`` for the IMP driver: E epochs of masked SGD, one history row each."""

    def __init__(self, data: ArrayData, test: ArrayData, settings: PruneSettings, sim, report: Reporter) -> None:
        self.data, self.test, self.settings, self.sim, self.report = data, test, settings, sim, report
        self.batch_size = settings.batch_size or sim.training.batch_size
        self.pgd = sim.pgd()
        self.history: list[dict[str, Any]] = []
        self.stage_name = "imp"
        self.order_seed: int | None = None  # batch order of the next stage (None: from seed and stage)
        self.last_order_seed = 0

    def __call__(self, model: nn.Module, masks: Masks) -> None:
        s = self.settings
        stacked = cast(StackedNet, model)  # the run's model: a stack of bases
        stage = len(self.history) + 1
        start = time.perf_counter()
        before = _accuracy(model, self.test)
        self.last_order_seed = s.seed * 1000 + stage if self.order_seed is None else self.order_seed
        gen = torch.Generator().manual_seed(self.last_order_seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=self.sim.training.momentum, weight_decay=self.sim.training.weight_decay)
        n, k, lam = len(self.data), num_bases(model), s.robustness
        batches = [b for b in range(0, n, self.batch_size) if min(n, b + self.batch_size) - b >= 2]
        total, step, loss_sum = s.epochs * len(batches), 0, 0.0
        model.train()
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=gen)
            for first in batches:
                idx = order[first : first + self.batch_size]
                xb, yb = self.data.x[idx], self.data.y[idx]
                for group in optimizer.param_groups:  # cosine decay within the stage
                    group["lr"] = 0.5 * s.lr * (1.0 + math.cos(math.pi * step / max(1, total)))
                with routed(model, "clean"):
                    loss = per_base_loss(stacked.forward_bases(xb), yb)
                if lam > 0.0:
                    with routed(model, "adv"):
                        with frozen_bn_stats(model):
                            # B023: pgd_linf calls the loss right away, within this iteration
                            x_adv = pgd_linf(lambda z: per_base_loss(stacked.forward_bases(z), yb), per_base_inputs(xb, k), self.pgd, gen)  # noqa: B023
                        adv = per_base_loss(stacked.forward_bases(x_adv), yb)
                    loss = (1.0 - lam) * loss + lam * adv
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks_(model, masks)
                loss_sum += loss.item() / k
                step += 1
        model.eval()
        after = _accuracy(model, self.test)
        channels = _channel_report(model, masks)
        row = {
            "stage": stage,
            "kind": self.stage_name,
            "channel_sparsity": statistics.mean(c["channel_sparsity"] for c in channels.values()),
            "weight_sparsity": _weight_sparsity(model, masks),
            "accuracy_before": before,
            "accuracy": after,
            "train_loss": loss_sum / max(1, step),
            "steps": step,
            "seconds": time.perf_counter() - start,
            "layers": {p: c["channel_sparsity"] for p, c in channels.items()},
        }
        self.history.append(row)
        self.report(
            f"stage {stage} ({self.stage_name}): channel sparsity {row['channel_sparsity']:.3f}, weight sparsity "
            f"{row['weight_sparsity']:.3f}, accuracy {before:.4f} → {after:.4f} ({row['seconds']:.1f}s)"
        )


# ---------------------------------------------------------------------------------------------
# architecture: rebuild the sliced model without pickle


def describe_architecture(model: nn.Module, build: dict[str, Any], robustness: float) -> dict[str, Any]:
    """Every conv/linear/BN of ``model`` with its (sliced) shape, plus how to build the family."""
    layers: dict[str, dict[str, Any]] = {}
    norms: dict[str, dict[str, Any]] = {}
    dual_paths = {name for name, m in model.named_modules() if isinstance(m, DualBatchNorm)}  # their inner BNs come with them
    for name, m in model.named_modules():
        if isinstance(m, StackedConv2d):
            layers[name] = {
                "type": "StackedConv2d",
                "in_per_base": m.in_channels // m.num_bases,
                "out_per_base": m.out_channels // m.num_bases,
                "kernel_size": m.kernel_size[0],
                "stride": m.stride[0],
                "padding": m.padding[0],
                "bias": m.bias is not None,
            }
        elif isinstance(m, StackedLinear):
            layers[name] = {"type": "StackedLinear", "in_per_base": m.in_per_base, "out_per_base": m.out_per_base, "bias": m.bias is not None}
        elif isinstance(m, DualBatchNorm):
            norms[name] = {"type": "DualBatchNorm", "num_features": m.clean.num_features, "dims": 2 if isinstance(m.clean, nn.BatchNorm2d) else 1}
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and name.rpartition(".")[0] not in dual_paths:
            norms[name] = {"type": type(m).__name__, "num_features": m.num_features}
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            raise PruneError(f"cannot describe layer '{name}' ({type(m).__name__}) for rebuilding")
    return {"format": FORMAT, "build": build, "num_bases": num_bases(model), "robustness": robustness, "layers": layers, "norms": norms}


def _module_from(entry: dict[str, Any], k: int) -> nn.Module:
    kind = entry["type"]
    if kind == "StackedConv2d":
        return StackedConv2d(
            entry["in_per_base"], entry["out_per_base"], entry["kernel_size"], k, stride=entry["stride"], padding=entry["padding"], bias=entry["bias"]
        )
    if kind == "StackedLinear":
        return StackedLinear(entry["in_per_base"], entry["out_per_base"], k, bias=entry["bias"])
    if kind == "DualBatchNorm":
        return DualBatchNorm(entry["num_features"], dims=entry["dims"])
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(entry["num_features"])
    raise ValueError(f"unknown module type '{kind}' in {ARCHITECTURE}")


def build_from_architecture(arch: dict[str, Any]) -> nn.Module:
    """An (untrained) model with the shapes ``arch`` describes."""
    if arch.get("format") != FORMAT:
        raise ValueError(f"{ARCHITECTURE}: format {arch.get('format')!r} is not {FORMAT!r}")
    model = create_model(**arch["build"])
    k = int(arch["num_bases"])
    for path, entry in {**arch["layers"], **arch["norms"]}.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _module_from(entry, k))
    return model


def load_pruned(folder: str | Path) -> nn.Module:
    """The sliced model written by :func:`prune_run`, rebuilt from ``architecture.json`` and
    ``model.safetensors`` (no pickle), λ route set, in eval mode."""
    from server.store import load_weights

    folder = Path(folder)
    arch = json.loads((folder / ARCHITECTURE).read_text())
    model = build_from_architecture(arch)
    model.load_state_dict(load_weights(folder / WEIGHTS), strict=True)
    if any(isinstance(m, DualBatchNorm) for m in model.modules()):
        set_route(model, float(arch["robustness"]))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the job


def _default_out(run_folder: Path, s: PruneSettings) -> Path:
    name = f"pruned-w{s.width:g}-cs{s.channel_sparsity:g}"
    if s.robustness:
        name += f"-l{s.robustness:g}"
    if s.select != "first":
        name += f"-{s.select}"
    return run_folder / name


def run_pruning(run_folder: str | Path, settings: PruneSettings, out: str | Path | None = None, report: Reporter | None = None) -> PruneResult:
    """Prune, fine-tune and slice the model ``run_folder`` serves at ``settings.width``; write the
    output folder (see the module docstring). Input errors raise :class:`PruneError`."""
    from server.query import QueryError, load_run
    from server.store import save_weights

    say = report or (lambda text: None)
    t0 = time.perf_counter()
    s = settings
    # ---- inputs (every check before any work)
    try:
        run = load_run(run_folder)
        served = run.served(s.width, s.robustness, s.select)
    except (QueryError, FileNotFoundError) as exc:
        raise PruneError(str(exc)) from None
    except ValueError as exc:  # damaged checkpoint, state mismatch
        raise PruneError(f"run '{run_folder}' cannot be loaded: {exc}") from None
    dense = copy.deepcopy(served.module).cpu().eval()
    for p in dense.parameters():
        p.requires_grad_(True)
    try:
        names = _producer_names(dense)
    except NotImplementedError as exc:
        raise PruneError(f"model family '{run.spec.arch}' ({type(dense).__name__}) is not supported by channel slicing: {exc}") from None
    train, data_source, sim = run_training_data(run, s.partition)
    test = test_data(sim.data_config())
    folder = Path(out) if out is not None else _default_out(run.folder, s)
    torch.manual_seed(s.seed)

    # ---- the rewind point: the same width/λ mixture after round rewind-round (or the trained one)
    trained = {n: t.detach().clone() for n, t in dense.state_dict().items()}
    rewind_round = int(run.config["run_config"].get("num-rounds", 0))
    if s.rewind == "early":
        early, rewind_round = load_rewind_point(run, served.width, served.robustness, s.select)
        checkpoint = {n: t.detach().clone() for n, t in early.state_dict().items()}
    else:
        checkpoint = trained
    # ---- IMP with rewinding, refill per round; round 1 prunes the federated run's weights
    model = copy.deepcopy(dense).train()
    tuner = _FineTuner(train, test, s, sim, say)
    acc_dense = _accuracy(dense, test)
    say(
        f"{run.method_name} width {served.width:g} (bases {served.bases or '-'}) λ={served.robustness:g}: test accuracy {acc_dense:.4f}; "
        f"IMP {s.imp_rounds} rounds at rate {s.imp_rate:.4f} rewinding to round {rewind_round} → channel sparsity {s.channel_sparsity:g}; "
        f"data: {data_source} ({len(train)} examples)"
    )
    imp = iterative_magnitude_pruning(
        model, tuner, rounds=s.imp_rounds, rate=s.imp_rate, rewind_state=checkpoint, structure="refill", names=names, final_train=False, trained=True
    )
    imp_reached = _channel_report(model, imp.masks)
    # ---- final refill with IMP's per-layer allocation at global channel sparsity S, rewind, fine-tune
    dense_channels = _dense_per_base(model)
    imp_kept = _kept_per_base(model, imp.masks) if s.imp_rounds else dict(dense_channels)
    kept = imp_allocation(imp_kept, dense_channels, s.channel_sparsity)
    masks = exact_refill(model, imp.masks, kept, trained)
    rewind_(model, checkpoint, masks)
    tuner.stage_name = "final"
    tuner(model, masks)
    model.eval()
    controls: dict[str, dict[str, Any]] = {}
    if s.random_control:  # random channels, rewound and fine-tuned exactly as the ticket
        uniform = imp_allocation(dense_channels, dense_channels, s.channel_sparsity)  # every layer at S, same global count
        for kind, counts in (("same_counts", kept), ("uniform", uniform)):
            controls[kind] = _random_control(dense, counts, checkpoint, _FineTuner(train, test, s, sim, say), kind, tuner.last_order_seed)
    # ---- slice, check, measure
    sliced = slice_channels(model, kept_channels(model, masks)).eval()
    for m in (model, sliced):
        for p in m.parameters():
            p.requires_grad_(False)
    masked_logits, sliced_logits = batched_logits(model, test.x), batched_logits(sliced, test.x)
    max_diff = float((masked_logits - sliced_logits).abs().max())
    acc_masked = int((masked_logits.argmax(-1) == test.y).sum()) / len(test)
    acc_sliced = int((sliced_logits.argmax(-1) == test.y).sum()) / len(test)
    if not torch.allclose(masked_logits, sliced_logits, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"sliced model differs from the masked model (max |Δlogit| {max_diff:.3g})")
    shape = run.input_shape
    x = torch.rand(s.timing_batch, *shape, generator=torch.Generator().manual_seed(0))
    ms = _time_models(
        {"dense": dense, "sliced": sliced, "dense_fused": fuse_for_inference(dense), "sliced_fused": fuse_for_inference(sliced)}, x, s.timing_repeats
    )
    channels = _channel_report(model, masks)
    params = {"dense": count_params(dense), "sliced": count_params(sliced)}
    macs = {"dense": count_macs(dense, shape), "sliced": count_macs(sliced, shape)}
    conv_linear = lambda m: sum(p.numel() for n, p in m.named_parameters() if n in prunable_names(m, include_classifier=True))  # noqa: E731
    card: dict[str, Any] = {
        "run": str(run.folder.resolve()),
        "method": run.method_name,
        "dataset": sim.data.dataset,
        "model": run.spec.arch,
        "width": served.width,
        "robustness": served.robustness,
        "bases": served.bases,
        "base_selection": s.select,
        "input_shape": list(shape),
        "num_classes": run.spec.num_classes,
        "channel_sparsity": {
            "requested": s.channel_sparsity,
            "achieved": {p: c["channel_sparsity"] for p, c in channels.items()},
            "channels_per_base": {p: {"dense": c["dense_per_base"], "kept": c["kept_per_base"]} for p, c in channels.items()},
            "global": 1.0 - sum(kept.values()) / sum(dense_channels.values()),
            "after_imp_rounds": {p: c["channel_sparsity"] for p, c in imp_reached.items()},
            "imp_kept_per_base": imp_kept,
            "note": "global = 1 - sum(kept) / sum(dense) over the producers, per base: the requested sparsity, to whole channels. "
            "kept per layer = IMP's kept count (imp_kept_per_base) scaled by one common factor (largest remainder), "
            "so per-layer sparsities follow IMP's allocation and are not all equal to the requested one",
        },
        "weight_sparsity": _weight_sparsity(model, masks),
        "weight_sparsity_sliced": 1.0 - conv_linear(sliced) / conv_linear(dense),
        "params": {**params, "ratio": params["sliced"] / params["dense"]},
        "macs": {**macs, "ratio": macs["sliced"] / macs["dense"]},
        "accuracy": {"dense": acc_dense, "masked": acc_masked, "sliced": acc_sliced, **{f"random_{k}": c["accuracy"] for k, c in controls.items()}},
        "random_control": {
            **controls,
            "note": "same_counts: the ticket's kept count per layer and base, channels drawn at random; uniform: every layer at the "
            "requested sparsity (same global count), channels drawn at random; both rewound to the ticket's rewind point and "
            "fine-tuned with its epochs, rate and batch order",
        }
        if controls
        else None,
        "max_abs_logit_diff_masked_vs_sliced": max_diff,
        "inference_cpu": {
            "batch": s.timing_batch,
            "threads": torch.get_num_threads(),
            "repeats": s.timing_repeats,
            "statistic": "median ms per batch, interleaved",
            "eager": {"dense_ms": ms["dense"], "sliced_ms": ms["sliced"], "speedup": ms["dense"] / ms["sliced"]},
            "fused": {
                "dense_ms": ms["dense_fused"],
                "sliced_ms": ms["sliced_fused"],
                "speedup": ms["dense_fused"] / ms["sliced_fused"],
                "note": "BN folded, channels-last (models/fuse.py), as `splitmix query`/`serve` serve models",
            },
        },
        "imp": {
            "rounds": s.imp_rounds,
            "rate": s.imp_rate,
            "rate_derived": s.rate is None,
            "structure": "refill",
            "pruned_layers": names,
            "rewind": (
                f"round {rewind_round} of {run.config['run_config'].get('num-rounds')} (rewind.safetensors, the same width/λ mixture)"
                if s.rewind == "early"
                else "the run's trained weights (the served model): prune and fine-tune, not weight rewinding"
            ),
            "rewind_round": rewind_round,
            "first_round": "prunes the federated run's trained weights (the run is IMP's first training)",
            "final": "refill keeping IMP's per-layer allocation at the requested global channel sparsity, rewind, fine-tune",
        },
        "fine_tune": {
            "epochs_per_stage": s.epochs,
            "stages": len(tuner.history),
            "lr": s.lr,
            "schedule": "cosine within each stage",
            "batch_size": tuner.batch_size,
            "momentum": sim.training.momentum,
            "weight_decay": sim.training.weight_decay,
            "loss": "per-base cross-entropy, clean BN"
            + ("" if not s.robustness else f"; (1-λ)·clean + λ·PGD-{sim.training.pgd_steps} on adv BN, λ={s.robustness:g}"),
            "data": data_source,
            "examples": len(train),
            "seed": s.seed,
        },
        "seconds": {"fine_tune": sum(r["seconds"] for r in tuner.history), "total": time.perf_counter() - t0},
        "files": {
            "weights": WEIGHTS,
            "architecture": ARCHITECTURE,
            "history": "history.json, history.csv",
            "load": "tools.prune.load_pruned(folder)",
        },
    }
    # ---- write
    folder.mkdir(parents=True, exist_ok=True)
    build = {
        "name": run.spec.arch,
        "width": run.spec.atom_width if run.method.selectable_bases else served.width,
        "num_bases": num_bases(sliced),
        "num_classes": run.spec.num_classes,
        "in_channels": run.spec.in_channels,
        "image_size": run.spec.image_size,
        "dual_bn": run.spec.dual_bn,
    }
    save_weights(folder / WEIGHTS, sliced.state_dict(), metadata={"format": FORMAT})
    (folder / ARCHITECTURE).write_text(json.dumps(describe_architecture(sliced, build, served.robustness), indent=2) + "\n")
    card["seconds"]["total"] = time.perf_counter() - t0
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / "history.json").write_text(json.dumps(tuner.history, indent=2) + "\n")
    flat = [{**{k: v for k, v in r.items() if k != "layers"}, **{f"cs-{p}": v for p, v in r["layers"].items()}} for r in tuner.history]
    with open(folder / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return PruneResult(folder=folder.resolve(), card=card, history=tuner.history, dense=dense, masked=model, sliced=sliced, masks=masks)


def prune_run(
    run: str | Path,
    width: float,
    channel_sparsity: float,
    *,
    robustness: float = 0.0,
    select: str = "first",
    imp_rounds: int = 3,
    rate: float | None = None,
    epochs: int = 2,
    lr: float = 0.01,
    batch_size: int | None = None,
    partition: int | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    timing_repeats: int = 7,
    rewind: str = "early",
    random_control: bool = False,
    report: Reporter | None = None,
) -> Path:
    """Prune the model ``run`` serves at ``width`` to ``channel_sparsity`` and write the output
    folder; returns it. Runs where training data is (see the module docstring)."""
    settings = PruneSettings(
        width=width,
        channel_sparsity=channel_sparsity,
        robustness=robustness,
        select=select,
        imp_rounds=imp_rounds,
        rate=rate,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        partition=partition,
        seed=seed,
        timing_repeats=timing_repeats,
        rewind=rewind,
        random_control=random_control,
    )
    return run_pruning(run, settings, out, report).folder


# ---------------------------------------------------------------------------------------------
# command line


def card_table(card: dict[str, Any]):
    from rich.table import Table

    cs = card["channel_sparsity"]
    inf = card["inference_cpu"]
    table = Table(
        title=f"{card['method']} width {card['width']:g} λ={card['robustness']:g}: channel sparsity {cs['requested']:g} "
        f"(weight sparsity {card['weight_sparsity']:.3f})"
    )
    for column in ("model", "channels/base", "params", "MACs", "accuracy", "ms/batch", "ms/batch fused"):
        table.add_column(column, justify="right")
    dense_ch = "-".join(str(c["dense"]) for c in cs["channels_per_base"].values())
    kept_ch = "-".join(str(c["kept"]) for c in cs["channels_per_base"].values())
    table.add_row(
        "dense",
        dense_ch,
        f"{card['params']['dense']:,}",
        f"{card['macs']['dense']:,}",
        f"{card['accuracy']['dense']:.4f}",
        f"{inf['eager']['dense_ms']:.2f}",
        f"{inf['fused']['dense_ms']:.2f}",
    )
    table.add_row("masked", kept_ch, "(dense shapes)", "(dense)", f"{card['accuracy']['masked']:.4f}", "-", "-")
    table.add_row(
        "sliced",
        kept_ch,
        f"{card['params']['sliced']:,}",
        f"{card['macs']['sliced']:,}",
        f"{card['accuracy']['sliced']:.4f}",
        f"{inf['eager']['sliced_ms']:.2f}",
        f"{inf['fused']['sliced_ms']:.2f}",
    )
    for kind, control in (card.get("random_control") or {}).items():
        if kind != "note":
            counts = "-".join(str(c) for c in control["kept_per_base"].values())
            table.add_row(f"random ({kind.replace('_', ' ')})", counts, "", "", f"{control['accuracy']:.4f}", "-", "-")
    table.add_row(
        "sliced/dense",
        "",
        f"{card['params']['ratio']:.3f}",
        f"{card['macs']['ratio']:.3f}",
        "",
        f"{inf['eager']['speedup']:.2f}× faster",
        f"{inf['fused']['speedup']:.2f}× faster",
    )
    return table


def apply_threads(threads: int | None) -> bool:
    """``--threads`` of a post-training command: set torch's CPU threads; False (and an error on
    stderr) for a value below 1."""
    if threads is None:
        return True
    if threads < 1:
        _fail(f"--threads {threads} is out of range; allowed: an integer >= 1")
        return False
    torch.set_num_threads(threads)
    return True


def cmd_prune(args: argparse.Namespace) -> int:
    """Handler of ``splitmix prune``: progress on stderr, a table, the output folder last on stdout."""
    from rich.console import Console

    err = Console(stderr=True)
    if not apply_threads(args.threads):
        return 2
    try:
        settings = PruneSettings(
            width=args.width,
            channel_sparsity=args.channel_sparsity,
            robustness=args.robustness,
            select=args.select,
            imp_rounds=args.imp_rounds,
            rate=args.rate,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            partition=args.partition,
            seed=args.seed,
            timing_repeats=args.repeats,
            rewind=args.rewind,
            random_control=args.random_control,
        )
        result = run_pruning(args.run, settings, args.out, report=lambda text: err.print(text, highlight=False))
    except PruneError as exc:
        _fail(str(exc))
        return 2
    Console(width=120).print(card_table(result.card))
    print(result.folder, flush=True)  # the last line of stdout: the output folder
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run", help="a run folder written by `splitmix simulate`")
    parser.add_argument("--width", type=float, required=True, help="a width the run serves (see `splitmix models`)")
    parser.add_argument(
        "--channel-sparsity",
        type=float,
        required=True,
        help="share of all prunable channels removed, in [0, 1); per layer as IMP allocates (model_card.json lists each)",
    )
    parser.add_argument(
        "--robustness", type=float, default=0.0, help="λ in [0, 1] the model is pruned and fine-tuned for (default 0; >0 trains with PGD)"
    )
    parser.add_argument("--select", choices=("first", "best"), default="first", help="the first k bases, or the best k by accuracy")
    parser.add_argument("--imp-rounds", type=int, default=3, help="IMP rounds before the exact final refill (default 3; 0 = one shot)")
    parser.add_argument("--rate", type=float, default=None, help="weights pruned per IMP round (default 1-(1-S)^(1/rounds))")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per IMP round and for the final ticket (default 2)")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (SGD, cosine within each stage; default 0.01)")
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch size (default: the run's)")
    parser.add_argument(
        "--partition",
        type=int,
        default=None,
        help="fine-tune on this client partition only (default: the union of all; in a deployment the data holder runs this on its own data)",
    )
    parser.add_argument(
        "--rewind",
        choices=("early", "final"),
        default="early",
        help="IMP rewinds to the run's rewind.safetensors (early; default) or to the trained weights (final: prune and fine-tune)",
    )
    parser.add_argument(
        "--random-control",
        action="store_true",
        help="also fine-tune random channels (at the ticket's per-layer counts; at S in every layer) and report their accuracy",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (median, batch 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for fine-tuning and timing (default: torch's)")
    parser.add_argument("--out", default=None, help="output folder (default <run>/pruned-w<W>-cs<S>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_prune)
    return parser


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``splitmix prune`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "prune",
        help="structured lottery ticket of a served model: IMP + refill + rewinding to an early round, fine-tune, slice to a smaller dense model",
        description="Prune the model a run serves at --width channel-wise (IMP with refill and rewinding to the run's rewind.safetensors, "
        "arXiv 2202.04736), "
        "fine-tune it and physically slice it. Needs training data: in a deployment the data holder runs this.",
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m tools.prune", description=__doc__.splitlines()[0]))
    return cmd_prune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
