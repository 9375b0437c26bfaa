"""Fault injection (issue 9): each malformed kind is rejected and logged with the client, the
aggregate equals the one of the valid replies alone, and a run with 30 % of clients failing
per round finishes with consistent metrics. Real ClientApp handlers on an in-process grid that,
like Flower, turns a ClientApp exception into an error reply and drops replies past the timeout.

The grid's clock is virtual: the ``timeout`` fault's sleep (round-timeout + 1 s) is added to it
instead of slept, and the round-timeout is the default, generous 600 s. So a reply is late
because the fault said so, never because a busy machine trained a healthy client slowly."""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter

import pytest
import torch
from conftest import InProcessGrid, client_handler
from flwr.app import Error, Message

from server.federation import run_federation
from server.store import load_weights
from strategies.base import ReplyRejected, check_magnitudes, magnitude_bound
from techniques import faults
from techniques.faults import FaultsConfig

FAST = "num-clients=6 num-rounds=1"  # on top of the shared tiny run (conftest.py)
TIMEOUT = 600.0  # round-timeout of the runs here (the default): a "timeout" fault "sleeps" TIMEOUT + 1 s


class VirtualClock:
    """Real time plus the seconds ``faults`` asked to sleep (skipped, not slept): stands in for
    the ``time`` module inside ``techniques.faults``, whose only use of it is ``time.sleep``."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def sleep(self, seconds: float) -> None:
        self.skipped += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped


class FaultyGrid(InProcessGrid):
    """InProcessGrid + what Flower's engine does with a crashing or slow ClientApp."""

    def __init__(self, num_nodes: int, drop_partition: int | None = None) -> None:
        super().__init__(num_nodes)
        self.drop_partition = drop_partition  # reference runs: this partition's reply is an error
        self.clock = VirtualClock()  # a test hands it to ``faults`` (monkeypatch) to skip the fault's sleep

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            handler = client_handler(kind)
            start = self.clock.monotonic()
            try:
                reply = handler(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - Flower: the exception becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if kind == "train" and timeout is not None and self.clock.monotonic() - start > timeout:
                continue  # late: the grid stopped waiting
            if kind == "train" and self.nodes[node] == self.drop_partition:
                reply = Message(Error(code=0, reason="left out (reference run)"), reply_to=msg)
            replies.append(reply)
        return replies


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run):
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_fault_choice_is_deterministic_and_has_the_configured_rate():
    picks = [faults.fault_for(7, r, p, 0.3, "mixed") for r in range(1, 41) for p in range(50)]
    assert picks == [faults.fault_for(7, r, p, 0.3, "mixed") for r in range(1, 41) for p in range(50)]
    rate = sum(p is not None for p in picks) / len(picks)
    assert 0.27 < rate < 0.33
    assert set(Counter(p for p in picks if p)) == set(faults.KINDS)  # "mixed" draws every kind
    assert all(faults.fault_for(7, 1, p, 1.0, "nan") == "nan" for p in range(10))
    assert all(faults.fault_for(7, 1, p, 0.0, "crash") is None for p in range(10))
    assert FaultsConfig.__dataclass_fields__["fault_kind"].metadata["choices"] == ("mixed", *faults.KINDS)  # the config's choices


def test_magnitude_bound_rejects_absurd_values_only():
    bounds = {"w": magnitude_bound(2.0)}
    check_magnitudes({"w": torch.full((3,), 50.0)}, bounds)  # a large but plausible update
    check_magnitudes({"w": (torch.ones(3, dtype=torch.bool), torch.full((3,), -2999.0))}, bounds)  # sparse pair
    with pytest.raises(ReplyRejected, match="beyond the bound"):
        check_magnitudes({"w": torch.full((3,), 2.0) * faults.SCALE}, bounds)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config):
    """One round in which partition 2's reply is simply absent (an error reply)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny_config(f"{FAST} out-dir='{out}' run-name=ref round-timeout={TIMEOUT}")
    run = run_federation(FaultyGrid(6, drop_partition=2), cfg)
    return load_weights(run / "model.safetensors"), _rows(run)[0]


# (kind, counted as, logged reason) — crash/timeout are failures (no usable reply), the rest rejected.
REASONS = {
    "missing-key": "missing 1 tensor",
    "extra-key": "unexpected 1 tensor",
    "wrong-shape": "has shape",
    "wrong-dtype": "has dtype",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "scaled": "beyond the bound",
    "crash": "crashed",
    "timeout": "did not reply in time",
}
KINDS = [(k, "rejected") for k in faults.MALFORMED] + [("crash", "failures"), ("timeout", "failures")]


@pytest.mark.parametrize("kind,counted", KINDS, ids=[*faults.MALFORMED, "crash", "timeout"])
def test_each_fault_kind_is_rejected_and_the_aggregate_is_that_of_the_valid_replies(kind, counted, reference, tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(faults, "fault_for", lambda seed, rnd, pid, fraction, k: kind if pid == 2 else None)
    cfg = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name={kind} fault-fraction=0.5 round-timeout={TIMEOUT}")
    grid = FaultyGrid(6)
    monkeypatch.setattr(faults, "time", grid.clock)  # the timeout fault's TIMEOUT + 1 s pass on the grid's clock
    run = run_federation(grid, cfg)
    row = _rows(run)[0]
    assert row["valid"] == 5 and row[counted] == 1 and row["failures"] + row["rejected"] == 1
    assert row["valid"] + row["failures"] + row["rejected"] == row["sampled"] == 6
    events = [e["problem"] for e in _events(run)]
    assert len(events) == 1
    assert "node 1002 (partition 2)" in events[0] and REASONS[kind] in events[0], events  # client and reason
    weights, ref_weights = load_weights(run / "model.safetensors"), reference[0]
    assert set(weights) == set(ref_weights)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), f"{kind}: aggregate differs"
    assert row["train-loss"] == reference[1]["train-loss"]


def test_sign_flip_is_well_formed_so_it_is_accepted(reference, tmp_path, monkeypatch, tiny_config):
    """Not detectable by validation (it is the attack robust aggregation is for)."""
    monkeypatch.setattr(faults, "fault_for", lambda seed, rnd, pid, fraction, k: "sign-flip" if pid == 2 else None)
    cfg = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=flip fault-fraction=0.5")
    run = run_federation(FaultyGrid(6), cfg)
    row = _rows(run)[0]
    assert row["valid"] == 6 and row["rejected"] == 0 and row["failures"] == 0
    weights = load_weights(run / "model.safetensors")
    assert any(not torch.equal(weights[k], reference[0][k]) for k in weights)


def test_thirty_percent_of_clients_crashing_each_round(tmp_path, tiny_config):
    cfg = tiny_config(f"num-clients=10 num-rounds=3 min-train-clients=3 fault-fraction=0.3 fault-kind=crash out-dir='{tmp_path}' run-name=drop")
    run = run_federation(FaultyGrid(10), cfg)
    rows = _rows(run)
    expected = [sum(faults.fault_for(cfg.seed, r, p, 0.3, "crash") is not None for p in range(10)) for r in (1, 2, 3)]
    assert [r["failures"] for r in rows] == expected
    assert sum(expected) > 0
    for row in rows:
        assert row["sampled"] == 10 and row["rejected"] == 0
        assert row["valid"] + row["failures"] + row["rejected"] == row["sampled"]
        assert row["round-failed"] == (1 if row["valid"] < 3 else 0)
    assert all(math.isfinite(rows[-1][k]) and 0 <= rows[-1][k] <= 1 for k in rows[-1] if k.startswith("acc-"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failures"] == sum(expected) and summary["rejected"] == 0
    with open(run / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["failures"]) for r in table] == expected and all(r["rejected"] == "0" for r in table)
    events = _events(run)
    assert len(events) == sum(expected) and all("crashed" in e["problem"] and "partition" in e["problem"] for e in events)


def test_round_below_min_train_clients_leaves_the_model_unchanged(tmp_path, tiny_config):
    cfg = tiny_config(f"num-clients=6 num-rounds=2 min-train-clients=2 fault-fraction=1.0 fault-kind=crash out-dir='{tmp_path}' run-name=all")
    grid = FaultyGrid(6)
    run = run_federation(grid, cfg)
    rows = _rows(run)
    assert [(r["valid"], r["failures"], r["round-failed"]) for r in rows] == [(0, 6, 1), (0, 6, 1)]
    weights = load_weights(run / "model.safetensors")
    initial = cfg.make_method().initial_state(cfg.seed)
    assert all(torch.equal(weights[k], initial[k]) for k in weights)
    assert any("min-train-clients" in e["problem"] for e in _events(run))
