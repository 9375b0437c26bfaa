"""The round loop with real ClientApp handlers (in-process grid): repeatability, bad replies."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from server.federation import run_federation
from server.store import load_weights
from splitmix.protocol.codec import PACKED, STYPE, to_record, unpack
from tests.unit.test_codec import rebuild

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
    """Partition 2 sends NaNs; partition 3 a corrupt packed buffer (round 1: truncated, round 2:
    an index with a duplicate key). Both are rejected and logged, the other four aggregated."""
    corrupt = [
        lambda data: data[:-1],
        lambda data: rebuild(data, lambda index: index[1].__setitem__(0, index[0][0])),
    ]

    def poison(node, reply):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        if node == 1002:
            tensors = dict(unpack(reply.content["arrays"]))
            key = next(iter(tensors))
            tensors[key] = tensors[key].copy()
            tensors[key].flat[0] = np.nan
            reply.content["arrays"] = to_record(tensors)
        elif node == 1003:
            data = corrupt.pop(0)(reply.content["arrays"][PACKED].data)
            reply.content["arrays"] = ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})
        return reply

    cfg = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=p")
    run = run_federation(in_process_grid(6, tamper=poison), cfg)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected"] for r in rounds] == [2, 2]
    assert [r["valid"] for r in rounds] == [4, 4]
    weights = load_weights(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events] == [1, 1, 2, 2]
    nan = [e["problem"] for e in events if "partition 2" in e["problem"]]
    packed = [e["problem"] for e in events if "partition 3" in e["problem"]]
    assert len(nan) == 2 and all("NaN" in p for p in nan)
    assert "malformed tensors" in packed[0] and "runs past the buffer's end (truncated)" in packed[0]
    assert "malformed tensors: duplicate key" in packed[1]


def test_the_papers_digit_model_trains_through_a_round(tmp_path, in_process_grid, tiny_config):
    """``model = "digit-cnn"`` is a registry entry like any other: bases of the paper's DigitModel
    are assigned, trained, aggregated and served at every width."""
    import json

    cfg = tiny_config(f"model=digit-cnn num-rounds=1 out-dir='{tmp_path}' run-name=digit")
    run = run_federation(in_process_grid(4), cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["widths"]) == ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875", "1.0"]
    assert summary["widths"]["1.0"]["params"] == 8 * summary["widths"]["0.125"]["params"]
