"""``splitmix l2o train|distill|amalgamate|evaluate``: learned client optimizers (issue 8).

- ``train``: meta-train the artifacts ``techniques/optimizers.py`` loads (LSTM, symbolic rule, amalgamated
  student) into a folder (default: the per-user cache the clients use).
- ``distill``: re-run the symbolic distillation of the folder's LSTM (other route, lags, search).
- ``amalgamate``: train another student (scheme mean / minmax / choice, perturbation) under a name
  (``amalgamated`` replaces the registry's student; other names are compared by ``evaluate``).
- ``evaluate``: held-out optimizees (other init seeds, width and data partition than in
  meta-training), every optimizer through the real ``torch.optim`` path: SGD, Adam and each of
  the six teachers with its learning rate chosen on *validation* optimizees (other seeds than
  the reported ones) from a grid widened past an edge best, the learned optimizers at the step
  bound they were meta-trained with. Reports the geometric mean and spread of the final loss
  over the seeds, each chosen rate and whether it sits at a grid edge, and the amalgamation bar
  (student within 1.1× of the best teacher). Writes results.json, curves.csv, loss_curves.png
  and, with ``--results``, a results record (``results/l2o-benchmark.json``).

Run: ``python -m tools.l2o evaluate`` or, once wired into the CLI, ``splitmix l2o evaluate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

Reporter = Callable[[str], None]
SGD_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TEACHER_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)  # × OA's preset lr
# Final losses are floored here before logs: float32 cross-entropy rounds a sample's loss below
# ~6e-8 (float32 epsilon) to exactly 0, so smaller full-partition losses are not resolved and a
# few zeros would otherwise decide a geometric mean.
LOSS_FLOOR = 1e-8
STUDENT_BAR = 1.1  # the student's geometric-mean final loss must be within this factor of the best teacher's


@dataclass(frozen=True)
class EvalConfig:
    """One held-out evaluation; every field lands in results.json."""

    hidden: int = 64
    partition: str = "heldout"
    batch_size: int = 64
    steps: int = 300
    seeds: int = 5
    first_seed: int = 1000  # meta-training uses other seeds (0–149, 50 000+, 2 000 000+ …)
    tune_seeds: int = 3  # validation optimizees the learning rates are chosen on
    tune_first_seed: int = 5000  # disjoint from the reported seeds
    every: int = 10
    teachers: bool = True


# --------------------------------------------------------------------------- running optimizers
# ``factory`` is Callable[..., ...]: callers bind loop variables as lambda defaults, which mypy cannot check against Callable[[Any], ...]
def run_optimizer(factory: Callable[..., torch.optim.Optimizer], task, seed: int, steps: int, every: int) -> dict[str, Any]:
    """Train a fresh model of ``task`` with the optimizer ``factory(named_parameters)`` builds."""
    model = task.model(seed)
    optimizer = factory(model.named_parameters())
    stream = task.batches(seed)
    curve, clock = [task.full_loss(model)], 0.0
    for step in range(1, steps + 1):
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        clock += time.perf_counter() - start
        if step % every == 0:
            curve.append(task.full_loss(model))
    params = sum(p.numel() for p in model.parameters())
    floats = sum(v.numel() for st in optimizer.state.values() for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step")
    final = curve[-1] if math.isfinite(curve[-1]) else float("inf")
    return {
        "curve": curve,
        "final": final,
        "accuracy": task.test_accuracy(model),
        "step_ms": 1e3 * clock / steps,
        "state_floats_per_param": floats / params,
    }


def _summary(runs: list[dict[str, Any]], lr: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final loss over the seeds as geometric mean and spread (it varies by orders of magnitude)."""
    finals = np.array([r["final"] for r in runs])
    logs = np.log(np.clip(finals, LOSS_FLOOR, 1e12))
    return {
        "lr": lr,
        "final_geomean": float(np.exp(logs.mean())),
        "final_geostd": float(np.exp(logs.std())),
        "final_min": float(finals.min()),
        "final_max": float(finals.max()),
        "final_mean": float(finals.mean()),
        "accuracy_mean": float(np.mean([r["accuracy"] for r in runs])),
        "accuracy_std": float(np.std([r["accuracy"] for r in runs])),
        "step_ms": float(np.mean([r["step_ms"] for r in runs])),
        "state_floats_per_param": runs[0]["state_floats_per_param"],
        "finals": finals.tolist(),
        **(extra or {}),
    }


def _log_final(runs: list[dict[str, Any]]) -> float:
    return float(np.mean(np.log(np.clip([r["final"] for r in runs], LOSS_FLOOR, 1e12))))


def _tuned(
    factory: Callable[[float], Callable[..., torch.optim.Optimizer]], grid: Sequence[float], task, cfg: EvalConfig, seeds: list[int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The lr with the best mean log final loss on the validation seeds (grid widened past an edge
    best), then its runs on the reported ``seeds``."""
    from techniques.l2o.amalgamation import search_lr

    tune = [cfg.tune_first_seed + i for i in range(cfg.tune_seeds)]
    found = search_lr(lambda lr: _log_final([run_optimizer(factory(lr), task, s, cfg.steps, cfg.every) for s in tune]), grid)
    runs = [run_optimizer(factory(found.lr), task, s, cfg.steps, cfg.every) for s in seeds]
    extra = {"grid": {f"{lr:g}": v for lr, v in sorted(found.scores.items())}, "at_edge": found.at_edge, "widened": found.widened}
    return _summary(runs, found.lr, extra), runs


def evaluate(artifacts: str | Path, out_dir: str | Path, cfg: EvalConfig, report: Reporter | None = None) -> dict[str, Any]:
    """Evaluate every optimizer on the held-out optimizee; write results.json, curves.csv, PNG."""
    from techniques.l2o.amalgamation import PRESET_LRS, TEACHERS, Teacher
    from techniques.l2o.lstm import LearnedOptimizer
    from techniques.l2o.symbolic import SymbolicOptimizer, SymbolicRule
    from techniques.l2o.tasks import MLPTask
    from techniques.optimizers import artifact_digest, load_artifact, load_policy, make_optimizer

    say = report or (lambda _text: None)
    artifacts, out_dir = Path(artifacts), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = MLPTask(hidden=cfg.hidden, partition=cfg.partition, batch_size=cfg.batch_size)
    seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}

    def record(label: str, summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        results[label], curves[label] = summary, runs
        edge = ""
        if "at_edge" in summary:
            edge = ", AT A GRID EDGE: widen the grid" if summary["at_edge"] else ", inside its grid"
        say(
            f"{label:>22}: final loss geomean {summary['final_geomean']:.3e} (×/÷ {summary['final_geostd']:.2g}, "
            f"min {summary['final_min']:.2e}, max {summary['final_max']:.2e}), test acc {summary['accuracy_mean']:.4f} "
            f"(lr {summary['lr']:g}{edge})"
        )

    start = time.perf_counter()
    for name, grid in (("sgd", SGD_GRID), ("adam", ADAM_GRID)):

        def baseline(lr: float, name: str = name) -> Callable[..., torch.optim.Optimizer]:
            return lambda p: make_optimizer(name, p, lr)

        record(name, *_tuned(baseline, grid, task, cfg, seeds))
    digests: dict[str, str] = {}
    for name, stem in (("lstm-l2o", "lstm"), ("symbolic-l2o", "symbolic"), ("amalgamated-l2o", "amalgamated")):
        meta_path = artifacts / (f"{stem}.json")
        if not meta_path.is_file():
            say(f"{name}: no artifact in {artifacts}, skipped")
            continue
        meta = json.loads(meta_path.read_text())
        alpha = float(meta.get("alpha", meta.get("info", {}).get("alpha", 0.01)))
        artifact = load_artifact(name, artifacts)  # fail early with a clear message
        digests[name] = artifact_digest(name, artifacts)
        runs = [
            run_optimizer(lambda p, name=name, alpha=alpha: make_optimizer(name, p, alpha, artifacts=artifacts), task, s, cfg.steps, cfg.every)
            for s in seeds
        ]
        extra = {"formula": artifact.formula()} if name == "symbolic-l2o" else {}
        record(name, _summary(runs, alpha, extra), runs)
    for path in sorted(artifacts.glob("symbolic-*.json")):  # extra rules from `splitmix l2o distill --name`
        rule = SymbolicRule.load(path)
        runs = [run_optimizer(lambda p, rule=rule: SymbolicOptimizer(p, rule, lr=0.01), task, s, cfg.steps, cfg.every) for s in seeds]
        record(path.stem, _summary(runs, 0.01, {"formula": rule.formula()}), runs)
    for path in sorted(artifacts.glob("amalgamated-*.json")):  # extra students from `splitmix l2o amalgamate --name`
        meta, policy = json.loads(path.read_text()), load_policy(artifacts, path.stem)
        runs = [
            run_optimizer(lambda p, policy=policy, a=meta["alpha"]: LearnedOptimizer(p, policy, lr=a), task, s, cfg.steps, cfg.every) for s in seeds
        ]
        record(path.stem, _summary(runs, meta["alpha"], {"scheme": meta.get("scheme"), "perturbation": meta["amalgamation"]["perturbation"]}), runs)
    teacher_labels = []
    if cfg.teachers:
        for tname in TEACHERS:

            def factory(lr: float, tname: str = tname) -> Callable[..., torch.optim.Optimizer]:
                return lambda p: LearnedOptimizer(p, Teacher(tname, lr), lr=1.0)

            record(f"teacher:{tname}", *_tuned(factory, [PRESET_LRS[tname] * f for f in TEACHER_FACTORS], task, cfg, seeds))
            teacher_labels.append(f"teacher:{tname}")
    comparison = _student_vs_teachers(results, teacher_labels)
    payload = {
        "config": asdict(cfg),
        "artifacts": str(artifacts),
        "artifact_sha256": digests,
        "seeds": seeds,
        "tune_seeds": [cfg.tune_first_seed + i for i in range(cfg.tune_seeds)],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "results": results,
        "student_vs_teachers": comparison,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    _write_curves(out_dir / "curves.csv", curves, cfg.every)
    plot_curves(curves, cfg, out_dir / "loss_curves.png")
    return payload


def _student_vs_teachers(results: dict[str, dict[str, Any]], teachers: list[str]) -> dict[str, Any]:
    """The amalgamation bar: the student's geometric-mean final loss within ``STUDENT_BAR``× of
    the best teacher's (a mean over teachers would be set by the worst one)."""
    if "amalgamated-l2o" not in results or not teachers:
        return {}
    student = results["amalgamated-l2o"]["final_geomean"]
    best = min(teachers, key=lambda t: results[t]["final_geomean"])
    ratio = student / results[best]["final_geomean"]
    return {
        "student_final_geomean": student,
        "best_teacher": best,
        "best_teacher_final_geomean": results[best]["final_geomean"],
        "ratio_to_best_teacher": ratio,
        "bar": STUDENT_BAR,
        "passes": bool(ratio <= STUDENT_BAR),
    }


def _write_curves(path: Path, curves: dict[str, list[dict[str, Any]]], every: int) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["optimizer", "seed_index", "step", "loss"])
        for label, runs in curves.items():
            for i, run in enumerate(runs):
                for j, loss in enumerate(run["curve"]):
                    writer.writerow([label, i, j * every, f"{loss:.6g}"])


def plot_curves(curves: dict[str, list[dict[str, Any]]], cfg: EvalConfig, path: Path) -> Path:
    """Mean ± std full-partition training loss per optimizer (log scale); teachers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (label, runs) in enumerate(curves.items()):
        data = np.clip(np.array([r["curve"] for r in runs]), LOSS_FLOOR, None)
        steps = np.arange(data.shape[1]) * cfg.every
        mean, std = np.exp(np.log(data).mean(0)), np.log(data).std(0)
        style = "--" if label.startswith("teacher:") else "-"
        width = 1.0 if label.startswith("teacher:") else 2.0
        ax.plot(steps, mean, style, lw=width, color=cmap(i % 20), label=label)
        ax.fill_between(steps, mean * np.exp(-std), mean * np.exp(std), color=cmap(i % 20), alpha=0.12)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (full partition, geometric mean over seeds)",
        title=f"held-out optimizee: MLP 64-{cfg.hidden}-10 on digits '{cfg.partition}', {cfg.seeds} unseen seeds",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _edge_text(r: dict[str, Any]) -> str:
    if "at_edge" not in r:
        return "not tuned (meta-trained step bound)"
    return "AT AN EDGE" if r["at_edge"] else "no"


def print_results(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"held-out optimizee ({payload['config']['steps']} steps, {len(payload['seeds'])} seeds; "
        f"lr chosen on {len(payload['tune_seeds'])} other seeds)"
    )
    for column in ("optimizer", "lr", "lr at grid edge", "final loss geomean", "×/÷ geo std", "min", "max", "test acc", "ms/step"):
        table.add_column(column, justify="right")
    for label, r in payload["results"].items():
        table.add_row(
            label,
            f"{r['lr']:g}",
            _edge_text(r),
            f"{r['final_geomean']:.3e}",
            f"{r['final_geostd']:.2g}",
            f"{r['final_min']:.2e}",
            f"{r['final_max']:.2e}",
            f"{r['accuracy_mean']:.4f}",
            f"{r['step_ms']:.3f}",
        )
    Console(width=160).print(table)
    edges = [label for label, r in payload["results"].items() if r.get("at_edge")]
    print(
        "grid edges: "
        + (f"WARNING: best lr at a grid edge for {', '.join(edges)}: widen the grid" if edges else "none (every tuned lr is inside its grid)")
    )
    cmp = payload.get("student_vs_teachers")
    if cmp:
        verdict = "passes" if cmp["passes"] else "fails"
        print(
            f"amalgamation bar (student within {cmp['bar']:g}× of the best teacher) {verdict}: student {cmp['student_final_geomean']:.3e}, "
            f"best teacher {cmp['best_teacher']} {cmp['best_teacher_final_geomean']:.3e} (ratio {cmp['ratio_to_best_teacher']:.3g})"
        )


def results_record(payload: dict[str, Any], started: float, wall_s: float, command: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The benchmark as a generic results table (``tools/results_docs.py``) with provenance."""
    from tools.provenance import provenance

    cfg, n = payload["config"], len(payload["seeds"])
    rows = []
    for label, r in payload["results"].items():
        grid = [float(v) for v in r.get("grid", {})]
        rows.append(
            [
                label,
                f"{r['lr']:g}",
                f"{min(grid):g}–{max(grid):g} ({len(grid)})" if grid else "—",
                _edge_text(r),
                f"{r['final_geomean']:.3g}",
                f"{r['final_geostd']:.3g}",
                f"{r['final_min']:.3g}–{r['final_max']:.3g}",
                {"mean": r["accuracy_mean"], "std": r["accuracy_std"], "n": n},
            ]
        )
    notes = [
        f"Optimizee: MLP 64-{cfg['hidden']}-10 on the digits '{cfg['partition']}' half (meta-training: width 32, the other half), "
        f"{cfg['steps']} steps of batch {cfg['batch_size']}; final loss = training loss on the whole partition after the last step; "
        f"reported over seeds {payload['seeds'][0]}–{payload['seeds'][-1]} (init and batch order).",
        f"Learning rates of SGD (no momentum), Adam and the six OA teachers are chosen by the mean log final loss on validation seeds "
        f"{payload['tune_seeds'][0]}–{payload['tune_seeds'][-1]} (never the reported ones), "
        "from a grid widened ×3 past an edge best (up to 4 times).",
        "The learned optimizers run at the step bound α they were meta-trained with (not tuned).",
        f"Final losses are floored at {LOSS_FLOOR:g} for the geometric statistics and the lr choice (float32 cross-entropy "
        "rounds a sample's loss below ~6e-8 to 0); min–max are the raw values.",
    ]
    cmp = payload.get("student_vs_teachers")
    if cmp:
        notes.append(
            f"Amalgamation bar, student within {cmp['bar']:g}× of the best teacher: {'passes' if cmp['passes'] else 'fails'} "
            f"(student {cmp['student_final_geomean']:.3g}, best teacher {cmp['best_teacher']} {cmp['best_teacher_final_geomean']:.3g}, "
            f"ratio {cmp['ratio_to_best_teacher']:.3g})."
        )
    if "symbolic-l2o" in payload["results"]:
        notes.append(f"Symbolic rule evaluated: {payload['results']['symbolic-l2o'].get('formula', '?')}.")
    if payload.get("artifact_sha256"):
        notes.append("Artifact SHA-256: " + ", ".join(f"{k} {v[:16]}…" for k, v in payload["artifact_sha256"].items()) + ".")
    if manifest:
        notes.append(
            f"Artifacts meta-trained by `splitmix l2o train` (settings '{manifest.get('settings', {}).get('name', '?')}', "
            f"{float(manifest.get('seconds_total', 0)):.0f} s, torch {manifest.get('torch', '?')})."
        )
    return {
        "kind": "table",
        "caption": (
            f"Learned optimizers on a held-out digits MLP: final training loss over {n} seeds as geometric mean, geometric std (×/÷) "
            "and min–max, test accuracy mean ± std; each baseline's and teacher's lr chosen on validation seeds."
        ),
        "columns": [
            "optimizer",
            "lr",
            "lr grid (values)",
            "lr at grid edge",
            "final loss geomean",
            "geo std ×/÷",
            "final loss min–max",
            "test accuracy",
        ],
        "rows": rows,
        "notes": notes,
        "provenance": provenance(started, wall_s, command),
    }


# --------------------------------------------------------------------------- subcommands
def _threads(args: argparse.Namespace) -> bool:
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads} is out of range; allowed: an integer >= 1", file=sys.stderr, flush=True)
            return False
        torch.set_num_threads(args.threads)
    return True


def _folder(args: argparse.Namespace, attribute: str) -> Path:
    from techniques.optimizers import default_artifacts_dir

    value = getattr(args, attribute, None)
    return Path(value) if value else default_artifacts_dir(getattr(args, "settings", "default"))


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from techniques.optimizers import FILES, settings_named, train_artifacts

    if not _threads(args):
        return 2
    try:
        settings = settings_named(args.settings)
        only = [s.strip() for s in args.only.split(",")] if args.only else list(FILES)
        folder = _folder(args, "out")
        err = Console(stderr=True)
        manifest = train_artifacts(folder, settings, only, report=lambda text: err.print(text, highlight=False))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({k: manifest.get(k) for k in ("seconds", "seconds_total", "threads", "formula", "r2_heldout")}, indent=2, default=float))
    print(folder, flush=True)  # the last line of stdout: the artifact folder
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from rich.console import Console

    from techniques.l2o.symbolic import DistillConfig, distill
    from techniques.l2o.tasks import MLPTask
    from techniques.optimizers import load_policy, write_text_atomic

    if not _threads(args):
        return 2
    folder = _folder(args, "artifacts")
    try:
        cfg = DistillConfig(
            route=args.route,
            lags=args.lags,
            population=args.population,
            generations=args.generations,
            parsimony=args.parsimony,
            tune_iterations=args.tune_iterations,
            seed=args.seed,
        )
        lstm = load_policy(folder, "lstm")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    err = Console(stderr=True)
    rule = distill(
        lstm, MLPTask(), MLPTask(hidden=args.heldout_hidden, partition="heldout"), cfg, report=lambda text: err.print(text, highlight=False)
    )
    rule.info["alpha"] = cfg.alpha
    write_text_atomic(folder / f"{args.name}.json", rule.to_json())
    print(rule.describe())
    print(
        f"held-out R²: {rule.info['r2_heldout_final']:.4f} (search {rule.info['r2_heldout_search']:.4f}, "
        f"fit {rule.info['r2_heldout_fit']:.4f}); size {rule.info['size']} nodes"
    )
    print(folder / f"{args.name}.json", flush=True)
    return 0


def cmd_amalgamate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from techniques.l2o.amalgamation import AmalgamationConfig, train_student
    from techniques.l2o.tasks import MLPTask
    from techniques.optimizers import save_policy

    if not _threads(args):
        return 2
    folder = _folder(args, "artifacts")
    try:
        imitation = tuple(float(v) for v in args.imitation.split(",") if v.strip())
        cfg = AmalgamationConfig(scheme=args.scheme, perturbation=args.perturbation, iterations=args.iterations, imitation=imitation, seed=args.seed)
        if args.name != "amalgamated" and not args.name.startswith("amalgamated-"):
            raise ValueError(f"--name '{args.name}' must be 'amalgamated' or start with 'amalgamated-'")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    err = Console(stderr=True)
    folder.mkdir(parents=True, exist_ok=True)
    student, log = train_student(MLPTask(), cfg, report=lambda text: err.print(text, highlight=False))
    save_policy(
        student,
        folder,
        args.name,
        {
            "kind": "amalgamated-l2o",
            "alpha": cfg.alpha,
            "scheme": cfg.scheme,
            "teacher_lrs": log["teacher_lrs"],
            "amalgamation": asdict(cfg),
            "seconds": log["seconds"],
        },
    )
    print(f"trained in {log['seconds']:.1f}s")
    print(folder / f"{args.name}.safetensors", flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    if not _threads(args):
        return 2
    try:
        cfg = EvalConfig(
            hidden=args.hidden,
            partition=args.partition,
            steps=args.steps,
            seeds=args.seeds,
            first_seed=args.first_seed,
            every=args.every,
            teachers=not args.no_teachers,
            tune_seeds=args.tune_seeds,
            tune_first_seed=args.tune_first_seed,
        )
        if cfg.seeds < 1 or cfg.tune_seeds < 1:
            raise ValueError(f"--seeds {cfg.seeds} / --tune-seeds {cfg.tune_seeds} out of range; allowed: integers >= 1")
        if set(range(cfg.first_seed, cfg.first_seed + cfg.seeds)) & set(range(cfg.tune_first_seed, cfg.tune_first_seed + cfg.tune_seeds)):
            raise ValueError("the validation seeds (--tune-first-seed, --tune-seeds) overlap the reported ones (--first-seed, --seeds)")
        from techniques.l2o.tasks import MLPTask

        MLPTask(hidden=cfg.hidden, partition=cfg.partition)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    folder = _folder(args, "artifacts")
    if not folder.is_dir():
        print(f"error: no artifact folder {folder}: run `splitmix l2o train --out {folder}` first", file=sys.stderr, flush=True)
        return 2
    out_dir = Path(args.out or f"runs/l2o-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    err = Console(stderr=True)
    started = time.time()
    try:
        payload = evaluate(folder, out_dir, cfg, report=lambda text: err.print(text, highlight=False))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print_results(payload)
    if args.results:
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        command = shlex.join(["splitmix", *sys.argv[1:]] if Path(sys.argv[0]).name == "splitmix" else sys.argv)
        record = results_record(payload, started, time.time() - started, command, manifest)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
        print(f"results record: {args.results}")
    print(out_dir, flush=True)  # the last line of stdout: the output folder
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="l2o_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; the budget is quoted for 1)")

    train = sub.add_parser("train", parents=[common], help="meta-train the learned optimizers' artifacts")
    train.add_argument("--out", default=None, help="artifact folder (default: $SPLITMIX_L2O_DIR/<settings> or ~/.cache/splitmix/l2o/<settings>)")
    train.add_argument("--settings", choices=("default", "tiny"), default="default", help="default (minutes) or tiny (seconds, for tests)")
    train.add_argument("--only", default=None, help="comma-separated subset of lstm-l2o,symbolic-l2o,amalgamated-l2o")
    train.set_defaults(func=cmd_train)

    dist = sub.add_parser("distill", parents=[common], help="distil the folder's LSTM into a symbolic rule (gplearn or template)")
    dist.add_argument("--artifacts", default=None, help="artifact folder holding lstm.safetensors (default: the cache)")
    dist.add_argument("--route", choices=("gplearn", "template"), default="gplearn")
    dist.add_argument("--lags", type=int, default=2, help="steps of (m̃, g̃) history the rule may use")
    dist.add_argument("--population", type=int, default=1000)
    dist.add_argument("--generations", type=int, default=20)
    dist.add_argument("--parsimony", type=float, default=1e-3)
    dist.add_argument("--tune-iterations", type=int, default=20, help="meta-tuning iterations of the constants (0 = off)")
    dist.add_argument("--heldout-hidden", type=int, default=64, help="width of the optimizee the held-out R² traces come from")
    dist.add_argument("--name", default="symbolic", help="output <name>.json in the folder (symbolic = the registry's rule)")
    dist.add_argument("--seed", type=int, default=0)
    dist.set_defaults(func=cmd_distill)

    amal = sub.add_parser("amalgamate", parents=[common], help="train an amalgamated student (mean, minmax or choice)")
    amal.add_argument("--artifacts", default=None, help="artifact folder (default: the cache)")
    amal.add_argument("--scheme", choices=("mean", "minmax", "choice"), default="choice")
    amal.add_argument("--perturbation", choices=("none", "gaussian", "gaussian_rel", "fgsm", "pgd", "cgd"), default="gaussian_rel")
    amal.add_argument("--iterations", type=int, default=120)
    amal.add_argument("--imitation", default="1", help='imitation weight p per curriculum stage, e.g. "0.2,0.1,0.05,0.02" (OA)')
    amal.add_argument("--name", default="amalgamated-candidate", help="amalgamated (the registry's student) or amalgamated-<tag>")
    amal.add_argument("--seed", type=int, default=0)
    amal.set_defaults(func=cmd_amalgamate)

    ev = sub.add_parser("evaluate", parents=[common], help="loss curves on a held-out optimizee against SGD, Adam and the teachers")
    ev.add_argument("--artifacts", default=None, help="artifact folder (default: the cache)")
    ev.add_argument("--out", default=None, help="output folder (default runs/l2o-eval-<timestamp>)")
    d = EvalConfig()
    ev.add_argument("--hidden", type=int, default=d.hidden, help="held-out optimizee width (meta-training: 32)")
    ev.add_argument("--partition", choices=("meta", "heldout", "all"), default=d.partition, help="digits half (meta-training: meta)")
    ev.add_argument("--steps", type=int, default=d.steps)
    ev.add_argument("--seeds", type=int, default=d.seeds)
    ev.add_argument("--first-seed", type=int, default=d.first_seed)
    ev.add_argument("--every", type=int, default=d.every, help="full-partition loss every this many steps")
    ev.add_argument("--tune-seeds", type=int, default=d.tune_seeds, help="validation optimizees the learning rates are chosen on")
    ev.add_argument("--tune-first-seed", type=int, default=d.tune_first_seed, help="first validation seed (disjoint from the reported ones)")
    ev.add_argument("--no-teachers", action="store_true", help="skip the six analytic teachers")
    ev.add_argument("--results", default=None, help="also write the benchmark as a results record here (e.g. results/l2o-benchmark.json)")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``splitmix l2o ...`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "l2o",
        help="learned client optimizers: train, distil, amalgamate, evaluate (arXiv 2203.06578, 2203.06474)",
        description=__doc__.splitlines()[0],
    )
    return add_arguments(parser)


add_l2o_parser = register


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m tools.l2o", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
