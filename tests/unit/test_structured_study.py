"""tools/structured_study.py: the generic results table from per-seed rows (no training here)."""

from __future__ import annotations

import json

import pytest

from tools.structured_study import COLUMNS, cell, table


def _row(seed: int, requested: float, ticket: float, same: float, uniform: float) -> dict:
    return {
        "seed": seed,
        "requested": requested,
        "channel_sparsity": requested,
        "kept_per_base": {},
        "dense": 0.97,
        "ticket": ticket,
        "random_same_counts": same,
        "random_uniform": uniform,
        "params_ratio": 0.1,
        "macs_ratio": 0.2,
        "speedup_eager": 1.5,
        "speedup_fused": 3.0,
    }


def test_cell_is_mean_sample_std_and_count():
    assert cell([0.9, 0.8, 0.7]) == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1), "n": 3}
    assert cell([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}


def test_table_groups_seeds_per_sparsity():
    rows = [_row(0, 0.5, 0.96, 0.95, 0.94), _row(0, 0.9, 0.80, 0.70, 0.90), _row(1, 0.5, 0.94, 0.95, 0.96), _row(1, 0.9, 0.70, 0.70, 0.80)]
    record = json.loads(json.dumps(table(rows, [0.5, 0.9], [0, 1], 0.0, 12.0, "python -m tools.structured_study")))
    assert record["kind"] == "table" and record["columns"] == COLUMNS and len(record["rows"]) == 2
    low, high = record["rows"]
    assert len(low) == len(COLUMNS)
    assert low[2] == {"mean": pytest.approx(0.95), "std": pytest.approx(0.0141421356), "n": 2}  # ticket at 0.5
    assert high[5]["mean"] == pytest.approx(0.05) and high[6]["mean"] == pytest.approx(-0.1)  # ticket − random: (0.1 + 0) / 2, (−0.1 − 0.1) / 2
    assert record["provenance"]["wall_s"] == 12.0 and record["provenance"]["command"] == "python -m tools.structured_study"
    assert "2 seeds" in record["caption"]
