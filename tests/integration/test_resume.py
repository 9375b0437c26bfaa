"""Checkpoints and ``splitmix simulate --resume`` (issue 9): a run interrupted mid-way and resumed
ends with bit-identical weights to the uninterrupted run (CPU), and a crash while a checkpoint is
being written leaves the previous one loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import InProcessGrid

import server.simulation
import server.store as store_module
from server.federation import run_federation
from server.store import CHECKPOINT, RunStore, load_checkpoint, load_weights
from splitmix.cli import main
from splitmix.config import load_config

# fraction-train < 1 and mixed budgets: the resumed run must also sample and assign bases alike
RUN = "num-clients=6 num-rounds=4 fraction-train=0.5 min-train-clients=2 local-epochs=1 pgd-steps=2 eval-pgd-steps=1 eval-lambdas='0,1'"
ROOT = Path(__file__).resolve().parents[2]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run = run_federation(InProcessGrid(6), load_config(overrides=f"{RUN} out-dir='{out}' run-name=full"))
    return run


def _resume_in_process(monkeypatch, run: Path) -> Path:
    """`splitmix simulate --resume RUN`, with the in-process grid standing in for Ray."""
    calls = []

    def fake_simulate(cfg, report=None, quiet_flower=True, resume=None):
        calls.append(resume)
        return run_federation(InProcessGrid(cfg.federation.num_clients), cfg, report, resume=resume)

    monkeypatch.setattr(server.simulation, "simulate", fake_simulate)
    assert main(["simulate", "--resume", str(run)]) == 0
    assert calls == [str(run)]
    return run


def _assert_same_final_run(run: Path, reference: Path, exact: bool = True) -> None:
    """Same weights and counts as ``reference``: bit for bit when both runs computed in this
    process (``exact``); to float32 rounding when part of ``run`` was computed by another
    process (a different process need not sum in the same order). A resume that loses any state
    (RNG, sampling, optimizer) differs by far more than that tolerance."""
    weights, expected = load_weights(run / "model.safetensors"), load_weights(reference / "model.safetensors")
    assert set(weights) == set(expected)
    for k in weights:
        if exact:
            assert torch.equal(weights[k], expected[k]), f"resumed weights differ: {k}"
        else:
            torch.testing.assert_close(weights[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"resumed weights differ: {k}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for row, ref in zip(rows, ref_rows):
        for key in ("sampled", "valid", "failures", "rejected", "bytes-down", "bytes-up", "examples"):
            assert row[key] == ref[key], (row["round"], key)
        assert row["train-loss"] == (ref["train-loss"] if exact else pytest.approx(ref["train-loss"], rel=1e-5)), row["round"]
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["communication"] == ref_summary["communication"]
    assert summary["widths"]["1.0"]["accuracy"] == ref_summary["widths"]["1.0"]["accuracy"]


def _run_until_round_two(monkeypatch, overrides: str) -> None:
    """Run in process and stop right after the round-2 checkpoint (as a crash would)."""
    real_save = RunStore.save_checkpoint

    def save_then_stop(self, weights, tensors, state):
        path = real_save(self, weights, tensors, state)
        if state["round"] == 2:
            raise Interrupted("stopped after round 2")
        return path

    monkeypatch.setattr(RunStore, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run_federation(InProcessGrid(6), load_config(overrides=overrides))
    monkeypatch.setattr(RunStore, "save_checkpoint", real_save)


@pytest.mark.slow
def test_interrupted_after_round_two_and_resumed_equals_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    _run_until_round_two(monkeypatch, f"{RUN} out-dir='{tmp_path}' run-name=cut")
    run = tmp_path / "cut"
    assert not (run / "summary.json").exists()
    assert load_checkpoint(run / CHECKPOINT)[2]["round"] == 2
    _resume_in_process(monkeypatch, run)
    _assert_same_final_run(run, uninterrupted)


# The child holds (blocked, alive) where round 3's checkpoint would be written — round 3 trained,
# its metrics row and weights on disk, the checkpoint still round 2's — and tells the test so by
# creating argv[2]. The kill then lands at one known point, whatever the machine's load.
_CHILD = """
import sys, threading
from pathlib import Path
from conftest import InProcessGrid
from server.store import RunStore
from splitmix.config import load_config
from server.federation import run_federation
save = RunStore.save_checkpoint
def save_or_hold(self, weights, tensors, state):
    if state["round"] == 3:
        Path(sys.argv[2]).touch()
        threading.Event().wait()
    return save(self, weights, tensors, state)
RunStore.save_checkpoint = save_or_hold
run_federation(InProcessGrid(6), load_config(overrides=sys.argv[1]))
"""
CHILD_DEADLINE = 1200.0  # seconds for the child to reach round 3 on a heavily loaded machine (a bound for failures only)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(uninterrupted, tmp_path, monkeypatch):
    """A real SIGKILL of a running process after round 3 trained but before its checkpoint."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    holding, log = tmp_path / "holding", tmp_path / "child.log"
    with open(log, "wb") as err:  # a file, not a pipe: a chatty child can never block on a full pipe
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, f"{RUN} out-dir='{tmp_path}' run-name=killed", str(holding)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    run = tmp_path / "killed"
    deadline = time.monotonic() + CHILD_DEADLINE
    try:
        while not holding.exists():
            assert child.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"the child did not reach round 3 in {CHILD_DEADLINE:.0f} s"
            time.sleep(0.2)
    finally:
        child.kill()  # SIGKILL
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(run / CHECKPOINT)[2]["round"] == 2 and not (run / "summary.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # round 3's row, past the checkpoint
    _resume_in_process(monkeypatch, run)
    _assert_same_final_run(run, uninterrupted, exact=False)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    weights = {"base0.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    store.save_checkpoint(weights, {"torch-rng": torch.get_rng_state()}, {"round": 1, "totals": {}})

    def torn_write(tensors, filename, metadata=None):  # half a file, then the process "dies"
        Path(filename).write_bytes(b"\x00" * 17)
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_file", torn_write)
    with pytest.raises(OSError):
        store.save_checkpoint({"base0.w": torch.zeros(2, 3)}, {}, {"round": 2, "totals": {}})
    monkeypatch.undo()

    def no_rename(src, dst):
        raise OSError("killed before rename")

    monkeypatch.setattr(store_module.os, "replace", no_rename)
    with pytest.raises(OSError):
        store.save_checkpoint({"base0.w": torch.zeros(2, 3)}, {}, {"round": 2, "totals": {}})
    monkeypatch.undo()

    loaded, tensors, state = load_checkpoint(store.root / CHECKPOINT)
    assert state["round"] == 1 and torch.equal(loaded["base0.w"], weights["base0.w"]) and "torch-rng" in tensors
    assert sorted(p.name for p in store.root.iterdir()) == [CHECKPOINT]  # no temp files left behind
    (store.root / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(store.root / CHECKPOINT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", ["sparse-method=dynamic sparsity=0.8 sparse-updates-per-round=2", "optimizer=adam lr=0.003", "method=fedbn fedavg-clients=all"]
)
def test_stateful_clients_resume_from_their_saved_node_state(variant, tmp_path, monkeypatch):
    """Sparse masks, optimizer moments and FedBN's local BN live in each node's Context; in
    simulation nodes save it per round (client-state/), so the resumed run (fresh Contexts)
    still ends with the uninterrupted run's weights."""
    overrides = f"{RUN} {variant}"
    full = run_federation(InProcessGrid(6), load_config(overrides=f"{overrides} out-dir='{tmp_path}' run-name=full"))
    assert any((full / "client-state").iterdir())
    _run_until_round_two(monkeypatch, f"{overrides} out-dir='{tmp_path}' run-name=cut")
    run = _resume_in_process(monkeypatch, tmp_path / "cut")
    weights, expected = load_weights(run / "model.safetensors"), load_weights(full / "model.safetensors")
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in weights), "resumed weights differ"


def test_resume_refuses_runs_whose_clients_keep_state(tmp_path, capsys):
    cfg = load_config(overrides=f"sparse-method=dynamic out-dir='{tmp_path}' run-name=sparse")
    run = tmp_path / "sparse"
    RunStore(run).write_json("config.json", {"run_config": cfg.to_run_config()})
    RunStore(run).save_checkpoint({"w": torch.zeros(1)}, {}, {"round": 1})
    assert main(["simulate", "--resume", str(run)]) == 2
    assert "sparse masks" in capsys.readouterr().err  # no client-state/ saved (e.g. a deployment's run)
    assert main(["simulate", "--resume", str(tmp_path / "nothing")]) == 2


def test_node_state_files_keep_what_a_resume_needs(tmp_path):
    from flwr.app import ConfigRecord, RecordDict

    from clients.node_state import load_node_state, restore_once, save_node_state

    for rnd in (1, 3, 5):
        save_node_state(tmp_path, 7, rnd, RecordDict({"sparse.base0": ConfigRecord({"masks": bytes([rnd]), "steps": rnd})}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition-7.round-3.pb", "partition-7.round-5.pb"]
    assert load_node_state(tmp_path, 7, before_round=5)["sparse.base0"]["masks"] == bytes([3])  # redoing round 5
    assert load_node_state(tmp_path, 7, before_round=6)["sparse.base0"]["steps"] == 5
    assert load_node_state(tmp_path, 8, before_round=6) is None
    state = RecordDict()
    assert restore_once(state, str(tmp_path), 7, 6) and state["sparse.base0"]["steps"] == 5
    assert not restore_once(state, str(tmp_path), 7, 7)  # once per Context
