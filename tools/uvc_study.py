"""UVC vs magnitude vs random head/neuron pruning of a small federated ViT, at one training budget.

    python -m tools.uvc_study [--seeds 0,1,2] [--flops-ratio 0.5] [--out results/uvc-compress.json]

Per seed: one small Split-Mix ViT run on the embedded digits (``RUN``: 4 clients, 8 rounds, T0
bases) trained in-process; then ``splitmix compress`` of its width-0.25 model (2 bases) to the
FLOPs budget (:func:`tools.compress.compress_run`) with three arms that all train the weights for
the same number of epochs (``SEARCH`` + ``FINETUNE``) with the same distillation, rate and batch
size: UVC (search epochs, budget projection as the last step, fine-tune epochs), magnitude (the
same heads and neurons per block by weight norm, fine-tuned for all those epochs) and random (the
magnitude arm's counts, groups drawn at random). Every setting is fixed in advance; nothing is
chosen on data; the test split is only reported. Writes a ``{"kind": "table", ...}`` record
(mean ± std over seeds, per-seed numbers under ``per_seed``) with
:func:`tools.provenance.provenance`; the last line of stdout is the output path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tools.structured_study import cell

RUN = "model=vit num-clients=4 num-rounds=8 local-epochs=2 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 eval-lambdas='0' budgets='8-1'"
WIDTH, SEARCH, FINETUNE = 0.25, 5, 5
COLUMNS = ["arm", "weight-training epochs", "MACs ratio (measured)", "learned MACs ratio, before projection", "test accuracy", "dense accuracy"]


def one_seed(seed: int, flops_ratio: float, work: Path, say) -> dict[str, Any]:
    """Train the seed's run and compress it with the three arms; one per-seed record."""
    from server.federation import run_federation
    from server.local_grid import InProcessGrid
    from splitmix.config import load_config
    from tools.compress import compress_run

    cfg = load_config(overrides=f"{RUN} seed={seed} out-dir='{work}' run-name=seed{seed}")
    start = time.perf_counter()
    run = run_federation(InProcessGrid(cfg.federation.num_clients), cfg)
    say(f"seed {seed}: run trained in {time.perf_counter() - start:.0f} s")
    card = compress_run(
        run,
        WIDTH,
        flops_ratio,
        out=work / f"seed{seed}-uvc",
        search_epochs=SEARCH,
        finetune_epochs=FINETUNE,
        seed=seed,
        report=say,
        progress=False,
        random_control=True,
    )
    return {
        "seed": seed,
        "dense": card["accuracy"]["dense"],
        "uvc": card["accuracy"]["compressed"],
        "uvc_macs_ratio": card["flops_ratio"]["measured"],
        "uvc_learned_ratio": card["flops_ratio"]["learned_before_projection"],
        "magnitude": card["baseline"]["accuracy"],
        "magnitude_macs_ratio": card["baseline"]["macs_ratio"],
        "random": card["random_control"]["accuracy"],
        "random_macs_ratio": card["random_control"]["macs_ratio"],
        "uvc_blocks_kept": card["kept"]["blocks_kept"],
    }


def table(per_seed: list[dict[str, Any]], flops_ratio: float, seeds: list[int], started: float, wall_s: float, command: str) -> dict[str, Any]:
    """The results record: one row per arm, mean ± std over seeds."""
    from tools.provenance import provenance

    def col(key: str) -> dict[str, float | int]:
        return cell([float(r[key]) for r in per_seed])

    epochs = SEARCH + FINETUNE
    dense = col("dense")
    rows = [
        ["UVC (search + projection + fine-tune)", epochs, col("uvc_macs_ratio"), col("uvc_learned_ratio"), col("uvc"), dense],
        ["magnitude (uniform, weight norm)", epochs, col("magnitude_macs_ratio"), "-", col("magnitude"), dense],
        ["random (magnitude's counts)", epochs, col("random_macs_ratio"), "-", col("random"), dense],
    ]
    return {
        "kind": "table",
        "caption": f"splitmix compress of a small federated ViT (digits, width {WIDTH:g}, 2 T0 bases) to a FLOPs budget of "
        f"{flops_ratio:g}: UVC vs magnitude vs random head/neuron pruning, each training the weights {epochs} epochs; "
        f"mean ± std over {len(seeds)} seeds.",
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            f"Runs: {RUN} (seeds {', '.join(map(str, seeds))}), trained in-process (server/local_grid.py); compressed at width "
            f"{WIDTH:g} on the union of the client partitions.",
            f"UVC: {SEARCH} search epochs (primal-dual, distillation; the learned ratio is before the budget projection, "
            f"which is the labelled last step), then {FINETUNE} fine-tune epochs with fixed masks. Magnitude and random: "
            f"{epochs} fine-tune epochs with fixed masks (the same distillation, lr 5e-4, batch 64).",
            "Accuracy: pooled test split of the run's data set (reported only; every setting was fixed in advance, nothing "
            "was chosen on data). Dense accuracy: the served width-0.25 model before compression.",
        ],
        "provenance": provenance(started, wall_s, command),
        "per_seed": per_seed,
    }


OPTIONS: list[tuple[str, Any, str]] = [
    ("--seeds", "0,1,2", "run seeds (at least 3)"),
    ("--flops-ratio", 0.5, "the FLOPs budget of every arm"),
    ("--out", "results/uvc-compress.json", "where the results record goes"),
    ("--work", None, "folder for the runs and compressed models (default: a temporary one)"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.uvc_study", description=__doc__.splitlines()[0])
    for flag, default, text in OPTIONS:
        parser.add_argument(flag, type=type(default) if default is not None else str, default=default, help=text)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3:
        print(f"error: --seeds {args.seeds!r} has {len(seeds)} seed(s); allowed: at least 3", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the study's timings do not matter; the shared cores do
    started, t0 = time.time(), time.perf_counter()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [one_seed(seed, args.flops_ratio, Path(args.work or tmp), say) for seed in seeds]
    command = "python -m tools.uvc_study " + " ".join(argv if argv is not None else sys.argv[1:])
    record = table(per_seed, args.flops_ratio, seeds, started, time.perf_counter() - t0, command.strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for row in record["rows"]:
        say("  ".join(c if isinstance(c, str) else f"{c}" if isinstance(c, int) else f"{c['mean']:.3f}±{c['std']:.3f}" for c in row))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
