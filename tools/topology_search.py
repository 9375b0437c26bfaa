"""``splitmix search-topology``: As-ViT's training-free topology search, feeding ``simulate``.

Candidates are plain ViT topologies of **one Split-Mix base** (patch, base embedding dim, depth,
base heads, MLP ratio; ``models.vit.Topology``, scored by ``tools/asvit_scores.py``). Each is scored at initialisation only — length
distortion of a circle of inputs (expressivity) and the NTK condition number (trainability) —
and ranked by rank sum; the best is the seed topology, optionally scaled (closed form) or grown
(As-ViT's greedy loop) to a parameter target. The result is written as a run-config file whose
ViT keys describe the full-width model (base dim / heads ÷ atom width), so
``splitmix simulate --config <out>/topology.toml`` trains Split-Mix bases of exactly that
topology. ``--kendall N`` also trains N candidates briefly and reports Kendall τ between the
training-free scores and accuracy (does the score rank topologies the way training does?).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.vit import Topology
from tools.asvit_scores import (
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
    """Run-config keys that make every Split-Mix base (at ``atom_width``) have ``topology``."""
    n = round(1.0 / atom_width)
    return {
        **(base or {}),
        "model": str((base or {}).get("model", "vit")) if str((base or {}).get("model", "")).startswith("vit") else "vit",
        "atom-width": atom_width,
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


def search(args: argparse.Namespace, out: Path, report: Reporter) -> dict[str, Any]:
    """Score the candidates, pick and scale the seed topology, write the folder; returns the result."""
    from splitmix.data import DATASETS

    image = DATASETS[args.dataset].image_size
    grid = topology_grid(args.patch, args.dim, args.depth, args.heads, args.mlp_ratio, image_size=image)
    if not grid:
        raise ValueError("the candidate grid is empty (every patch size must divide the image size and every dim be a multiple of heads)")
    candidates = sample_topologies(args.candidates, args.seed, grid) if args.candidates else grid
    input_shape = (DATASETS[args.dataset].in_channels, image, image)
    report(f"scoring {len(candidates)} topologies at initialisation ({args.repeats} inits each)")
    result = search_topology(candidates, args.seed, repeats=args.repeats, n_pts=args.points, input_shape=input_shape, max_params=args.max_params)
    chosen, how = result.best, "seed topology"
    family: list[dict[str, Any]] = []
    if args.grow_to:
        grown = grow_topology(chosen, args.grow_to, args.seed, repeats=args.repeats, n_pts=args.points, input_shape=input_shape)
        family = [_score_row(s) for s in grown]
        chosen, how = grown[-1].topology, f"grown to ≥ {args.grow_to:,} parameters (As-ViT's greedy loop)"
    elif args.scale != 1.0:
        chosen, how = scale_topology(chosen, args.scale), f"scaled × {args.scale:g} in parameters (closed form)"
    base: dict[str, Any] = {}
    if args.config:  # keep the file's own keys; the topology keys are replaced
        data = tomllib.loads(Path(args.config).read_text())
        base = dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data))
    base.setdefault("dataset", args.dataset)
    run_config = run_config_for(chosen, args.atom_width, base)
    from splitmix.config import load_config

    load_config(overrides=run_config)  # the chosen topology must be a valid run config (raises ConfigError)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_score_row(s) for s in result.ranked]
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary: dict[str, Any] = {
        "seed": args.seed,
        "dataset": args.dataset,
        "candidates": len(candidates),
        "repeats": args.repeats,
        "seconds": result.seconds,
        "seed_topology": str(result.best),
        "chosen": chosen.to_dict(),
        "chosen_name": str(chosen),
        "how": how,
        "atom_width": args.atom_width,
        "run_config": run_config,
        "ranked": rows,
        "family": family,
    }
    if args.kendall:
        report(f"Kendall study: training {args.kendall} candidates for {args.kendall_steps} steps each")
        study_candidates = sample_topologies(args.kendall, args.seed + 1, grid)
        study = kendall_study(study_candidates, steps=args.kendall_steps, seed=args.seed, repeats=args.repeats, n_pts=args.points)
        summary["kendall"] = study
        _plot_kendall(study, out / "kendall.png")
    (out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_toml(
        out / "topology.toml",
        run_config,
        f"As-ViT topology search (splitmix search-topology, seed {args.seed}): {how}.\n"
        f"Every Split-Mix base is {chosen} (patch-dim-depth-heads-mlp); the vit-* keys are the full-width model.\n"
        f"Use: splitmix simulate --config {out / 'topology.toml'}",
    )
    return summary


def _plot_kendall(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, tau in (
        (axes[0], "length_distortion", "length distortion (higher = more expressive)", study["tau_length_distortion"]),
        (axes[1], "rank_sum", "rank sum (lower = better)", study["tau_neg_rank_sum"]),
    ):
        ax.scatter([r[key] for r in rows], [r["accuracy"] for r in rows], s=16)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy after short training")
        ax.set_title(f"Kendall τ = {tau:.2f}" + (" (of −rank sum)" if key == "rank_sum" else ""))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``search-topology`` to the ``splitmix`` CLI."""
    p = subparsers.add_parser("search-topology", help="As-ViT training-free ViT topology search; writes a run config for `simulate`")
    p.add_argument("--dataset", default="digits", help="sets the input shape (default digits, 8×8)")
    p.add_argument("--patch", type=_ints, default=(2, 4), help='candidate patch sizes, e.g. "2,4"')
    p.add_argument("--dim", type=_ints, default=(16, 32, 64), help="candidate base embedding dims")
    p.add_argument("--depth", type=_ints, default=(2, 4, 6), help="candidate depths")
    p.add_argument("--heads", type=_ints, default=(1, 2, 4), help="candidate base head counts")
    p.add_argument("--mlp-ratio", type=_floats, default=(2.0, 4.0), help="candidate MLP ratios")
    p.add_argument("--candidates", type=int, default=0, help="score a seeded sample of this many (0 = the whole grid)")
    p.add_argument("--max-params", type=int, default=None, help="drop candidates above this many parameters per base")
    p.add_argument("--repeats", type=int, default=3, help="seeded inits averaged per score")
    p.add_argument("--points", type=int, default=64, help="points on the input circle (length distortion)")
    p.add_argument("--scale", type=float, default=1.0, help="scale the seed topology to about this × its parameters")
    p.add_argument("--grow-to", type=int, default=0, help="grow the seed topology with As-ViT's loop to this many parameters")
    p.add_argument("--atom-width", type=float, default=0.125, help="Split-Mix atom width the topology is a base of")
    p.add_argument("--config", default=None, help="a run-config TOML whose other keys the written topology.toml keeps")
    p.add_argument("--kendall", type=int, default=0, help="also train this many candidates briefly and report Kendall τ")
    p.add_argument("--kendall-steps", type=int, default=150, help="AdamW steps per candidate in the Kendall study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/topology-<timestamp>)")
    p.set_defaults(func=cmd_search_topology)
    return p


def cmd_search_topology(args: argparse.Namespace) -> int:
    """Ranked table on stdout, progress on stderr, the output folder as the last line."""
    from rich.console import Console
    from rich.table import Table

    from splitmix.config import ConfigError

    err = Console(stderr=True)
    out = Path(args.out or f"runs/topology-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        summary = search(args, out, lambda text: err.print(text, highlight=False))
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    table = Table(title=f"As-ViT scores ({summary['candidates']} candidates, {summary['seconds']:.1f}s), best first")
    for column in ("topology", "params", "length distortion", "NTK κ", "rank sum"):
        table.add_column(column, justify="right")
    for row in summary["ranked"][:10]:
        kappa = row["ntk_cond"]
        table.add_row(
            row["topology"],
            f"{row['params']:,}",
            f"{row['length_distortion']:.3f}",
            kappa if isinstance(kappa, str) else f"{kappa:.3g}",
            str(row["rank_sum"]),
        )
    console = Console(width=120)
    console.print(table)
    console.print(f"chosen: {summary['chosen_name']} ({summary['how']})")
    if "kendall" in summary:
        k = summary["kendall"]
        console.print(
            f"Kendall τ vs accuracy: length distortion {k['tau_length_distortion']:.2f}, −NTK κ {k['tau_neg_ntk_cond']:.2f}, "
            f"−rank sum {k['tau_neg_rank_sum']:.2f}, params {k['tau_params']:.2f}"
        )
    print(out, flush=True)
    return 0
