"""End to end through Flower's real Simulation Engine (Ray): a 2-round run writes a full folder."""

import json

import pytest

from models.splitmix import SplitMixSpec
from server.store import load_weights

pytestmark = pytest.mark.slow  # end-to-end: real processes (Ray, SuperLink, subprocesses)


def test_two_round_simulation_writes_a_complete_run_folder(tmp_path, capsys):
    """`splitmix simulate` end to end; the last line of stdout is the run folder."""
    from splitmix.cli import main

    overrides = f"num-clients=6 num-rounds=2 local-epochs=1 pgd-steps=2 eval-pgd-steps=2 out-dir='{tmp_path}' run-name=e2e"
    assert main(["simulate", "--run-config", overrides]) == 0
    stdout = capsys.readouterr().out
    run = tmp_path / "e2e"
    assert stdout.strip().splitlines()[-1] == str(run)
    assert "client acc (λ=0)" in stdout  # the per-width table
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "model.safetensors", "summary.json", "accuracy_per_width.png", "robustness.png"):
        assert (run / name).stat().st_size > 0, name

    config = json.loads((run / "config.json").read_text())
    assert config["run_config"]["num-rounds"] == 2

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["valid"] == 6 and r["failures"] == 0 and r["bytes-up"] > 0 and r["bytes-down"] > 0 for r in rounds)

    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["widths"]) == ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875", "1.0"]
    for width, row in summary["widths"].items():  # the final round's evaluation, by all 6 clients
        assert row["client_accuracy"]["n"] == 6 and row["val_client_accuracy"]["n"] == 6
        assert row["client_accuracy"]["mean"] == rounds[-1][f"cacc-w{width}-l0.0"]
        assert row["accuracy"] == rounds[-1][f"acc-w{width}-l0.0"] and row["robust_accuracy"] is not None
        assert row["params"] > 0 and row["macs"] > 0
    assert summary["best"]["round"] in (1, 2)
    best = rounds[summary["best"]["round"] - 1]
    assert summary["best"]["score"] == best["val-score"] == max(r["val-score"] for r in rounds)
    assert summary["widths"]["1.0"]["params"] == 8 * summary["widths"]["0.125"]["params"]

    weights = load_weights(run / "model.safetensors")
    assert {k.split(".")[0] for k in weights} == {f"base{i}" for i in range(SplitMixSpec().num_bases)}
