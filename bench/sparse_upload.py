"""Upload bytes per round: dense clients vs sparse clients at 90 % sparsity, default workload.

The default run config (digits, 50 clients, budgets 8-4-2-1, half adversarial) through Flower's
Simulation Engine twice with the same seed: once dense, once with every client training sparse
(``sparse-method``, default ``dynamic`` = Flying Bird, ``sparsity`` 0.9). Bytes are the payload
of the reply ArrayRecords the server received (``bytes-up`` in metrics.jsonl). The last line is
``sparse_upload_reduction: X`` with X = dense bytes / sparse bytes per round.

    python bench/sparse_upload.py [--rounds 3] [--method dynamic|static] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from splitmix.config import load_config


def upload_per_round(overrides: dict) -> tuple[float, dict]:
    from server.simulation import simulate

    run = Path(simulate(load_config(overrides=overrides)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return float(np.mean([r["bytes-up"] for r in rows])), {"rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="dynamic", choices=("dynamic", "dynamic-plus", "static"))
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = {"num-rounds": args.rounds, "eval-pgd-steps": 0, "eval-every": args.rounds, "out-dir": tmp}
        dense, dense_info = upload_per_round({**common, "run-name": "dense"})
        sparse, sparse_info = upload_per_round({**common, "run-name": "sparse", "sparse-method": args.method, "sparsity": args.sparsity})
    for name, value, info in (("dense", dense, dense_info), (f"{args.method} {args.sparsity:.0%}", sparse, sparse_info)):
        rows = info["rows"]
        per_round = ", ".join(f"{r['bytes-up'] / 1e6:.2f}" for r in rows)
        sparse_share = sum(r["sparse-replies"] for r in rows) / max(1, sum(r["valid"] for r in rows))
        flops = np.mean([r["train-flops-fraction"] for r in rows])
        acc = info["summary"]["widths"]["1.0"]["accuracy"]
        print(
            f"{name:>14}: upload {value / 1e6:.3f} MB/round (rounds: {per_round}); sparse replies {sparse_share:.0%}; "
            f"training FLOPs {flops:.2f} of dense; accuracy@1.0 after {args.rounds} rounds {acc:.3f}"
        )
    print(f"sparse_upload_reduction: {dense / sparse:.2f}")


if __name__ == "__main__":
    main()
