"""Plain averaging vs coordinate-wise median vs trimmed mean with hostile clients, in a real
(small) federated run.

The server loop (``server.federation.run_federation``), the Split-Mix strategy and the real client
code (local training on the digits data) run in one process through the test suite's in-process
grid, without Ray. A seeded set of attacker partitions (10 % or 20 % of the clients) trains
honestly and then replaces its reply, relative to the global tensors it was sent (``w``), by
``w + s·(trained − w)``: ``s = −10`` (``scaled``: sign-flipped and amplified) or ``s = −1``
(``sign-flip``). Replies pass the server's validation (right keys, shapes, dtypes, finite), as
such an attack would.

Per aggregation rule and scenario it prints the final clean accuracy of the widest (1.0) and
narrowest (0.125) model and the mean aggregation error per round: ‖aggregate − honest-only
example-weighted mean‖ / ‖honest-only mean − previous global‖ over every float tensor (0 = as if
the attackers had not taken part; 1 = off by a whole honest update).

The rule is chosen with the run-config keys ``aggregation`` / ``trim-fraction`` when
``splitmix/config.py`` has them; otherwise this script swaps the Split-Mix strategy's ``combine``
for ``strategies.aggregation.aggregate`` itself.

    python bench/robust_aggregation.py                       # 20 clients, 15 rounds, β = 0.25
    python bench/robust_aggregation.py --clients 10 --rounds 10 --trim-fraction 0.2

With Split-Mix each base is averaged only over the clients that trained it (here about half of
them with the default budgets 8-4-2-1), so the trimmed mean drops ``floor(β · holders)`` values
from each end per base: pick β above the attacker share *per base*.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import InProcessGrid  # noqa: E402  (also sets Flower's task identity for messages)

from server.federation import run_federation  # noqa: E402
from splitmix.config import load_config  # noqa: E402
from splitmix.protocol.codec import to_record, to_tensors, unpack  # noqa: E402
from strategies.aggregation import AGGREGATORS, aggregate  # noqa: E402
from strategies.splitmix import SplitMixStrategy  # noqa: E402

SCALES = {"scaled": -10.0, "sign-flip": -1.0}


def attacking_grid(num_clients: int, attackers: set[int], scale: float) -> InProcessGrid:
    """The in-process grid; replies of ``attackers`` (partition ids) become w + scale·(trained − w)."""
    holder: dict[str, InProcessGrid] = {}

    def tamper(node: int, reply):
        grid = holder["grid"]
        if grid.nodes[node] not in attackers or reply.has_error() or reply.metadata.message_type != "train":
            return reply
        sent = to_tensors(grid.sent[-1].content["arrays"])  # the instruction this node just answered
        trained = to_tensors(reply.content["arrays"])
        attacked = {k: (sent[k] + scale * (v - sent[k])).to(v.dtype) if v.is_floating_point() else v for k, v in trained.items()}
        reply.content["arrays"] = to_record(attacked)
        return reply

    holder["grid"] = InProcessGrid(num_clients, tamper=tamper)
    return holder["grid"]


class ErrorProbe:
    """Wraps ``SplitMixStrategy.combine``: applies the rule (unless the config does) and records
    how far the aggregate is from the honest-only weighted mean."""

    def __init__(self, rule: str, trim_fraction: float, attackers: set[int], num_clients: int) -> None:
        self.rule, self.beta, self.attackers, self.num_clients = rule, trim_fraction, attackers, num_clients
        self.errors: list[float] = []
        self.original = SplitMixStrategy.combine

    def __enter__(self) -> ErrorProbe:
        probe = self

        def combine(strategy: SplitMixStrategy, contributions):
            new = probe.original(strategy, contributions)
            probe.measure(strategy, contributions, new)
            return new

        SplitMixStrategy.combine = combine  # type: ignore[method-assign,assignment]  # the probe wraps every strategy's combine
        return self

    def __exit__(self, *exc) -> None:
        SplitMixStrategy.combine = self.original  # type: ignore[method-assign]

    def measure(self, strategy: SplitMixStrategy, contributions, new) -> None:
        if len(contributions) != self.num_clients:  # order ↔ partition id needs every reply
            return
        # valid replies arrive sorted by partition id: contribution i is partition i
        honest = [c for i, c in enumerate(contributions) if i not in self.attackers]
        reference = aggregate(strategy._current, honest)  # example-weighted mean
        num = den = 0.0
        before, honest_mean, after = unpack(strategy._current), unpack(reference), unpack(new)
        for key in {k for tensors, _ in honest for k in tensors}:
            prev = torch.from_numpy(before[key].astype(np.float64))
            ref = torch.from_numpy(honest_mean[key].astype(np.float64))
            got = torch.from_numpy(after[key].astype(np.float64))
            num += float(((got - ref) ** 2).sum())
            den += float(((ref - prev) ** 2).sum())
        self.errors.append((num / den) ** 0.5 if den > 0 else float("nan"))


def one_run(rule: str, scenario: str, fraction: float, args: argparse.Namespace, out: Path) -> dict:
    count = int(round(fraction * args.clients))
    attackers = set(int(i) for i in np.random.default_rng(args.seed + 7).permutation(args.clients)[:count])
    overrides = {
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "adv-fraction": 0.0,
        "eval-lambdas": "0",
        "eval-pgd-steps": 0,
        "eval-every": args.rounds,
        "seed": args.seed,
        "out-dir": str(out),
        "run-name": f"{rule}-{scenario}-{count}",
    }
    overrides.update({"aggregation": rule, "trim-fraction": args.trim_fraction})
    cfg = load_config(None, overrides)
    grid = attacking_grid(args.clients, attackers, SCALES.get(scenario, 1.0))
    start = time.perf_counter()
    with ErrorProbe(rule, args.trim_fraction, attackers, args.clients) as probe:
        run = run_federation(grid, cfg, report=lambda text: None)
    summary = json.loads((run / "summary.json").read_text())
    widths = summary["widths"]
    return {
        "rule": rule,
        "scenario": scenario,
        "attackers": count,
        "acc_1.0": widths["1.0"]["accuracy"],
        "acc_0.125": widths["0.125"]["accuracy"],
        "error": float(np.nanmean(probe.errors)) if probe.errors else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--trim-fraction", type=float, default=0.25)
    parser.add_argument("--rules", default=",".join(AGGREGATORS))
    parser.add_argument(
        "--scenarios", default="none,scaled@0.1,scaled@0.2,sign-flip@0.2", help="kind@fraction, kind in: none, scaled (×−10), sign-flip (×−1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scenarios = []
    for item in args.scenarios.split(","):
        kind, _, fraction = item.strip().partition("@")
        scenarios.append((kind, float(fraction or 0.0)))
    print(f"{args.clients} clients, {args.rounds} rounds, Split-Mix (budgets 8-4-2-1), digits; trimmed mean β = {args.trim_fraction}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="robust-agg-") as tmp:
        for kind, fraction in scenarios:
            for rule in args.rules.split(","):
                row = one_run(rule.strip(), kind, fraction if kind != "none" else 0.0, args, Path(tmp))
                rows.append(row)
                label = "no attack" if kind == "none" else f"{row['attackers']}/{args.clients} {kind}"
                print(
                    f"{label:>18}  {row['rule']:<13} acc@1.0 {row['acc_1.0']:.3f}  acc@0.125 {row['acc_0.125']:.3f}  "
                    f"aggregation error {row['error']:.3f}  ({row['seconds']:.0f}s)",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
