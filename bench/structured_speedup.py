"""CPU inference speed-up of a structured lottery ticket found by ``splitmix prune`` on a trained run.

    python bench/structured_speedup.py [--run DIR] [--width 1.0] [--channel-sparsity 0.7]
                                       [--imp-rounds 2] [--epochs 1] [--batch 256] [--threads 1] [--repeats 7]

Without ``--run`` it first trains a small federation in-process (embedded digits, ``cnn``, 8
clients, 6 rounds, no adversarial clients, ``rewind-round=2``; about a minute on one core) into a
temporary folder. The ticket is what ``splitmix prune`` finds: IMP with refill and rewinding to the
run's ``rewind.safetensors``, IMP's per-layer channel allocation at the requested global channel
sparsity, fine-tuned and physically sliced (:func:`tools.prune.run_pruning`). Timed: the dense
parent (the served mixture at ``--width``) and the sliced ticket, eager and BN-folded channels-last
(``models/fuse.py``, as ``splitmix query``/``serve`` serve models), interleaved, median of
``--repeats`` forwards of one batch in inference mode. The masked ticket is not timed: it runs at
dense cost. The last line is ``structured_speedup: X`` = dense / sliced time, eager.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

SMALL_RUN = (
    "num-clients=8 num-rounds=6 rewind-round=2 local-epochs=1 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 eval-lambdas='0' "
    "model='cnn' dataset='digits'"
)


def train_small_run(out_dir: Path) -> Path:
    """A small trained run (``SMALL_RUN``) on the in-process grid; returns its folder."""
    from server.federation import run_federation
    from server.local_grid import InProcessGrid
    from splitmix.config import load_config

    cfg = load_config(overrides=f"{SMALL_RUN} out-dir='{out_dir}' run-name=bench")
    return run_federation(InProcessGrid(cfg.federation.num_clients), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a finished run folder with rewind.safetensors (default: train a small one)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--channel-sparsity", type=float, default=0.7)
    parser.add_argument("--imp-rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tools.prune import PruneSettings, run_pruning

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = Path(args.run) if args.run else train_small_run(Path(tmp))
        trained_s = time.perf_counter() - start
        settings = PruneSettings(
            width=args.width,
            channel_sparsity=args.channel_sparsity,
            imp_rounds=args.imp_rounds,
            epochs=args.epochs,
            timing_repeats=args.repeats,
            timing_batch=args.batch,
        )
        result = run_pruning(run, settings, out=Path(tmp) / "ticket")
    card = result.card
    cs, inf, acc = card["channel_sparsity"], card["inference_cpu"], card["accuracy"]
    channels = cs["channels_per_base"]
    print(
        f"run {'(trained here, ' + format(trained_s, '.0f') + ' s)' if not args.run else args.run}: {card['method']} {card['model']} "
        f"width {card['width']:g}, {len(card['bases'] or [0])} base(s); rewind: {card['imp']['rewind']}"
    )
    print(
        f"ticket: IMP {card['imp']['rounds']} rounds, global channel sparsity {cs['global']:.3f} (requested {cs['requested']:g}); "
        f"channels per base {'-'.join(str(c['dense']) for c in channels.values())} → {'-'.join(str(c['kept']) for c in channels.values())}; "
        f"weight sparsity {card['weight_sparsity']:.3f}"
    )
    diff = card["max_abs_logit_diff_masked_vs_sliced"]
    print(f"test accuracy: dense {acc['dense']:.4f}, ticket {acc['sliced']:.4f} (sliced = masked, max |Δlogit| {diff:.1e})")
    params, macs = card["params"], card["macs"]
    print(
        f"params {params['dense']:,} → {params['sliced']:,} ({params['ratio']:.3f}); "
        f"MACs {macs['dense']:,} → {macs['sliced']:,} ({macs['ratio']:.3f})"
    )
    print(f"CPU, batch {inf['batch']}, {inf['threads']} thread(s), median of {inf['repeats']} interleaved forwards:")
    for kind in ("eager", "fused"):
        t = inf[kind]
        print(f"  {kind:>5}: dense {t['dense_ms']:.2f} ms, sliced ticket {t['sliced_ms']:.2f} ms → {t['speedup']:.2f}×")
    print(f"structured_speedup: {inf['eager']['speedup']:.2f}")


if __name__ == "__main__":
    main()
