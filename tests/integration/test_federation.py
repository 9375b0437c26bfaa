"""The round loop with real ClientApp handlers (in-process grid): repeatability, bad replies."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array

from server.federation import run_federation
from server.store import load_weights

FAST = "num-clients=6"  # on top of the shared tiny run (conftest.py)


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_run(tmp_path, in_process_grid, tiny_config):
    cfg_a = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=a")
    cfg_b = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=b")
    run_a = run_federation(in_process_grid(6), cfg_a)
    run_b = run_federation(in_process_grid(6), cfg_b)
    summary_a = json.loads((run_a / "summary.json").read_text())
    summary_b = json.loads((run_b / "summary.json").read_text())
    assert summary_a["widths"] == summary_b["widths"]
    weights_a, weights_b = load_weights(run_a / "model.safetensors"), load_weights(run_b / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_malformed_reply_is_rejected_and_the_round_goes_on(tmp_path, in_process_grid, tiny_config):
    def poison(node, reply):
        if node == 1002 and "arrays" in reply.content.array_records:  # partition 2 sends NaNs
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            arrays[key] = Array(bad)
        return reply

    cfg = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=p")
    run = run_federation(in_process_grid(6, tamper=poison), cfg)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected"] for r in rounds] == [1, 1]
    assert [r["valid"] for r in rounds] == [5, 5]
    weights = load_weights(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events] == [1, 2]
    assert all("partition 2" in e["problem"] and "NaN" in e["problem"] for e in events)


def test_the_papers_digit_model_trains_through_a_round(tmp_path, in_process_grid, tiny_config):
    """``model = "digit-cnn"`` is a registry entry like any other: bases of the paper's DigitModel
    are assigned, trained, aggregated and served at every width."""
    import json

    cfg = tiny_config(f"model=digit-cnn num-rounds=1 out-dir='{tmp_path}' run-name=digit")
    run = run_federation(in_process_grid(4), cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["widths"]) == ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875", "1.0"]
    assert summary["widths"]["1.0"]["params"] == 8 * summary["widths"]["0.125"]["params"]
