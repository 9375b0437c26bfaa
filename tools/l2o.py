"""``splitmix l2o train|distill|amalgamate|evaluate``: learned client optimizers (issue 8).

- ``train``: meta-train the artifacts ``techniques/optimizers.py`` loads (LSTM, symbolic rule, amalgamated
  student) into a folder (default: the per-user cache the clients use).
- ``distill``: re-run the symbolic distillation of the folder's LSTM (other route, lags, search).
- ``amalgamate``: train another student (scheme mean / minmax / choice, perturbation) under a name
  (``amalgamated`` replaces the registry's student; other names are compared by ``evaluate``).
- ``evaluate``: held-out optimizees (other init seeds, width and data partition than in
  meta-training), every optimizer through the real ``torch.optim`` path: SGD and Adam (best of
  a 3-point lr grid on this very evaluation), the learned optimizers, and each teacher at its
  tuned lr. Writes results.json, curves.csv and loss_curves.png.

Run: ``python -m tools.l2o evaluate`` or, once wired into the CLI, ``splitmix l2o evaluate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

Reporter = Callable[[str], None]
SGD_GRID = (0.03, 0.1, 0.3)
ADAM_GRID = (1e-3, 3e-3, 1e-2)


@dataclass(frozen=True)
class EvalConfig:
    """One held-out evaluation; every field lands in results.json."""

    hidden: int = 64
    partition: str = "heldout"
    batch_size: int = 64
    steps: int = 300
    seeds: int = 5
    first_seed: int = 1000  # meta-training uses other seeds (0–149, 50 000+, 2 000 000+ …)
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
    finals = np.array([r["final"] for r in runs])
    logs = np.log(np.clip(finals, 1e-12, 1e12))
    return {
        "lr": lr,
        "final_mean": float(finals.mean()),
        "final_std": float(finals.std()),
        "final_geomean": float(np.exp(logs.mean())),
        "accuracy_mean": float(np.mean([r["accuracy"] for r in runs])),
        "step_ms": float(np.mean([r["step_ms"] for r in runs])),
        "state_floats_per_param": runs[0]["state_floats_per_param"],
        "finals": finals.tolist(),
        **(extra or {}),
    }


def _grid(name: str, grid: tuple[float, ...], task, cfg: EvalConfig, seeds: list[int]) -> tuple[dict, list[dict]]:
    """Best lr of the grid by mean log final loss (the baselines get the benefit of the doubt)."""
    from techniques.optimizers import make_optimizer

    scored = {}
    for lr in grid:
        runs = [run_optimizer(lambda p, lr=lr: make_optimizer(name, p, lr), task, s, cfg.steps, cfg.every) for s in seeds]
        scored[lr] = (float(np.mean(np.log(np.clip([r["final"] for r in runs], 1e-12, 1e12)))), runs)
    best = min(scored, key=lambda lr: scored[lr][0])
    return _summary(scored[best][1], best, {"grid": {str(lr): v[0] for lr, v in scored.items()}}), scored[best][1]


def evaluate(artifacts: str | Path, out_dir: str | Path, cfg: EvalConfig, report: Reporter | None = None) -> dict[str, Any]:
    """Evaluate every optimizer on the held-out optimizee; write results.json, curves.csv, PNG."""
    from techniques.l2o.amalgamation import Teacher
    from techniques.l2o.lstm import LearnedOptimizer
    from techniques.l2o.symbolic import SymbolicOptimizer, SymbolicRule
    from techniques.l2o.tasks import MLPTask
    from techniques.optimizers import load_artifact, load_policy, make_optimizer

    say = report or (lambda _text: None)
    artifacts, out_dir = Path(artifacts), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = MLPTask(hidden=cfg.hidden, partition=cfg.partition, batch_size=cfg.batch_size)
    seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}

    def record(label: str, summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        results[label], curves[label] = summary, runs
        say(
            f"{label:>22}: final loss {summary['final_mean']:.3e} ± {summary['final_std']:.1e}, "
            f"test acc {summary['accuracy_mean']:.4f} (lr {summary['lr']:g})"
        )

    start = time.perf_counter()
    for name, grid in (("sgd", SGD_GRID), ("adam", ADAM_GRID)):
        record(name, *_grid(name, grid, task, cfg, seeds))
    alphas = {}
    for name, stem in (("lstm-l2o", "lstm"), ("symbolic-l2o", "symbolic"), ("amalgamated-l2o", "amalgamated")):
        meta_path = artifacts / (f"{stem}.json")
        if not meta_path.is_file():
            say(f"{name}: no artifact in {artifacts}, skipped")
            continue
        meta = json.loads(meta_path.read_text())
        alpha = float(meta.get("alpha", meta.get("info", {}).get("alpha", 0.01)))
        alphas[name] = alpha
        load_artifact(name, artifacts)  # fail early with a clear message
        runs = [
            run_optimizer(lambda p, name=name, alpha=alpha: make_optimizer(name, p, alpha, artifacts=artifacts), task, s, cfg.steps, cfg.every)
            for s in seeds
        ]
        record(name, _summary(runs, alpha), runs)
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
    student_meta = artifacts / "amalgamated.json"
    if cfg.teachers and student_meta.is_file():
        for tname, lr in json.loads(student_meta.read_text())["teacher_lrs"].items():
            runs = [
                run_optimizer(lambda p, t=tname, lr=lr: LearnedOptimizer(p, Teacher(t, lr), lr=1.0), task, s, cfg.steps, cfg.every) for s in seeds
            ]
            record(f"teacher:{tname}", _summary(runs, lr), runs)
            teacher_labels.append(f"teacher:{tname}")
    comparison = _student_vs_teachers(results, teacher_labels)
    payload = {
        "config": asdict(cfg),
        "artifacts": str(artifacts),
        "seeds": seeds,
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
    """The amalgamation bar: the student's mean final loss against the teachers' (mean and best)."""
    if "amalgamated-l2o" not in results or not teachers:
        return {}
    student = results["amalgamated-l2o"]["final_mean"]
    means = [results[t]["final_mean"] for t in teachers]
    geo = [results[t]["final_geomean"] for t in teachers]
    return {
        "student_final_mean": student,
        "teachers_mean_of_final_means": float(np.mean(means)),
        "best_teacher": teachers[int(np.argmin(means))],
        "best_teacher_final_mean": float(min(means)),
        "student_at_least_teacher_mean": student <= float(np.mean(means)),
        "student_geomean": results["amalgamated-l2o"]["final_geomean"],
        "teachers_geomean_of_geomeans": float(np.exp(np.mean(np.log(geo)))),
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
        data = np.clip(np.array([r["curve"] for r in runs]), 1e-12, None)
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


def print_results(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out optimizee ({payload['config']['steps']} steps, {len(payload['seeds'])} seeds)")
    for column in ("optimizer", "lr", "final loss (mean ± std)", "geomean", "test acc", "ms/step", "state floats/param"):
        table.add_column(column, justify="right")
    for label, r in payload["results"].items():
        table.add_row(
            label,
            f"{r['lr']:g}",
            f"{r['final_mean']:.3e} ± {r['final_std']:.1e}",
            f"{r['final_geomean']:.3e}",
            f"{r['accuracy_mean']:.4f}",
            f"{r['step_ms']:.3f}",
            f"{r['state_floats_per_param']:g}",
        )
    Console(width=140).print(table)
    cmp = payload.get("student_vs_teachers")
    if cmp:
        verdict = "at least as good as" if cmp["student_at_least_teacher_mean"] else "worse than"
        print(
            f"amalgamated student {cmp['student_final_mean']:.3e} is {verdict} the mean of its teachers "
            f"({cmp['teachers_mean_of_final_means']:.3e}); best teacher {cmp['best_teacher']} {cmp['best_teacher_final_mean']:.3e}"
        )


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
        )
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
    try:
        payload = evaluate(folder, out_dir, cfg, report=lambda text: err.print(text, highlight=False))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print_results(payload)
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
    ev.add_argument("--no-teachers", action="store_true", help="skip the six analytic teachers")
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
