"""``splitmix search-topology``: As-ViT's training-free topology search, feeding ``simulate``.

Candidates are shapes of **one Split-Mix base** at the run's size: the base embedding dim
(``vit-dim`` × ``atom-width``) and depth (``vit-depth``) of the run config are fixed, and patch
size, heads and MLP ratio vary (``tools/asvit_scores.py`` scores the ``models.vit`` base that
``simulate`` trains). Each is scored at initialisation only — length distortion of a circle of
inputs (expressivity) and the NTK condition number (trainability) — and ranked by rank sum; the
best is the seed topology, optionally scaled (closed form) or grown (As-ViT's greedy loop) to a
parameter target. The result is written as a run-config file whose ViT keys describe the
full-width model (base dim / heads ÷ the config's atom width, which is kept), so
``splitmix simulate --config <out>/topology.toml`` trains Split-Mix bases of exactly that
topology. ``--kendall N`` also trains N candidates briefly and reports Kendall τ between the
training-free scores and validation accuracy; ``--results PATH`` writes that study as a results
record.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.vit import Topology
from tools.asvit_scores import (
    INITS,
    TopologyScore,
    grow_topology,
    kendall_study,
    sample_topologies,
    scale_topology,
    search_topology,
    topology_grid,
)

Reporter = Callable[[str], None]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def run_config_for(topology: Topology, atom_width: float, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run-config keys that make every Split-Mix base (at the config's ``atom_width``) have ``topology``.

    ``base``'s own keys are kept, its ``atom-width`` included; only the model and ``vit-*`` keys change.
    """
    n = round(1.0 / atom_width)
    if abs(n * atom_width - 1.0) > 1e-9:
        raise ValueError(f"atom-width {atom_width} is not 1/N for a whole number of bases N")
    base = dict(base or {})
    model = str(base.get("model", "vit"))
    return {
        **base,
        "model": model if model.startswith("vit") else "vit",
        "vit-patch": topology.patch,
        "vit-dim": topology.dim * n,
        "vit-heads": topology.heads * n,
        "vit-depth": topology.depth,
        "vit-mlp-ratio": topology.mlp_ratio,
    }


def _score_row(s: TopologyScore) -> dict[str, Any]:
    return {
        "topology": str(s.topology),
        **s.topology.to_dict(),
        "params": s.params,
        "length_distortion": s.length_distortion,
        "ntk_cond": s.ntk_cond if math.isfinite(s.ntk_cond) else "inf",
        "rank_length": s.rank_length,
        "rank_ntk": s.rank_ntk,
        "rank_sum": s.rank_sum,
    }


def _write_toml(path: Path, values: dict[str, Any], header: str) -> None:
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # what we write must load back
    path.write_text(text)


def _base_config(path: str | None) -> dict[str, Any]:
    """The run-config file's own keys (flat TOML or a pyproject's ``[tool.flwr.app.config]``)."""
    if not path:
        return {}
    data = tomllib.loads(Path(path).read_text())
    return dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data))


def search(args: argparse.Namespace, out: Path, report: Reporter) -> dict[str, Any]:
    """Score the candidates, pick and scale the seed topology, write the folder; returns the result."""
    from splitmix.config import load_config
    from splitmix.data import DATASETS

    base = _base_config(args.config)
    if args.dataset:
        base["dataset"] = args.dataset
    run = load_config(overrides=base)  # defaults ← file ← --dataset: the run the topology is for
    atom, dataset = run.model.atom_width, run.data.dataset
    image = DATASETS[dataset].image_size
    dim = args.dim or int(round(run.model.vit_dim * atom))
    depth = args.depth or run.model.vit_depth
    grid = topology_grid(dim, depth, args.patch, args.heads, args.mlp_ratio, image_size=image)
    if not grid:
        raise ValueError(f"the candidate grid is empty (every patch size must divide the image size {image} and dim {dim} be a multiple of heads)")
    candidates = sample_topologies(args.candidates, args.seed, grid) if args.candidates else grid
    input_shape = (DATASETS[dataset].in_channels, image, image)
    score_kw: dict[str, Any] = {"repeats": args.repeats, "n_pts": args.points, "input_shape": input_shape, "init": args.init}
    report(f"scoring {len(candidates)} shapes of a dim-{dim}, depth-{depth} base at initialisation ({args.repeats} inits each)")
    result = search_topology(candidates, args.seed, max_params=args.max_params, **score_kw)
    chosen, how = result.best, "seed topology"
    family: list[dict[str, Any]] = []
    if args.grow_to:
        grown = grow_topology(chosen, args.grow_to, args.seed, **score_kw)
        family = [_score_row(s) for s in grown]
        chosen, how = grown[-1].topology, f"grown to ≥ {args.grow_to:,} parameters (As-ViT's greedy loop)"
    elif args.scale != 1.0:
        chosen, how = scale_topology(chosen, args.scale), f"scaled × {args.scale:g} in parameters (closed form)"
    base.setdefault("dataset", dataset)
    run_config = run_config_for(chosen, atom, base)
    load_config(overrides=run_config)  # the chosen topology must be a valid run config (raises ConfigError)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_score_row(s) for s in result.ranked]
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary: dict[str, Any] = {
        "seed": args.seed,
        "dataset": dataset,
        "candidates": len(candidates),
        "repeats": args.repeats,
        "init": args.init,
        "seconds": result.seconds,
        "seed_topology": str(result.best),
        "chosen": chosen.to_dict(),
        "chosen_name": str(chosen),
        "how": how,
        "atom_width": atom,
        "run_config": run_config,
        "ranked": rows,
        "family": family,
    }
    if args.kendall:
        study_candidates = sample_topologies(args.kendall, args.seed + 1, grid)
        report(f"Kendall study: training {len(study_candidates)} candidates × {args.kendall_seeds} seeds for {args.kendall_steps} steps each")
        summary["kendall"] = kendall_study(
            study_candidates,
            steps=args.kendall_steps,
            seed=args.seed,
            train_seeds=args.kendall_seeds,
            repeats=args.repeats,
            n_pts=args.points,
            init=args.init,
            lr=args.kendall_lr,
        )
        summary["kendall"]["lr"] = args.kendall_lr
        _plot_kendall(summary["kendall"], out / "kendall.png")
    (out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_toml(
        out / "topology.toml",
        run_config,
        f"As-ViT topology search (splitmix search-topology, seed {args.seed}): {how}.\n"
        f"Every Split-Mix base (atom width {atom:g}) is {chosen} (patch-dim-depth-heads-mlp); the vit-* keys are the full-width model.\n"
        f"Use: splitmix simulate --config {out / 'topology.toml'}",
    )
    return summary


def results_record(summary: dict[str, Any], started: float, command: str) -> dict[str, Any]:
    """The Kendall study as a ``{"kind": "table"}`` results record with provenance."""
    from tools.provenance import provenance

    study = summary["kendall"]
    names = {"length_distortion": "length distortion", "neg_ntk_cond": "−NTK κ", "neg_rank_sum": "−rank sum", "params": "parameters"}
    rows: list[list[Any]] = [[label, study["tau"]["val"][key], study["tau"]["test"][key]] for key, label in names.items()]
    n = len(study["rows"])
    seeds = study["rows"][0]["val_accuracy"]["n"]
    candidates = "; ".join(
        f"{r['name']}: LD {r['length_distortion']:.4g}, κ {r['ntk_cond']:.4g}, rank sum {r['rank_sum']}, "
        f"val {r['val_accuracy']['mean']:.3f} ± {r['val_accuracy']['std']:.3f}, test {r['test_accuracy']['mean']:.3f}"
        for r in study["rows"]
    )
    return {
        "kind": "table",
        "caption": (
            f"As-ViT: Kendall τ-b between each training-free score and short-training accuracy over {n} base shapes "
            f"(digits, fixed dim and depth; {seeds} training seeds each)"
        ),
        "columns": ["score (higher = predicted better)", "τ vs validation accuracy", "τ vs test accuracy"],
        "rows": rows,
        "notes": [
            f"Scores at initialisation ({summary['init']} init, {summary['repeats']} inits each) of the ViT base `simulate` trains; "
            f"rank sum after rounding as As-ViT's grow.py declares (κ 2 decimals, length distortion 5). Search winner: {study['best']}.",
            f"Accuracy: {study['rows'][0]['val_accuracy']['n']} seeds × {summary['kendall_steps']} AdamW steps (lr {study['lr']:g}, "
            "batch 64, cosine) from the base's own init; validation = 20% of the digits train split (τ of record), test reported only.",
            f"Scoring {study['score_seconds']:.0f} s, training {study['train_seconds']:.0f} s.",
            f"Candidates (best rank first): {candidates}.",
        ],
        "provenance": provenance(started, time.time() - started, command),
    }


def _plot_kendall(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, tau in (
        (axes[0], "length_distortion", "length distortion (higher = more expressive)", study["tau"]["val"]["length_distortion"]),
        (axes[1], "rank_sum", "rank sum (lower = better)", study["tau"]["val"]["neg_rank_sum"]),
    ):
        ax.scatter([r[key] for r in rows], [r["val_accuracy"]["mean"] for r in rows], s=16)
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy after short training")
        ax.set_title(f"Kendall τ = {tau:.2f}" + (" (of −rank sum)" if key == "rank_sum" else ""))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``search-topology`` to the ``splitmix`` CLI."""
    p = subparsers.add_parser("search-topology", help="As-ViT training-free ViT topology search; writes a run config for `simulate`")
    p.add_argument("--config", default=None, help="the run-config TOML the topology is for (atom width, dim, depth, other keys kept)")
    p.add_argument("--dataset", default=None, help="sets the input shape (default: the config's dataset)")
    p.add_argument("--dim", type=int, default=0, help="fixed base embedding dim (0 = the config's vit-dim × atom-width)")
    p.add_argument("--depth", type=int, default=0, help="fixed depth (0 = the config's vit-depth)")
    p.add_argument("--patch", type=_ints, default=(2, 4), help='candidate patch sizes, e.g. "2,4"')
    p.add_argument("--heads", type=_ints, default=(1, 2, 4, 8), help="candidate base head counts")
    p.add_argument("--mlp-ratio", type=_floats, default=(2.0, 3.0, 4.0), help="candidate MLP ratios")
    p.add_argument("--candidates", type=int, default=0, help="score a seeded sample of this many (0 = the whole grid)")
    p.add_argument("--max-params", type=int, default=None, help="drop candidates above this many parameters per base")
    p.add_argument("--init", choices=INITS, default="kaiming", help="init the scores are taken at (kaiming: teg.py's fan-in; model: simulate's)")
    p.add_argument("--repeats", type=int, default=3, help="seeded inits averaged per score")
    p.add_argument("--points", type=int, default=64, help="points on the input circle (length distortion)")
    p.add_argument("--scale", type=float, default=1.0, help="scale the seed topology to about this × its parameters")
    p.add_argument("--grow-to", type=int, default=0, help="grow the seed topology with As-ViT's loop to this many parameters")
    p.add_argument("--kendall", type=int, default=0, help="also train this many candidates briefly and report Kendall τ")
    p.add_argument("--kendall-steps", type=int, default=150, help="AdamW steps per candidate in the Kendall study")
    p.add_argument("--kendall-seeds", type=int, default=2, help="training seeds per candidate in the Kendall study")
    p.add_argument("--kendall-lr", type=float, default=1e-2, help="AdamW learning rate in the Kendall study")
    p.add_argument("--results", default=None, help="write the Kendall study as a results record (e.g. results/asvit-kendall.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/topology-<timestamp>)")
    p.set_defaults(func=cmd_search_topology)
    return p


def _command_line(args: argparse.Namespace) -> str:
    """Every option as it was resolved, so the command repeats the run whoever called it."""
    parts = ["splitmix search-topology"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, tuple) else str(value)
        parts.append(f"--{key.replace('_', '-')} {shlex.quote(text)}")
    return " ".join(parts)


def cmd_search_topology(args: argparse.Namespace) -> int:
    """Ranked table on stdout, progress on stderr, the output folder as the last line."""
    from rich.console import Console
    from rich.table import Table

    from splitmix.config import ConfigError

    err = Console(stderr=True)
    out = Path(args.out or f"runs/topology-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.results and not args.kendall:
        print("error: --results writes the Kendall study; add --kendall N", file=sys.stderr, flush=True)
        return 2
    started = time.time()
    try:
        summary = search(args, out, lambda text: err.print(text, highlight=False))
    except (ValueError, ConfigError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    summary["kendall_steps"] = args.kendall_steps
    table = Table(title=f"As-ViT scores ({summary['candidates']} candidates, {summary['seconds']:.1f}s), best first")
    for column in ("topology", "params", "length distortion", "NTK κ", "rank sum"):
        table.add_column(column, justify="right")
    for row in summary["ranked"][:10]:
        kappa = row["ntk_cond"]
        table.add_row(
            row["topology"],
            f"{row['params']:,}",
            f"{row['length_distortion']:.5f}",
            kappa if isinstance(kappa, str) else f"{kappa:.3g}",
            str(row["rank_sum"]),
        )
    console = Console(width=120)
    console.print(table)
    console.print(f"chosen: {summary['chosen_name']} ({summary['how']})")
    if "kendall" in summary:
        k = summary["kendall"]["tau"]["val"]
        console.print(
            f"Kendall τ vs validation accuracy: length distortion {k['length_distortion']:.2f}, −NTK κ {k['neg_ntk_cond']:.2f}, "
            f"−rank sum {k['neg_rank_sum']:.2f}, params {k['params']:.2f}"
        )
        if args.results:
            command = _command_line(args)
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps(results_record(summary, started, command), indent=2) + "\n")
    print(out, flush=True)
    return 0
