"""tools/bench_record.py: figures parsed from a benchmark's output, the record's per-run columns
and mean ± std against hand computations, and nothing written when a run fails."""

import json
import sys

import pytest

from tools.bench_record import figures, main, record
from tools.results_docs import table_markdown


def test_figures_are_the_key_number_lines():
    out = "startup: 26.4 s = 12 s until …\nstartup_s: 4.75\nratio: 1e-3\nnote: fast\neager_mix_vs_dense_throughput: 0.812\nratio: 2\n"
    assert figures(out) == {"startup_s": 4.75, "ratio": 2.0, "eager_mix_vs_dense_throughput": 0.812}


def test_record_has_a_column_per_run_and_mean_std():
    rec = record([{"a": 1.0, "b": 4.0}, {"a": 3.0}], [0.5, 7.25], "cap", ["n1"], {"commit": "x"})
    assert rec["columns"] == ["figure", "run 1", "run 2", "mean ± std"]
    a, b, load = rec["rows"]
    assert a[:3] == ["a", 1.0, 3.0] and a[3]["mean"] == 2.0 and a[3]["std"] == pytest.approx(2**0.5) and a[3]["n"] == 2
    assert b[:3] == ["b", 4.0, None] and b[3] == {"mean": 4.0, "std": 0.0, "n": 1}
    assert load[1:] == [0.5, 7.25, None]
    table = table_markdown(rec, "x")
    assert "| a | 1.000 | 3.000 | 2.000 ± 1.414 |" in table and "| b | 4.000 | — |" in table


def test_main_runs_the_command_and_writes_the_record(tmp_path):
    cmd = [sys.executable, "-c", "print('x_s: 1.5'); print('y: 2')"]
    assert main(["demo", "--runs", "2", "--caption", "c", "--results", str(tmp_path), "--", *cmd]) == 0
    rec = json.loads((tmp_path / "demo.json").read_text())
    assert [row[0] for row in rec["rows"]][:2] == ["x_s", "y"] and rec["rows"][0][1:3] == [1.5, 1.5]
    assert rec["provenance"]["command"].startswith("python -m tools.bench_record demo") and rec["provenance"]["date"]


def test_a_failing_run_writes_nothing(tmp_path):
    cmd = [sys.executable, "-c", "print('x: 1'); raise SystemExit(3)"]
    assert main(["demo", "--runs", "2", "--results", str(tmp_path), "--", *cmd]) == 1
    assert not (tmp_path / "demo.json").exists()
