"""``splitmix compress RUN``: UVC (arXiv 2203.08243) compression of a served ViT to a FLOPs budget.

The model a finished ViT run serves at width W and robustness λ (for Split-Mix the k = W/r bases
stacked, :meth:`server.query.Run.served`) is compressed with UVC (``techniques/uvc_search.py``): each base
learns how many heads, value dims per head and MLP neurons to remove in every block and which
blocks to skip, jointly with its weights, under one budget on the mixture's MACs (primal–dual,
distillation from the dense model); the result is projected onto the budget, fine-tuned with fixed
masks (distillation again) and physically sliced into a smaller model (:class:`models.vit_sliced.SlicedViT`).
The sliced model is checked against the masked one on the test set, and its MACs are measured with
``torch.utils.flop_counter`` (at most ``--flops-ratio`` × the dense MACs, or the job fails).

Baseline, in the same job: magnitude pruning — the same number of heads and MLP neurons kept in
every block (the most uniform split meeting the same budget), chosen by weight norm, no learning,
then fine-tuned for search + fine-tune epochs, so it trains its weights as long as UVC does
(``random_control``: the same counts with groups drawn at random, the same epochs). The card
reports the accuracies at their measured FLOPs, and UVC's learned ratio before the projection.

**Data**: as ``splitmix prune``: where training data is. In simulation the default is the union of
the run's client partitions (``--partition I``: one client's data); the run's test set is only
used to report accuracy. At λ > 0 the λ-mixed LayerNorm route is trained on clean data (no PGD).

Output folder (``--out``, default ``<run>/uvc-w<W>-f<ratio>[-l<λ>][-best]``)::

    model.safetensors   the sliced model's state (tensors only; no pickle)
    architecture.json   the SlicedViT description (per base: kept blocks, head order, v dims,
                        MLP width) + the λ route
    model_card.json     run, width, λ, bases, requested/measured FLOPs ratio, dense vs compressed
                        params/MACs, accuracies (dense, after search, compressed, magnitude
                        baseline), what UVC kept per base and block, settings, seconds
    history.json        per epoch of the search and of each fine-tuning: loss, MACs ratio, z
    model.pt2           torch.export program of the sliced model (dynamic batch), like
                        ``splitmix query``'s export: runs without this project's code

:func:`load_compressed` rebuilds the compressed model from ``architecture.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.blocks import DualBatchNorm, set_route
from models.cost import count_macs, count_params
from models.vit import VisionTransformer
from models.vit_sliced import Selection, SlicedViT, ViTGeometry, slice_vit
from splitmix.data import ArrayData, test_data
from techniques.uvc_search import (
    UVCConfig,
    finetune,
    group_scores,
    magnitude_selection,
    masked_copy,
    project_to_budget,
    teacher_logits,
    uvc_search,
)
from tools.prune import apply_threads, batched_logits, run_training_data

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

WEIGHTS, ARCHITECTURE, CARD, HISTORY = "model.safetensors", "architecture.json", "model_card.json", "history.json"
PROGRAM = "model.pt2"
Reporter = Callable[[str], None]


class CompressError(ValueError):
    """An input ``splitmix compress`` cannot use (the message names the option and what is allowed)."""


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# helpers


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return int((logits.argmax(-1) == y).sum()) / max(1, len(y))


def _check_inputs(flops_ratio: float, search_epochs: int, finetune_epochs: int, batch_size: int, lr: float) -> None:
    def bad(option: str, value: Any, allowed: str) -> CompressError:
        return CompressError(f"--{option} {value!r} is out of range; allowed: {allowed}")

    if not isinstance(flops_ratio, (int, float)) or not 0.0 < flops_ratio <= 1.0:
        raise bad("flops-ratio", flops_ratio, "(0, 1]")
    if search_epochs < 0:
        raise bad("search-epochs", search_epochs, "an integer >= 0")
    if finetune_epochs < 0:
        raise bad("finetune-epochs", finetune_epochs, "an integer >= 0")
    if batch_size < 2:
        raise bad("batch-size", batch_size, "an integer >= 2")
    if not (lr > 0 and math.isfinite(lr)):
        raise bad("lr", lr, "a number > 0")


LEARNED_TOLERANCE = 0.05  # the search's own MACs ratio should land within 5 % of the budget


def _check_budget(geom: ViTGeometry, flops_ratio: float, baseline: bool) -> None:
    """Before any training: a budget that cannot hold one head and one neuron per block (or, for
    the magnitude baseline, in every block) fails here, naming the smallest ratio allowed."""
    dense = geom.dense_macs()
    floor = geom.fixed_macs + geom.num_bases * geom.block_macs(1, geom.head_dim, 1)  # one thin block per base
    if baseline:
        floor = geom.fixed_macs + geom.num_bases * geom.depth * geom.block_macs(1, geom.head_dim, 1)
    if flops_ratio * dense < floor:
        need = "one head and one neuron in every block (the magnitude baseline; --no-baseline lowers this)" if baseline else "one thin block per base"
        raise CompressError(f"--flops-ratio {flops_ratio:g} is out of range for this model; allowed: [{floor / dense:.4f}, 1] ({need})")


def _refuse_degenerate(sel: Selection, accuracy: float, dense_accuracy: float, num_classes: int, examples: int, flops_ratio: float) -> None:
    """Refuse a result no one should serve: a base with every block skipped, or test accuracy
    not above chance (1/classes plus two binomial standard errors) when the dense model is above it
    (a dense model at chance has nothing to lose; the card shows it)."""
    empty = [b for b in range(sel.blocks.shape[0]) if not bool(sel.blocks[b].any())]
    if empty:
        raise CompressError(f"--flops-ratio {flops_ratio:g} skips every block of base(s) {empty}; refused (raise --flops-ratio)")
    chance = 1.0 / num_classes
    threshold = chance + 2.0 * math.sqrt(chance * (1.0 - chance) / max(1, examples))
    if accuracy <= threshold < dense_accuracy:
        raise CompressError(
            f"--flops-ratio {flops_ratio:g} leaves accuracy {accuracy:.4f}, at chance (<= {threshold:.4f}; dense {dense_accuracy:.4f}); "
            "refused (raise --flops-ratio)"
        )


def _default_out(run_folder: Path, width: float, flops_ratio: float, robustness: float, select: str) -> Path:
    name = f"uvc-w{width:g}-f{flops_ratio:g}"
    if robustness:
        name += f"-l{robustness:g}"
    if select != "first":
        name += f"-{select}"
    return run_folder / name


class _Progress:
    """A rich progress bar on stderr (transient), or nothing; ``tick(info)`` advances it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def stage(self, name: str, total: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(name, total=total, info="")

    def tick(self, info: dict[str, float]) -> None:
        if self.bar is not None and self.task is not None:
            text = " ".join(f"{k} {v:.3g}" for k, v in info.items() if k in ("loss", "ratio_hard", "z"))
            self.bar.update(self.task, advance=1, info=text)


class _EpochLog:
    """Step hook: advances the progress bar and folds the steps into one history row per epoch."""

    def __init__(self, stage: str, steps_per_epoch: int, history: list[dict[str, Any]], progress: _Progress) -> None:
        self.stage, self.per, self.history, self.progress = stage, max(1, steps_per_epoch), history, progress
        self.rows: list[dict[str, float]] = []

    def __call__(self, info: dict[str, float]) -> None:
        self.progress.tick(info)
        self.rows.append(info)
        if len(self.rows) % self.per == 0:
            self._row(self.rows[-self.per :])

    def flush(self) -> None:
        """A row for a last, partial epoch (if any)."""
        rest = len(self.rows) % self.per
        if rest:
            self._row(self.rows[-rest:])

    def _row(self, chunk: list[dict[str, float]]) -> None:
        row: dict[str, Any] = {
            "stage": self.stage,
            "epoch": math.ceil(len(self.rows) / self.per),
            "steps": len(chunk),
            "loss": sum(r["loss"] for r in chunk) / len(chunk),
        }
        if "ratio_hard" in chunk[-1]:
            row.update(macs_ratio=chunk[-1]["ratio_hard"], z=chunk[-1]["z"])
        self.history.append(row)


def _steps_per_epoch(n: int, batch: int) -> int:
    return sum(1 for i in range(0, n, batch) if min(n, i + batch) - i >= 2)


# ---------------------------------------------------------------------------------------------
# the job


def compress_run(
    run_folder: str | Path,
    width: float,
    flops_ratio: float,
    out: str | Path | None = None,
    robustness: float = 0.0,
    search_epochs: int = 10,
    finetune_epochs: int = 10,
    seed: int = 0,
    report: Reporter | None = print,
    *,
    select: str = "first",
    batch_size: int = 64,
    lr: float = 5e-4,
    partition: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    config: UVCConfig | None = None,
    random_control: bool = False,
) -> dict[str, Any]:
    """Compress the ViT ``run_folder`` serves at ``width`` (and λ = ``robustness``) to
    ``flops_ratio`` of its MACs with UVC, fine-tune, slice, write the output folder (module
    docstring) and return the model card. Input errors raise :class:`CompressError` (a
    ``ValueError``), a non-ViT run included."""
    from server.query import QueryError, load_run
    from server.store import save_weights

    say = report or (lambda text: None)
    t0 = time.perf_counter()
    _check_inputs(flops_ratio, search_epochs, finetune_epochs, batch_size, lr)
    try:
        run = load_run(run_folder)
        served = run.served(width, robustness, select)
    except (QueryError, FileNotFoundError) as exc:
        raise CompressError(str(exc)) from None
    except ValueError as exc:  # damaged checkpoint, state mismatch
        raise CompressError(f"run '{run_folder}' cannot be loaded: {exc}") from None
    if not isinstance(served.module, VisionTransformer):
        raise CompressError(
            f"UVC compresses Vision Transformers only; run '{run.folder}' trains model '{run.spec.arch}' "
            f"({type(served.module).__name__}); use a ViT family (vit, vit_attnscale, vit_featscale)"
        )
    dense = copy.deepcopy(served.module).cpu().eval()
    for p in dense.parameters():
        p.requires_grad_(True)
    train, data_source, sim = run_training_data(run, partition, CompressError)
    test = test_data(sim.data_config())
    folder = Path(out) if out is not None else _default_out(run.folder, served.width, flops_ratio, served.robustness, select)
    cfg = replace(config or UVCConfig(), flops_ratio=float(flops_ratio), lr=lr)
    torch.manual_seed(seed)

    geom = ViTGeometry.from_model(dense)
    shape = run.input_shape
    dense_macs = count_macs(dense, shape)
    if dense_macs != geom.dense_macs():
        raise RuntimeError(f"UVC's MAC formula ({geom.dense_macs()}) disagrees with the flop counter ({dense_macs}) for this ViT")
    budget = flops_ratio * dense_macs
    _check_budget(geom, flops_ratio, baseline)
    acc_dense = _accuracy(batched_logits(dense, test.x), test.y)
    teacher = teacher_logits(dense, train.x)
    per_epoch = _steps_per_epoch(len(train), batch_size)
    history: list[dict[str, Any]] = []
    say(
        f"{run.method_name} ViT width {served.width:g} (bases {served.bases or '-'}) λ={served.robustness:g}: test accuracy "
        f"{acc_dense:.4f}, {dense_macs:,} MACs; UVC to {flops_ratio:g} of the MACs; data: {data_source} ({len(train)} examples)"
    )
    seconds: dict[str, float] = {}
    with _Progress(progress) as bar:
        # ---- stage 1: UVC search, then project onto the budget
        t = time.perf_counter()
        model = copy.deepcopy(dense)
        steps = search_epochs * per_epoch
        bar.stage("UVC search", steps)
        log = _EpochLog("search", per_epoch, history, bar)
        search = uvc_search(model, train.x, train.y, cfg, steps, batch_size=batch_size, seed=seed, teacher=teacher, on_step=log)
        log.flush()
        learned = search.selection()
        gates = search.gates.detach()
        sel = project_to_budget(geom, learned, group_scores(model), budget, gate_margin=gates[..., 1] - gates[..., 0], fill=True)
        acc_search = _accuracy(batched_logits(masked_copy(model, sel), test.x), test.y)
        seconds["search"] = time.perf_counter() - t
        learned_ratio = learned.macs(geom) / dense_macs
        say(
            f"search ({steps} steps): learned MACs ratio {learned_ratio:.4f} (budget {flops_ratio:g}), after the "
            f"budget projection (last step) {sel.macs(geom) / dense_macs:.4f}; accuracy before fine-tuning {acc_search:.4f} "
            f"({seconds['search']:.1f}s)"
        )
        if abs(learned_ratio - flops_ratio) > LEARNED_TOLERANCE * flops_ratio:
            say(
                f"warning: the search's learned MACs ratio {learned_ratio:.4f} is more than {LEARNED_TOLERANCE:.0%} from the "
                f"budget {flops_ratio:g}; the projection, not UVC, sets this model's size (more --search-epochs may help)"
            )
        # ---- stage 2: fine-tune with fixed masks, slice, check
        t = time.perf_counter()
        bar.stage("UVC fine-tune", finetune_epochs * per_epoch)
        log = _EpochLog("finetune", per_epoch, history, bar)
        finetune(
            model,
            sel,
            train.x,
            train.y,
            teacher,
            finetune_epochs,
            lr=lr,
            batch_size=batch_size,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            seed=seed,
            on_step=log,
        )
        log.flush()
        seconds["finetune"] = time.perf_counter() - t
        sliced, check = _slice_and_check(model, sel, served.robustness, test, shape, budget)
        _refuse_degenerate(sel, check["accuracy"], acc_dense, run.spec.num_classes, len(test), flops_ratio)
        say(
            f"UVC: accuracy {check['accuracy']:.4f} at {check['macs']:,} MACs (ratio {check['macs'] / dense_macs:.4f}; "
            f"|Δlogit| sliced vs masked {check['max_diff']:.2g}) ({seconds['finetune']:.1f}s)"
        )
        # ---- baselines: uniform magnitude pruning (and, if asked, random groups at the same counts)
        #      to the same budget, fine-tuned for UVC's weight-training epochs (search + fine-tune)
        arms: list[tuple[str, torch.Generator | None]] = [("magnitude", None)] if baseline else []
        if random_control:
            arms.append(("random", torch.Generator().manual_seed(seed + 7)))
        entries: dict[str, dict[str, Any]] = {}
        for arm, generator in arms:
            t = time.perf_counter()
            arm_model = copy.deepcopy(dense)
            arm_sel = magnitude_selection(arm_model, flops_ratio, generator)
            acc0 = _accuracy(batched_logits(masked_copy(arm_model, arm_sel), test.x), test.y)
            arm_epochs = search_epochs + finetune_epochs  # UVC's search trains the weights too: the same epochs
            bar.stage(f"{arm} fine-tune", arm_epochs * per_epoch)
            log = _EpochLog("baseline-finetune" if arm == "magnitude" else f"{arm}-finetune", per_epoch, history, bar)
            finetune(
                arm_model,
                arm_sel,
                train.x,
                train.y,
                teacher,
                arm_epochs,
                lr=lr,
                batch_size=batch_size,
                alpha=cfg.alpha,
                temperature=cfg.temperature,
                seed=seed,
                on_step=log,
            )
            log.flush()
            _, arm_check = _slice_and_check(arm_model, arm_sel, served.robustness, test, shape, budget)
            seconds[arm] = time.perf_counter() - t
            how = "by weight norm (proj / fc2 columns)" if generator is None else "drawn at random"
            entries[arm] = {
                "method": f"{arm}: uniform heads + MLP neurons {how}, no learning, fine-tuned for search + fine-tune epochs "
                "(UVC's weight-training epochs)",
                "finetune_epochs": arm_epochs,
                "accuracy_before_finetune": acc0,
                "accuracy": arm_check["accuracy"],
                "macs": arm_check["macs"],
                "macs_ratio": arm_check["macs"] / dense_macs,
                "params": arm_check["params"],
                "kept": arm_sel.summary(),
            }
            say(
                f"{arm} baseline: accuracy {acc0:.4f} → {arm_check['accuracy']:.4f} at ratio {arm_check['macs'] / dense_macs:.4f} "
                f"({seconds[arm]:.1f}s)"
            )
        base_entry = entries.get("magnitude")
    seconds["total"] = time.perf_counter() - t0
    card = _card(
        run,
        served,
        sim,
        data_source,
        len(train),
        select,
        flops_ratio,
        dense,
        dense_macs,
        acc_dense,
        acc_search,
        learned,
        sel,
        geom,
        check,
        base_entry,
        search,
        cfg,
        search_epochs,
        finetune_epochs,
        batch_size,
        seed,
        seconds,
    )
    # ---- write
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, sliced.state_dict(), metadata={"format": sliced.architecture["format"]})
    (folder / ARCHITECTURE).write_text(json.dumps({**sliced.architecture, "robustness": served.robustness}, indent=2) + "\n")
    _export_program(sliced, run.input_shape, folder / PROGRAM)
    if "random" in entries:
        card["random_control"] = entries["random"]
    card["seconds"]["total"] = time.perf_counter() - t0
    card["folder"] = str(folder.resolve())
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / HISTORY).write_text(json.dumps(history, indent=2) + "\n")
    return card


def _slice_and_check(
    model: VisionTransformer, sel: Selection, robustness: float, test: ArrayData, shape: tuple[int, ...], budget: float
) -> tuple[SlicedViT, dict[str, Any]]:
    """Slice, compare with the masked model on the test set, measure MACs; fail loudly on a mismatch."""
    masked = masked_copy(model, sel).eval()
    sliced = slice_vit(model, sel).eval()
    if any(isinstance(m, DualBatchNorm) for m in sliced.modules()):
        set_route(sliced, float(robustness))
    for m in (masked, sliced):
        for p in m.parameters():
            p.requires_grad_(False)
    masked_logits, sliced_logits = batched_logits(masked, test.x), batched_logits(sliced, test.x)
    max_diff = float((masked_logits - sliced_logits).abs().max())
    if not torch.allclose(masked_logits, sliced_logits, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"sliced ViT differs from the masked model (max |Δlogit| {max_diff:.3g})")
    macs = count_macs(sliced, shape)
    if macs > budget:
        raise RuntimeError(f"sliced ViT has {macs:,} MACs, over the budget of {budget:,.0f}")
    return sliced, {
        "accuracy": _accuracy(sliced_logits, test.y),
        "accuracy_masked": _accuracy(masked_logits, test.y),
        "macs": macs,
        "params": count_params(sliced),
        "max_diff": max_diff,
    }


def _card(
    run,
    served,
    sim,
    data_source: str,
    examples: int,
    select: str,
    flops_ratio: float,
    dense: nn.Module,
    dense_macs: int,
    acc_dense: float,
    acc_search: float,
    learned: Selection,
    sel: Selection,
    geom: ViTGeometry,
    check: dict[str, Any],
    base_entry: dict[str, Any] | None,
    search,
    cfg: UVCConfig,
    search_epochs: int,
    finetune_epochs: int,
    batch_size: int,
    seed: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    params_dense = count_params(dense)
    gates = search.gates.detach()
    return {
        "run": str(run.folder.resolve()),
        "method": run.method_name,
        "dataset": sim.data.dataset,
        "model": run.spec.arch,
        "width": served.width,
        "robustness": served.robustness,
        "bases": served.bases,
        "base_selection": select,
        "input_shape": list(run.input_shape),
        "num_classes": run.spec.num_classes,
        "compression": "UVC (arXiv 2203.08243): heads, per-head value dims, MLP neurons, block skipping; per base",
        "flops_ratio": {
            "requested": flops_ratio,
            "measured": check["macs"] / dense_macs,
            "learned_before_projection": learned.macs(geom) / dense_macs,
            "learned_within_tolerance": abs(learned.macs(geom) / dense_macs - flops_ratio) <= LEARNED_TOLERANCE * flops_ratio,
            "after_projection": sel.macs(geom) / dense_macs,
            "projection": "last step: greedy energy-per-MAC removal until within budget, then refill (not part of UVC)",
            "note": "MACs of the sliced model / the dense model, both measured with torch.utils.flop_counter (FLOPs = 2 × MACs)",
        },
        "macs": {"dense": dense_macs, "compressed": check["macs"], "ratio": check["macs"] / dense_macs},
        "flops": {"dense": 2 * dense_macs, "compressed": 2 * check["macs"]},
        "params": {"dense": params_dense, "compressed": check["params"], "ratio": check["params"] / params_dense},
        "accuracy": {"dense": acc_dense, "after_search": acc_search, "masked": check["accuracy_masked"], "compressed": check["accuracy"]},
        "max_abs_logit_diff_masked_vs_sliced": check["max_diff"],
        "baseline": base_entry,
        "kept": sel.summary(),
        "gates": {"logit_margin_g1_minus_g0": (gates[..., 1] - gates[..., 0]).tolist(), "z": search.z},
        "settings": {
            "search_epochs": search_epochs,
            "finetune_epochs": finetune_epochs,
            "batch_size": batch_size,
            "seed": seed,
            "data": data_source,
            "examples": examples,
            "uvc": asdict(cfg),
            "finetune": "AdamW (lr, weight decay 0.05), cosine, distillation from the dense model, masks fixed",
        },
        "seconds": dict(seconds),
        "files": {
            "weights": WEIGHTS,
            "architecture": ARCHITECTURE,
            "history": HISTORY,
            "program": PROGRAM,
            "load": "tools.compress.load_compressed(folder), or torch.export.load(model.pt2).module()",
        },
    }


def _export_program(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """torch.export the sliced model with a dynamic batch (what ``splitmix query`` exports too)."""
    example = torch.zeros(2, *input_shape)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    torch.export.save(program, str(path))


def load_compressed(folder: str | Path) -> nn.Module:
    """The compressed ViT written by :func:`compress_run`, rebuilt from ``architecture.json`` and
    ``model.safetensors`` (no pickle), λ route set, in eval mode."""
    from server.store import load_weights

    folder = Path(folder)
    arch = json.loads((folder / ARCHITECTURE).read_text())
    model = SlicedViT(arch)
    model.load_state_dict(load_weights(folder / WEIGHTS), strict=True)
    if any(isinstance(m, DualBatchNorm) for m in model.modules()):
        set_route(model, float(arch.get("robustness", 0.0)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# command line


def card_table(card: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"UVC: {card['model']} width {card['width']:g} λ={card['robustness']:g}, FLOPs budget {card['flops_ratio']['requested']:g}")
    for column in ("model", "params", "MACs", "MACs ratio", "accuracy"):
        table.add_column(column, justify="right")
    table.add_row("dense", f"{card['params']['dense']:,}", f"{card['macs']['dense']:,}", "1.000", f"{card['accuracy']['dense']:.4f}")
    table.add_row(
        "UVC (sliced)",
        f"{card['params']['compressed']:,}",
        f"{card['macs']['compressed']:,}",
        f"{card['macs']['ratio']:.3f}",
        f"{card['accuracy']['compressed']:.4f}",
    )
    learned = card["flops_ratio"]["learned_before_projection"]
    table.add_row("UVC learned, before projection", "", "", f"{learned:.3f}", "")
    base = card.get("baseline")
    if base:
        table.add_row("magnitude", f"{base['params']:,}", f"{base['macs']:,}", f"{base['macs_ratio']:.3f}", f"{base['accuracy']:.4f}")
    return table


def cmd_compress(args: argparse.Namespace) -> int:
    """Handler of ``splitmix compress``: progress on stderr, a table, the output folder last on stdout."""
    from rich.console import Console

    err = Console(stderr=True)
    if not apply_threads(args.threads):
        return 2
    try:
        card = compress_run(
            args.run,
            args.width,
            args.flops_ratio,
            out=args.out,
            robustness=args.robustness,
            search_epochs=args.search_epochs,
            finetune_epochs=args.finetune_epochs,
            seed=args.seed,
            report=lambda text: err.print(text, highlight=False),
            select=args.select,
            batch_size=args.batch_size,
            lr=args.lr,
            partition=args.partition,
            baseline=not args.no_baseline,
            progress=not args.quiet,
        )
    except CompressError as exc:
        _fail(str(exc))
        return 2
    Console(width=120).print(card_table(card))
    print(card["folder"], flush=True)  # the last line of stdout: the output folder
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run", help="a ViT run folder written by `splitmix simulate`")
    parser.add_argument("--width", type=float, required=True, help="a width the run serves (see `splitmix models`)")
    parser.add_argument("--flops-ratio", type=float, required=True, help="MACs budget as a share of the dense model's, in (0, 1]")
    parser.add_argument("--robustness", type=float, default=0.0, help="λ in [0, 1] of the served model (default 0; trained on clean data)")
    parser.add_argument("--select", choices=("first", "best"), default="first", help="the first k bases, or the best k by accuracy")
    parser.add_argument("--search-epochs", type=int, default=10, help="UVC search epochs (default 10; 0 = budget projection only)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs with fixed masks (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of search and fine-tuning (default 5e-4)")
    parser.add_argument(
        "--partition",
        type=int,
        default=None,
        help="train on this client partition only (default: the union of all; in a deployment the data holder runs this)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the magnitude-pruning baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="output folder (default <run>/uvc-w<W>-f<ratio>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_compress)
    return parser


def add_compress_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``splitmix compress`` to the CLI's subparsers (one line in splitmix/cli.py)."""
    parser = subparsers.add_parser(
        "compress",
        help="UVC: compress a served ViT to a FLOPs budget (heads, head dims, MLP neurons, blocks), fine-tune, slice",
        description="Compress the ViT a run serves at --width to --flops-ratio of its MACs with UVC (arXiv 2203.08243), "
        "fine-tune it with distillation and physically slice it; compares against magnitude pruning at the same "
        "budget. Needs training data: in a deployment the data holder runs this.",
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m tools.compress", description=__doc__.splitlines()[0]))
    return cmd_compress(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
