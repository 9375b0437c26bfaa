"""Run folder: safetensors round trip, atomic writes, damaged checkpoints are reported."""

import pytest
import torch

from models.splitmix import SplitMixSpec, init_global_state
from server.store import RunStore, load_weights, save_weights


def test_safetensors_round_trip(tmp_path):
    state = init_global_state(SplitMixSpec(), seed=0)
    path = tmp_path / "model.safetensors"
    save_weights(path, state, {"round": "3"})
    loaded = load_weights(path)
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_damaged_checkpoint_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, {"base0.w": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="damaged"):
        load_weights(path)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "nothing.safetensors")


def test_metrics_jsonl_and_csv(tmp_path):
    store = RunStore.create(tmp_path, "r1")
    store.append_round({"round": 1, "acc": 0.5})
    store.append_round({"round": 2, "acc": 0.7, "extra": 1})
    assert [r["acc"] for r in store.rounds()] == [0.5, 0.7]
    csv_text = store.write_csv().read_text().splitlines()
    assert csv_text[0] == "acc,extra,round" and len(csv_text) == 3
