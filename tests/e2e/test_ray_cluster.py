"""`splitmix simulate` on an existing Ray cluster: a real head node plus one worker node on this
machine (``ray start``), a 2-round run through ``ray-address``, then the cluster is stopped.

The cluster gets its own short temp dir (Ray's socket paths must stay under ~107 characters),
its own ports and ``RAY_TMPDIR``, so it never becomes "the latest cluster" that a plain
``ray.init()`` elsewhere on the machine would join. It is stopped by signalling the process
groups of the two ``ray start --block`` processes this test started — never with ``ray stop``,
which kills every Ray process of the user on the machine (other test runs included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: real processes (Ray, SuperLink, subprocesses)

RAY = Path(sys.executable).with_name("ray")
ROOT = Path(__file__).resolve().parents[2]
STARTED = "Ray runtime started"
# Generous deadlines (a machine at load 15 starts Ray in minutes, not seconds): they only bound
# a failure; a healthy run never waits for them.
START_DEADLINE = 600.0  # `ray start` printing STARTED
STOP_GRACE = 300.0  # SIGTERM → every process of the cluster gone
KILL_DEADLINE = 120.0  # SIGKILL → gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A head and ``workers`` worker nodes, one CPU each, started with ``ray start --block``."""

    def __init__(self, workers: int = 1) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.env = {**os.environ, "RAY_TMPDIR": self.temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
            ],
        )
        for i in range(workers):
            self._start(f"worker{i}", [f"--address={self.address}"])

    def _start(self, name: str, args: list[str]) -> None:
        log = Path(self.temp_dir) / f"{name}.log"
        common = [
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            "--block",
            f"--object-store-memory={100 * 1024 * 1024}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(RAY), "start", *args, *common],
                env=self.env,
                cwd=self.temp_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group
            )
        self.procs.append(proc)
        self.logs.append(log)
        deadline = time.monotonic() + START_DEADLINE
        while STARTED not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def leftovers(self) -> list[str]:
        """Live (non-zombie) processes of this cluster: in its process groups, or naming its
        temp dir on their command line."""
        groups = {p.pid for p in self.procs}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, …
            if fields[0] == "Z":
                continue
            if int(fields[2]) in groups or self.temp_dir in cmdline:
                found.append(f"{entry.name} {cmdline[:120]}")
        return found

    def stop(self, grace: float = STOP_GRACE) -> list[str]:
        """SIGTERM each node's process group (workers first), SIGKILL what is left after
        ``grace`` seconds; returns what was still alive after SIGTERM."""
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        stubborn = self.leftovers()
        self._kill_everything()
        return stubborn

    def _kill_everything(self) -> None:
        """SIGKILL the process groups and any process naming the temp dir (a Ray worker in a
        group of its own), then wait until none is left: nothing of this cluster outlives it."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + KILL_DEADLINE
        while (left := self.leftovers()) and time.monotonic() < deadline:
            for line in left:
                try:
                    os.kill(int(line.split()[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for proc in self.procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def cleanup(self) -> None:
        if any(p.poll() is None for p in self.procs) or self.leftovers():
            self.stop(grace=30.0)  # a failed test: SIGKILL follows soon, so the teardown stays short
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# What the cluster saw, asked from a separate driver (this process's Ray state stays untouched).
INSPECT = textwrap.dedent(
    """
    import json, sys, ray
    from ray._private.state import actors
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    clients = [a for a in actors().values() if a.get("ActorClassName") == "ClientAppActor"]
    print(json.dumps({
        "nodes": sorted(n["NodeID"] for n in nodes),
        "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
        "actor_nodes": sorted({a["Address"]["NodeID"] for a in clients}),
        "actors": len(clients),
    }))
    ray.shutdown()
    """
)


@pytest.fixture
def ray_cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("process checks read /proc")
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    cluster = LocalRayCluster(workers=1)
    try:
        yield cluster
    finally:
        cluster.cleanup()


def test_two_rounds_on_an_existing_two_node_ray_cluster(ray_cluster, tmp_path):
    from server.simulation import simulate
    from splitmix.config import load_config

    cfg = load_config(
        None,
        {
            "ray-address": ray_cluster.address,
            "num-clients": 4,
            "num-rounds": 2,
            "local-epochs": 1,
            "adv-fraction": 0.0,
            "eval-lambdas": "0",
            "eval-pgd-steps": 0,
            "out-dir": str(tmp_path),
            "run-name": "cluster",
        },
    )
    run = simulate(cfg)
    assert run == tmp_path / "cluster"
    summary = json.loads((run / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and [r["round"] for r in rounds] == [1, 2]
    assert all(r["valid"] == 4 and r["failures"] == 0 for r in rounds)
    # the summary reports the final round's evaluation, and the clients did learn: 10 classes, chance
    # is 0.1; this config in process (InProcessGrid) reaches 0.32 at width 1.0 after 2 rounds
    assert summary["widths"]["1.0"]["accuracy"] == rounds[-1]["acc-w1.0-l0.0"] > 0.2

    # The run went to this cluster: its client actors were placed on both nodes (one CPU each).
    seen = subprocess.run(
        [sys.executable, "-c", INSPECT, ray_cluster.address],
        capture_output=True,
        text=True,
        env=ray_cluster.env,
        cwd=ROOT,
        timeout=120,
    )
    assert seen.returncode == 0, seen.stderr[-3000:]
    state = json.loads(seen.stdout.strip().splitlines()[-1])
    assert len(state["nodes"]) == 2 and state["cpus"] == 2
    assert state["actors"] == 2 and state["actor_nodes"] == state["nodes"]

    # Stopped cleanly: every process of the cluster gone after SIGTERM, nothing needed SIGKILL.
    assert ray_cluster.stop() == []
    assert all(p.returncode is not None for p in ray_cluster.procs)
    assert ray_cluster.leftovers() == []
