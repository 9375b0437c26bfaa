"""A deployed round against a simulated round of the same workload.

The default workload of the compose deployment (pyproject defaults + docker/deployment.toml:
4 clients, budgets 1, 1/2, 1/4, 1/8) runs twice in the simulation (``splitmix simulate``, Ray)
and once, between those two, on the compose stack (SuperLink + 4 SuperNode containers with warm
ClientApps, TLS and node auth; the image from docker/build_image.sh). A round's seconds are the
server's own ``train-seconds + eval-seconds`` (metrics.jsonl). Steady state: rounds 2 … R-1
(round 1 carries start-up, the last round the final evaluation). The two simulations bracket
the deployment so that a change in the machine's load shows up as a spread between them.

    python bench/deploy_round.py [--rounds 4] [--local]

``--local``: the same deployment as local processes instead of containers (``deploy/local.py``:
SuperLink + 4 warm SuperNodes on loopback, TLS and node auth), for a machine without Docker.

Last line: ``deploy_vs_sim_round: X`` (mean deployed round / mean simulated round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.compose import ComposeStack, build_image, docker_unavailable  # noqa: E402
from deploy.local import LocalDeployment, default_node_configs  # noqa: E402


def workload(rounds: int) -> dict:
    """docker/deployment.toml without its container paths, with ``rounds`` rounds."""
    config = tomllib.loads((ROOT / "docker" / "deployment.toml").read_text())
    for key in ("out-dir", "data-root"):
        config.pop(key, None)
    return {**config, "num-rounds": rounds}


def round_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if 1 < r["round"] < len(rows)]
    return [r["train-seconds"] + r["eval-seconds"] for r in steady]


def simulate(config: dict, out: Path, name: str) -> list[float]:
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**config, "out-dir": str(out), "run-name": name}.items())
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "splitmix.cli", "simulate", "--run-config", overrides],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed: {proc.stderr[-2000:]}")
    seconds = round_seconds(out / name)
    whole = time.perf_counter() - started
    print(f"simulated ({name}): rounds 2..{config['num-rounds'] - 1}: {[round(s, 1) for s in seconds]} s (whole run {whole:.0f}s)")
    return seconds


def deploy(config: dict, work: Path, local: bool) -> list[float]:
    """The steady rounds of the workload on the compose stack (``local``: as local processes)."""

    def say(text: str) -> None:
        print(f"  {text}", flush=True)

    if local:
        stack: LocalDeployment = LocalDeployment(work / "local", default_node_configs(int(config["num-clients"])), app_dir=ROOT, warm=True, say=say)
    else:
        stack = ComposeStack(work / "compose", image=build_image(), say=say)
    with stack:
        outcome = stack.run({**config, "run-name": "deployed"}, timeout=3600)
        if outcome.status != "finished:completed":
            raise SystemExit(f"deployed run ended {outcome.status}; logs in {stack.logs}")
        seconds = round_seconds(outcome.run_dir)
        if isinstance(stack, ComposeStack):
            tasks = [line.split("INFO :")[-1].strip() for line in stack.service_logs("supernode-0").splitlines() if "completed in" in line]
            print("  supernode-0's warm ClientApp tasks: " + "; ".join(tasks[-6:]))
    where = "local processes" if local else "containers"
    print(f"deployed ({where}): rounds 2..{config['num-rounds'] - 1}: {[round(s, 1) for s in seconds]} s (whole run {outcome.seconds:.0f}s)")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (steady state: 2 … rounds-1)")
    parser.add_argument("--local", action="store_true", help="deploy as local processes (deploy/local.py) instead of the compose stack")
    args = parser.parse_args()
    if args.rounds < 3:
        raise SystemExit(f"--rounds={args.rounds}: at least 3 (rounds 2 … rounds-1 are measured)")
    reason = None if args.local else docker_unavailable()
    if reason:
        raise SystemExit(f"no container deployment here: {reason} (--local runs the deployment as local processes)")
    config = workload(args.rounds)
    with tempfile.TemporaryDirectory(prefix="deploy-round-") as tmp:
        work = Path(tmp)
        sim = simulate(config, work / "runs", "sim-before")
        deployed = deploy(config, work, args.local)
        sim += simulate(config, work / "runs", "sim-after")
    sim_mean, deploy_mean = statistics.mean(sim), statistics.mean(deployed)
    print(f"simulated round {sim_mean:.2f} s (n={len(sim)}, {min(sim):.1f}-{max(sim):.1f}); deployed round {deploy_mean:.2f} s (n={len(deployed)})")
    print(f"sim_round_s: {sim_mean:.2f}")
    print(f"deploy_round_s: {deploy_mean:.2f}")
    print(f"deploy_vs_sim_round: {deploy_mean / sim_mean:.2f}")


if __name__ == "__main__":
    main()
