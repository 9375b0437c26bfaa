"""``splitmix ntk``: empirical NTK of dense vs randomly pruned MLPs over width (arXiv 2203.14328).

For each width, seed and pruning probability p, one NTK-parametrised ReLU MLP is initialised, and
the same weights are pruned with one mask, once as is and once with the kept weights rescaled by
1/sqrt(1-p). Reported per (width, p), seed means of

* ``err_*``: ||K_pruned − K_dense||_F / ||K_dense||_F (pairwise: same init, mask applied);
* ``scale_*``: the least-squares factor <K_pruned, K_dense> / <K_dense, K_dense>.

Expected (ReLU, no biases, D pruned layers whose fan-in is the width): the rescaled error falls
like ~1/sqrt(width); the unrescaled kernel tends to (1-p)^D · K_dense, i.e. a factor (1-p) per
pruned layer, so its error tends to 1 - (1-p)^D. The input layer (fan-in = input dim, which does
not grow) stays dense unless ``prune_input``: its mask noise never averages out, which leaves a
floor on the rescaled error (≈0.04 at p=0.5, input dim 16, one hidden layer).

Run: ``python -m tools.ntk_study [--widths ...]`` or, once wired into the CLI, ``splitmix ntk``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from techniques.random_init import random_prune_, weight_jacobian
from tools.ntk import NTKMLP, empirical_ntk


@dataclass(frozen=True)
class NTKStudyConfig:
    """One sweep; every field lands in results.json so a study can be repeated exactly."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    ps: tuple[float, ...] = (0.3, 0.5, 0.7)
    seeds: int = 3
    depth: int = 2  # hidden layers
    num_inputs: int = 16
    input_dim: int = 16
    prune_input: bool = False
    seed: int = 0  # base seed: inputs, inits and masks all derive from it

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive integers, got {self.widths}")
        if not self.ps or any(not 0.0 <= p < 1.0 for p in self.ps):
            raise ValueError(f"pruning probabilities must be in [0, 1), got {self.ps}")
        for key in ("seeds", "depth", "num_inputs", "input_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @property
    def pruned_layers(self) -> int:
        """D: hidden-to-hidden layers and the read-out, plus the input layer if pruned."""
        return self.depth + (1 if self.prune_input else 0)

    @property
    def skip(self) -> tuple[str, ...]:
        return () if self.prune_input else ("layers.0",)


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(seed)


def make_inputs(cfg: NTKStudyConfig) -> torch.Tensor:
    """Gaussian points scaled to norm sqrt(input_dim), so every input has unit mean square."""
    x = torch.randn(cfg.num_inputs, cfg.input_dim, generator=_generator(cfg.seed, 1))
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(cfg.input_dim)


def relative_error(k: torch.Tensor, k_ref: torch.Tensor) -> float:
    return float((k - k_ref).norm() / k_ref.norm())


def fitted_scale(k: torch.Tensor, k_ref: torch.Tensor) -> float:
    """argmin_c ||k − c·k_ref||_F."""
    return float((k * k_ref).sum() / (k_ref * k_ref).sum())


def kernels(cfg: NTKStudyConfig, width: int, seed: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[float, tuple[torch.Tensor, ...]]]:
    """Dense NTK and, per p, the NTKs of one init with one mask: pruned, pruned + rescaled (both
    w.r.t. the initialisation variables θ, the paper's parameterisation), and pruned + rescaled
    w.r.t. the *stored* weights w = s·M⊙θ (what a client's optimizer updates: ∂w/∂w = M)."""
    dense = NTKMLP(cfg.input_dim, width, cfg.depth, generator=_generator(cfg.seed, 2, seed, width))
    k_dense = empirical_ntk(dense, x)
    out = {}
    for p in cfg.ps:
        found = []
        for rescale in (False, True):
            net = copy.deepcopy(dense)
            mask_gen = _generator(cfg.seed, 3, seed, width, round(p * 1_000_000))  # same mask both times
            masks = random_prune_(net, p, rescale, mask_gen, skip=cfg.skip)
            found.append(empirical_ntk(net, x, weight_jacobian(masks, p, rescale)))
        found.append(empirical_ntk(net, x, weight_jacobian(masks, p, rescale=False)))  # the rescaled net, stored weights
        out[p] = tuple(found)
    return k_dense, out


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def compute_table(cfg: NTKStudyConfig, report: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (width, p) with seed means (and stds) of errors and fitted scales."""
    x = make_inputs(cfg)
    d = cfg.pruned_layers
    rows = []
    for width in cfg.widths:
        start = time.perf_counter()
        per_p: dict[float, dict[str, list[float]]] = {p: {"ep": [], "er": [], "sp": [], "sr": [], "ew": [], "sw": []} for p in cfg.ps}
        for seed in range(cfg.seeds):
            k_dense, pruned = kernels(cfg, width, seed, x)
            for p, (k_p, k_r, k_w) in pruned.items():
                acc = per_p[p]
                acc["ep"].append(relative_error(k_p, k_dense))
                acc["er"].append(relative_error(k_r, k_dense))
                acc["sp"].append(fitted_scale(k_p, k_dense))
                acc["sr"].append(fitted_scale(k_r, k_dense))
                acc["ew"].append(relative_error(k_w, k_dense))
                acc["sw"].append(fitted_scale(k_w, k_dense))
        seconds = time.perf_counter() - start
        for p, acc in per_p.items():
            er, er_sd = _mean_std(acc["er"])
            ep, ep_sd = _mean_std(acc["ep"])
            sp, _ = _mean_std(acc["sp"])
            sr, _ = _mean_std(acc["sr"])
            rows.append(
                {
                    "width": width,
                    "p": p,
                    "err_rescaled": er,
                    "err_rescaled_std": er_sd,
                    "err_pruned": ep,
                    "err_pruned_std": ep_sd,
                    "scale_rescaled": sr,
                    "scale_pruned": sp,
                    "err_stored": _mean_std(acc["ew"])[0],
                    "scale_stored": _mean_std(acc["sw"])[0],
                    "per_layer_factor": max(sp, 0.0) ** (1.0 / d),
                    "limit_scale_pruned": (1.0 - p) ** d,
                    "limit_err_pruned": 1.0 - (1.0 - p) ** d,
                    "seconds_width": seconds,
                }
            )
        if report:
            report(f"width {width}: {cfg.seeds} seed(s) × {len(cfg.ps)} p in {seconds:.1f}s")
    return rows


def plot(rows: list[dict], cfg: NTKStudyConfig, path: Path) -> Path:
    """Left: relative error vs width (solid rescaled, dashed unrescaled, dotted asymptote
    1-(1-p)^D). Right: fitted scale vs width with the (1-p)^D limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_scale) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("viridis")
    widths = list(cfg.widths)
    d = cfg.pruned_layers
    for i, p in enumerate(cfg.ps):
        color = cmap(i / max(len(cfg.ps) - 1, 1) * 0.85)
        sel = [r for r in rows if r["p"] == p]
        ax_err.plot(widths, [r["err_rescaled"] for r in sel], "o-", color=color, label=f"p={p:g} rescaled")
        ax_err.plot(widths, [r["err_pruned"] for r in sel], "s--", color=color, label=f"p={p:g} unrescaled")
        ax_err.axhline(1 - (1 - p) ** d, color=color, ls=":", lw=1, label=f"1-(1-p)^{d} = {1 - (1 - p) ** d:.3f}")
        ax_scale.plot(widths, [r["scale_rescaled"] for r in sel], "o-", color=color, label=f"p={p:g} rescaled")
        ax_scale.plot(widths, [r["scale_pruned"] for r in sel], "s--", color=color, label=f"p={p:g} unrescaled")
        ax_scale.axhline((1 - p) ** d, color=color, ls=":", lw=1, label=f"(1-p)^{d} = {(1 - p) ** d:.3f}")
    first = [r for r in rows if r["p"] == cfg.ps[len(cfg.ps) // 2]][0]["err_rescaled"]
    ax_err.plot(widths, [first * math.sqrt(widths[0] / w) for w in widths], color="grey", lw=1, label="∝ width^-1/2")
    ax_err.set(
        xscale="log", yscale="log", xlabel="width", ylabel="||K_pruned − K_dense||_F / ||K_dense||_F", title="relative NTK error to the dense network"
    )
    ax_scale.set(
        xscale="log",
        yscale="log",
        xlabel="width",
        ylabel="<K_pruned, K_dense> / <K_dense, K_dense>",
        title="fitted kernel scale (→ 1 rescaled, → (1-p)^D unrescaled)",
    )
    for ax in (ax_err, ax_scale):
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"random pruning at init, NTK-param ReLU MLP: depth {cfg.depth}, {d} pruned layers, "
        f"{cfg.num_inputs} inputs in R^{cfg.input_dim}, {cfg.seeds} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_study(cfg: NTKStudyConfig, out_dir: Path, report: Callable[[str], None] | None = None) -> list[dict]:
    """Compute the table and write results.json, results.csv and ntk_error.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = compute_table(cfg, report)
    meta = {
        "config": asdict(cfg),
        "pruned_layers": cfg.pruned_layers,
        "kernel": "empirical NTK, scalar output, (num_inputs, num_inputs); gradients w.r.t. the N(0,1) "
        "init variables θ of the kept weights, w = s·mask⊙θ (s = 1/sqrt(1-p) when rescaled)",
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(meta, indent=2))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, cfg, out_dir / "ntk_error.png")
    return rows


def print_table(rows: list[dict], cfg: NTKStudyConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    d = cfg.pruned_layers
    table = Table(title=f"pruned vs dense empirical NTK (mean of {cfg.seeds} seeds, D={d} pruned layers)")
    for column in (
        "width",
        "p",
        "err rescaled",
        "err unrescaled",
        f"1-(1-p)^{d}",
        "scale unrescaled",
        f"(1-p)^{d}",
        "per-layer factor",
        "scale rescaled",
        "err stored w",
        "scale stored w",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["width"]),
            f"{r['p']:g}",
            f"{r['err_rescaled']:.4f}±{r['err_rescaled_std']:.4f}",
            f"{r['err_pruned']:.4f}",
            f"{r['limit_err_pruned']:.4f}",
            f"{r['scale_pruned']:.4f}",
            f"{r['limit_scale_pruned']:.4f}",
            f"{r['per_layer_factor']:.4f}",
            f"{r['scale_rescaled']:.4f}",
            f"{r['err_stored']:.4f}",
            f"{r['scale_stored']:.4f}",
        )
    Console(width=140).print(table)


def results_record(rows: list[dict], cfg: NTKStudyConfig, started: float, command: str) -> dict:
    """The table as a ``{"kind": "table"}`` results record (``tools/results_docs.py``) with provenance."""
    from tools.provenance import provenance

    d = cfg.pruned_layers
    cell = lambda mean, std: {"mean": mean, "std": std, "n": cfg.seeds}  # noqa: E731
    return {
        "kind": "table",
        "caption": (
            f"Empirical NTK of a randomly pruned ReLU MLP (NTK parameterisation, {cfg.depth} hidden layers, {d} pruned, "
            f"{cfg.num_inputs} inputs) against the dense one: relative Frobenius error and fitted scale, mean (± std) over {cfg.seeds} seeds"
        ),
        "columns": [
            "width",
            "p",
            "error, rescaled (θ)",
            "error, unrescaled (θ)",
            "scale, unrescaled (θ)",
            f"(1−p)^{d}",
            "scale, rescaled (θ)",
            "error, rescaled (stored w)",
            "scale, rescaled (stored w)",
        ],
        "rows": [
            [
                r["width"],
                f"{r['p']:g}",
                cell(r["err_rescaled"], r["err_rescaled_std"]),
                r["err_pruned"],
                r["scale_pruned"],
                r["limit_scale_pruned"],
                r["scale_rescaled"],
                r["err_stored"],
                r["scale_stored"],
            ]
            for r in rows
        ],
        "notes": [
            "θ: gradients w.r.t. the N(0, 1) initialisation variables of the kept weights "
            "(w = s·M⊙θ, s = 1/sqrt(1 − p) when rescaled): the paper's setting.",
            "stored w: the rescaled network's kernel w.r.t. the weights themselves, "
            "what a client's optimizer updates in the federated `random` method; "
            "each pruned layer's term shrinks by (1 − p), so it does not approach the dense NTK.",
        ],
        "provenance": provenance(started, time.time() - started, command),
    }


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = NTKStudyConfig()
    parser.add_argument("--widths", type=_int_list, default=d.widths, help='hidden widths, e.g. "64,128,256,512,1024,2048"')
    parser.add_argument("--ps", type=_float_list, default=d.ps, help='pruning probabilities, e.g. "0.3,0.5,0.7"')
    parser.add_argument("--seeds", type=int, default=d.seeds, help="inits (and masks) averaged per point")
    parser.add_argument("--depth", type=int, default=d.depth, help="hidden layers")
    parser.add_argument("--num-inputs", type=int, default=d.num_inputs, help="points the kernel is evaluated on")
    parser.add_argument("--input-dim", type=int, default=d.input_dim)
    parser.add_argument("--prune-input", action="store_true", help="also prune the input layer (its fan-in does not grow with width)")
    parser.add_argument("--seed", type=int, default=d.seed, help="base seed")
    parser.add_argument("--out", default=None, help="output folder (default runs/ntk-<timestamp>)")
    parser.add_argument("--results", default=None, help="also write the table as a results record (e.g. results/ntk-random-pruning.json)")
    parser.set_defaults(func=run)
    return parser


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``ntk`` subcommand to the ``splitmix`` CLI's subparsers."""
    parser = subparsers.add_parser("ntk", help="empirical NTK of dense vs randomly pruned MLPs over width (arXiv 2203.14328)")
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Handler of ``splitmix ntk``: table on stdout, progress on stderr, the folder as last line."""
    from rich.console import Console

    try:
        cfg = NTKStudyConfig(
            widths=tuple(args.widths),
            ps=tuple(args.ps),
            seeds=args.seeds,
            depth=args.depth,
            num_inputs=args.num_inputs,
            input_dim=args.input_dim,
            prune_input=args.prune_input,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    out_dir = Path(args.out or f"runs/ntk-{time.strftime('%Y%m%d-%H%M%S')}")
    err = Console(stderr=True)
    started = time.time()
    rows = run_study(cfg, out_dir, report=lambda text: err.print(text, highlight=False))
    print_table(rows, cfg)
    if args.results:
        command = "splitmix ntk " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "splitmix ntk"
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results_record(rows, cfg, started, command), indent=2) + "\n")
    print(out_dir, flush=True)  # the last line of stdout: the output folder
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m tools.ntk_study", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
