"""Structured lottery tickets on small federated runs: found ticket vs random channels, and speed.

    python -m tools.structured_study [--seeds 0,1,2,3,4] [--sparsities 0.5,0.7,0.9] [--out results/structured-tickets.json]

Per seed: one small Split-Mix run on the embedded digits (``RUN`` below: 10 clients, 12 rounds,
``cnn``, no adversarial clients, ``rewind-round=2``) trained in-process; then, per channel
sparsity S, ``splitmix prune`` at width 1 (all 8 bases): IMP (3 rounds, refill, rewinding to
``rewind.safetensors``, 2 epochs of masked SGD per round on the union of the client partitions),
IMP's per-layer channel allocation at global channel sparsity S, fine-tuned 2 epochs, sliced
(:func:`tools.prune.run_pruning`). Its two controls (``random_control``): random channels at the
ticket's count per layer and base, and random channels at S in every layer, each rewound to the
same point and fine-tuned with the same epochs, rate and batch order. Nothing is chosen on data here (every setting is fixed in
advance), and the test split is only reported. Timing: dense parent vs sliced ticket, eager and
BN-folded, batch 256, one thread, median of 7 interleaved forwards.

Writes a ``{"kind": "table", ...}`` record (mean ± std over seeds per cell, plus the per-seed
numbers under ``per_seed``) with :func:`tools.provenance.provenance`; the last line of stdout is
the output path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RUN = (
    "num-clients=10 num-rounds=12 rewind-round=2 local-epochs=1 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 eval-lambdas='0' "
    "model='cnn' dataset='digits'"
)
WIDTH, IMP_ROUNDS, EPOCHS = 1.0, 3, 2
COLUMNS = [
    "channel sparsity (global)",
    "dense parent",
    "found ticket (IMP + rewind)",
    "random channels, ticket's counts per layer",
    "random channels, uniform per layer",
    "ticket − random (ticket's counts)",
    "ticket − random (uniform)",
    "params sliced/dense",
    "MACs sliced/dense",
    "CPU speed-up eager",
    "CPU speed-up BN-folded",
]


def cell(values: list[float]) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` over seeds (sample std; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def one_seed(seed: int, sparsities: list[float], work: Path, say) -> list[dict[str, Any]]:
    """Train the seed's run, prune it at every sparsity (ticket + random control); one row each."""
    from server.federation import run_federation
    from server.local_grid import InProcessGrid
    from splitmix.config import load_config
    from tools.prune import PruneSettings, run_pruning

    cfg = load_config(overrides=f"{RUN} seed={seed} out-dir='{work}' run-name=seed{seed}")
    start = time.perf_counter()
    run = run_federation(InProcessGrid(cfg.federation.num_clients), cfg)
    say(f"seed {seed}: run trained in {time.perf_counter() - start:.0f} s")
    rows = []
    for s in sparsities:
        settings = PruneSettings(width=WIDTH, channel_sparsity=s, imp_rounds=IMP_ROUNDS, epochs=EPOCHS, seed=seed, random_control=True)
        card = run_pruning(run, settings, out=work / f"seed{seed}-cs{s:g}").card
        acc, inf = card["accuracy"], card["inference_cpu"]
        row = {
            "seed": seed,
            "requested": s,
            "channel_sparsity": card["channel_sparsity"]["global"],
            "kept_per_base": {p: c["kept"] for p, c in card["channel_sparsity"]["channels_per_base"].items()},
            "dense": acc["dense"],
            "ticket": acc["sliced"],
            "random_same_counts": acc["random_same_counts"],
            "random_uniform": acc["random_uniform"],
            "params_ratio": card["params"]["ratio"],
            "macs_ratio": card["macs"]["ratio"],
            "speedup_eager": inf["eager"]["speedup"],
            "speedup_fused": inf["fused"]["speedup"],
        }
        say(
            f"seed {seed} S={s:g}: dense {row['dense']:.4f} ticket {row['ticket']:.4f} random {row['random_same_counts']:.4f} "
            f"(ticket's counts) {row['random_uniform']:.4f} (uniform) "
            f"kept {row['kept_per_base']} speed-up {row['speedup_eager']:.2f}× / {row['speedup_fused']:.2f}× folded"
        )
        rows.append(row)
    return rows


def table(per_seed: list[dict[str, Any]], sparsities: list[float], seeds: list[int], started: float, wall_s: float, command: str) -> dict[str, Any]:
    from tools.provenance import provenance

    rows = []
    for s in sparsities:
        runs = [r for r in per_seed if r["requested"] == s]
        rows.append(
            [
                cell([r["channel_sparsity"] for r in runs]),
                cell([r["dense"] for r in runs]),
                cell([r["ticket"] for r in runs]),
                cell([r["random_same_counts"] for r in runs]),
                cell([r["random_uniform"] for r in runs]),
                cell([r["ticket"] - r["random_same_counts"] for r in runs]),
                cell([r["ticket"] - r["random_uniform"] for r in runs]),
                cell([r["params_ratio"] for r in runs]),
                cell([r["macs_ratio"] for r in runs]),
                cell([r["speedup_eager"] for r in runs]),
                cell([r["speedup_fused"] for r in runs]),
            ]
        )
    return {
        "kind": "table",
        "caption": "Structured lottery tickets (splitmix prune) on small Split-Mix runs on digits: test accuracy of the width-1 model, "
        "its found ticket, random channels at the same global channel sparsity, and the sliced ticket's CPU speed-up; "
        f"mean ± std over {len(seeds)} seeds.",
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            f"Runs: {RUN} (seeds {', '.join(map(str, seeds))}), trained in-process (server/local_grid.py).",
            f"Ticket: splitmix prune --width {WIDTH:g} --imp-rounds {IMP_ROUNDS} --epochs {EPOCHS} --lr 0.01: IMP with refill, rewinding to the "
            "served weights after round 2 (rewind.safetensors); IMP's per-layer channel allocation scaled to the global channel sparsity "
            "(1 − kept/dense over conv1, conv2, conv3, fc1 per base); fine-tuned on the union of the client partitions.",
            "Random channels, both controls rewound to the same point and fine-tuned with the same epochs, rate and batch order: "
            "(ticket's counts) the ticket's kept count per layer and base, channels drawn at random — isolates which channels IMP picks; "
            "(uniform) every layer at the requested sparsity (same global count), channels drawn at random — plain random channel pruning.",
            "Accuracy: pooled test split of the run's data set (reported only; every setting was fixed in advance, nothing was chosen on data).",
            "Speed-up: dense parent / sliced ticket, median ms of 7 interleaved forwards, batch 256 of 8×8 inputs, 1 CPU thread; "
            "BN-folded = models/fuse.py channels-last copies as served. The 2 cores were shared with other work while this ran, "
            "so the timings are noisy (see the std).",
        ],
        "per_seed": per_seed,
        "provenance": provenance(started, wall_s, command),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.structured_study", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="run seeds (at least 3)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9", help="global channel sparsities")
    parser.add_argument("--out", default="results/structured-tickets.json")
    parser.add_argument("--work", default=None, help="folder for the runs and tickets (default: a temporary one)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if len(seeds) < 3:
        print("error: --seeds needs at least 3 seeds", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    started, t0 = time.time(), time.perf_counter()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        per_seed = [row for seed in seeds for row in one_seed(seed, sparsities, work, say)]
    command = "python -m tools.structured_study " + " ".join(argv if argv is not None else sys.argv[1:])
    record = table(per_seed, sparsities, seeds, started, time.perf_counter() - t0, command.strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for row in record["rows"]:
        say("  ".join(c if isinstance(c, str) else f"{c['mean']:.3f}±{c['std']:.3f}" for c in row))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
