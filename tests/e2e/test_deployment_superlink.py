"""A real deployment: flower-superlink + 3 flower-supernode processes on loopback, with generated
TLS certificates and SuperNode authentication, the app submitted with ``flwr run``.

One deployment serves the module (start-up costs ~10 s): nodes with a wrong certificate or an
unregistered key are refused; a 2-round Split-Mix run completes with metrics and a checkpoint;
a SuperNode killed mid-run does not stop a second run; nothing is left running afterwards.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deploy.certificates import generate_certificates, generate_node_keys
from deploy.local import LocalDeployment, marked_processes
from splitmix.config import RunConfig

pytestmark = pytest.mark.slow  # end-to-end: real processes (Ray, SuperLink, subprocesses)

ROOT = Path(__file__).resolve().parents[2]
NODE_CONFIGS = [
    'partition-id=0 num-partitions=3 budget="1"',
    'partition-id=1 num-partitions=3 budget="1/2"',
    'partition-id=2 num-partitions=3 budget="1/4" adversarial=true',
]
# Deadlines only bound a failure (a healthy deployment never waits for them), so they are sized
# for a machine at load 15, where starting a Python process with torch takes minutes.
START_TIMEOUT = 600.0  # SuperLink /health, every SuperNode online, a refused node's exit
RUN_TIMEOUT = 1500.0  # `flwr run` to finished:*
STOP_GRACE = 300.0  # SIGTERM → exit, before SIGKILL
FAST = {"num-clients": 3, "local-epochs": 1, "min-train-clients": 1, "eval-pgd-steps": 2, "round-timeout": 600.0}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = LocalDeployment(tmp_path_factory.mktemp("deployment"), NODE_CONFIGS, app_dir=ROOT)
    try:
        dep.start(timeout=START_TIMEOUT)
        yield dep
    finally:
        dep.stop(grace=STOP_GRACE)  # idempotent: after the teardown test it finds nothing left


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_superlink_refuses_wrong_certificate_and_unregistered_key(deployment):
    other_ca = generate_certificates(deployment.workdir / "other-ca")["ca_cert"]
    generate_node_keys(deployment.keys, ["intruder"])
    wrong_ca = deployment.start_supernode("wrong-ca", "partition-id=0", root_certificates=other_ca, key=deployment.keys / "supernode-0")
    unregistered = deployment.start_supernode("unregistered", "partition-id=0", key=deployment.keys / "intruder")
    assert wrong_ca.wait(START_TIMEOUT) != 0 and unregistered.wait(START_TIMEOUT) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (deployment.logs / "wrong-ca.log").read_text()
    assert "Failed to activate SuperNode" in (deployment.logs / "unregistered.log").read_text()
    deployment.processes.pop("wrong-ca"), deployment.processes.pop("unregistered")
    assert sorted(deployment.online_nodes()) == sorted(deployment.node_ids.values())  # still just the 3 registered nodes


def test_superlink_runs_splitmix_two_rounds(deployment):
    outcome = deployment.run({**FAST, "num-rounds": 2}, timeout=RUN_TIMEOUT)
    assert outcome.status == "finished:completed"
    rows = _rows(outcome.run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["valid"] == 3 and r["failures"] == 0 and r["rejected"] == 0 for r in rows)
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert set(summary["widths"]) == {str(k / 8) for k in range(1, 9)}  # every mix of k of the 8 bases
    assert summary["widths"]["1.0"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    config = json.loads((outcome.run_dir / "config.json").read_text())["run_config"]
    assert config["num-rounds"] == 2 and config["num-clients"] == 3
    # The checkpoint holds every base's tensors, finite, changed by training.
    cfg = RunConfig.from_mapping(config)
    method = cfg.make_method()
    initial = method.initial_state(cfg.seed)
    weights = load_file(str(outcome.run_dir / "model.safetensors"))
    assert set(weights) == set(initial)
    assert all(bool(t.isfinite().all()) for t in weights.values())
    changed = [k for k in initial if not (weights[k].float() == initial[k].float()).all()]
    assert len(changed) > len(initial) // 2


def test_superlink_run_survives_a_killed_supernode(deployment):
    victim = "supernode-2"
    run_name = "killed-node"
    round_one = deployment.workdir / "runs" / run_name / "metrics.jsonl"
    killed: list[str] = []
    finished = threading.Event()

    def kill_after_round_one() -> None:
        """Its own thread, polling every 50 ms: the kill must not wait behind a `flwr ls` status
        call (a new Python process, seconds under load), or round 2 could be done first."""
        while not finished.wait(0.05):
            if round_one.exists():
                try:
                    deployment.kill_node(victim)  # SIGKILL: no goodbye to the SuperLink
                    killed.append("killed")
                except Exception as err:  # noqa: BLE001 - reported by the assertion below
                    killed.append(f"kill failed: {err!r}")
                return

    watcher = threading.Thread(target=kill_after_round_one, daemon=True)
    watcher.start()
    try:
        outcome = deployment.run({**FAST, "num-rounds": 2, "run-name": run_name}, timeout=RUN_TIMEOUT)
    finally:
        finished.set()
        watcher.join()
    assert killed == ["killed"], "the run finished before a node could be killed" if not killed else killed
    assert outcome.status == "finished:completed"
    rows = _rows(outcome.run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["valid"] == 3 and rows[0]["failures"] == 0
    # Round 2 still sent work to the dead node (the SuperLink notices after two missed 30 s
    # heartbeats and answers for it with an error): the round completes with the two others.
    assert rows[1]["sampled"] == 3 and rows[1]["valid"] == 2 and rows[1]["failures"] == 1
    assert rows[1]["round-failed"] == 0
    victim_id = deployment.node_ids[victim]
    events = [json.loads(line) for line in (outcome.run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["round"] == 2 and f"node {victim_id}" in e["problem"] for e in events)  # named by its node id
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["failures"] == 1 and math.isfinite(summary["widths"]["1.0"]["accuracy"])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def test_deployment_teardown_leaves_no_process(deployment):
    marker = deployment.marker
    running = {pid: _cmdline(pid) for pid in marked_processes(marker)}  # to name a leftover below
    assert running  # the link and the surviving nodes are running
    leftovers = deployment.stop(grace=STOP_GRACE)
    # Flower's children exited with their parents
    assert leftovers == [], {pid: running.get(pid, "(started after the snapshot)") for pid in leftovers}
    assert marked_processes(marker) == []
