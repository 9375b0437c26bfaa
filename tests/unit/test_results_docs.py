"""Docs tables tied to committed results: ``<!-- results:NAME -->`` regions in README.md and
docs/*.md must equal the table generated from ``results/NAME.json`` (tools/results_docs.py)."""

import json
from pathlib import Path

import pytest

from tools.results_docs import check_docs, main, table_markdown, update_docs

ROOT = Path(__file__).resolve().parents[2]


def comparison_entry(means: dict[str, float], lr: float, at_edge: bool = False) -> dict:
    entry = {
        "client_accuracy": {w: {"mean": m, "std": 0.012, "n": 3} for w, m in means.items()},
        "accuracy": {w: {"mean": m + 0.01, "std": 0.01, "n": 3} for w, m in means.items()},
        "robust_accuracy": dict.fromkeys(means),
        "budget_respecting_widths": ["0.125"],
        "lr": lr,
        "upload_bytes_per_round": 1.5e6,
        "download_bytes_per_round": 2.5e6,
        "storage_bytes": 3e6,
        "wall_s": 42.0,
        "seeds": 3,
        "provenance": {"commit": "0123456789abcdef", "dirty": False, "date": "2026-01-02T03:04:05+00:00", "command": "splitmix experiment x"},
    }
    entry["tuning"] = {"grid": [0.01, 0.1, 1.0], "seed": 3, "scores": {}, "chosen_lr": lr, "at_edge": at_edge}
    return entry


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    data = {
        "splitmix": comparison_entry({"0.125": 0.8123, "0.5": 0.8456, "1.0": 0.8789}, 0.1),
        "fedbn": comparison_entry({"1.0": 0.8612}, 1.0, at_edge=True),
    }
    (folder / "demo.json").write_text(json.dumps(data))
    return folder, data


def test_table_marks_unserved_widths_budget_and_grid_edge(results):
    _, data = results
    table = table_markdown(data, "demo")
    assert "| 0.125 | 0.812 ± 0.012 | — |" in table
    assert "| 1.0 † | 0.879 ± 0.012 | 0.861 ± 0.012 |" in table
    assert "| lr | 0.1 | 1 ‡ |" in table
    assert "commit `0123456`" in table and "mean ± std over 3 seeds" in table


def test_update_then_check_is_clean_and_an_edited_number_is_reported(tmp_path, results):
    folder, _ = results
    doc = tmp_path / "doc.md"
    doc.write_text("# Results\n\nintro\n\n<!-- results:demo -->\nstale\n<!-- /results:demo -->\n\nafter\n")
    assert update_docs(doc, folder) == ["demo"]
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n\n<!-- results:demo -->\n") and text.endswith("<!-- /results:demo -->\n\nafter\n")
    assert check_docs(doc, folder) == []
    assert update_docs(doc, folder) == ["demo"] and doc.read_text() == text  # idempotent

    doc.write_text(text.replace("0.846 ± 0.012", "0.856 ± 0.012"))
    problems = check_docs(doc, folder)
    assert len(problems) == 1 and "results:demo" in problems[0] and "0.856" in problems[0] and "0.846" in problems[0]
    line = int(problems[0].split(":")[1])
    assert "0.856" in doc.read_text().splitlines()[line - 1]  # the problem names the doc's line
    assert main(["--check", str(doc), "--results", str(folder)]) == 1
    assert main(["--update", str(doc), "--results", str(folder)]) == 0
    assert check_docs(doc, folder) == []


def test_missing_json_and_unclosed_region_are_reported(tmp_path, results):
    folder, _ = results
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:nope -->\n<!-- /results:nope -->\n<!-- results:demo -->\n")
    problems = check_docs(doc, folder)
    assert any("results:nope" in p and "does not exist" in p for p in problems)
    assert any("results:demo has no closing" in p for p in problems)
    with pytest.raises(ValueError, match="no closing"):
        update_docs(doc, folder)
    doc.write_text("<!-- results:nope -->\n<!-- /results:nope -->\n")
    with pytest.raises(FileNotFoundError, match="nope"):
        update_docs(doc, folder)


def test_repository_docs_match_committed_results():
    """Every results region in README.md and docs/*.md equals its table from results/NAME.json
    (a region naming a missing JSON fails). Fix: `python -m tools.results_docs --update <doc>`."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [p for doc in docs for p in check_docs(doc, ROOT / "results")]
    assert problems == [], "\n".join(problems)


def test_generic_table_record_renders_cells_notes_and_provenance():
    record = {
        "kind": "table",
        "caption": "demo study: test accuracy, mean ± std over 3 seeds",
        "columns": ["ticket", "accuracy", "speed-up"],
        "rows": [["found", {"mean": 0.91234, "std": 0.0101, "n": 3}, 1.5], ["random", {"mean": 0.8, "std": 0.02, "n": 3}, None]],
        "notes": ["speed-up: dense / sliced CPU time"],
        "provenance": {"commit": "fedcba9876543210", "dirty": False, "date": "2026-01-02T03:04:05+00:00", "command": "python -m tools.x"},
    }
    table = table_markdown(record, "demo")
    assert table.startswith("demo study: test accuracy, mean ± std over 3 seeds\n\n| ticket | accuracy | speed-up |\n|---|---|---|\n")
    assert "| found | 0.912 ± 0.010 | 1.500 |" in table and "| random | 0.800 ± 0.020 | — |" in table
    assert "- speed-up: dense / sliced CPU time" in table and "commit `fedcba9`" in table and "`python -m tools.x`" in table


def test_mask_freeze_row_shows_the_median_round_and_counts():
    from tools.experiment import mask_freeze

    freeze = mask_freeze(
        [
            {"freeze_rounds": {"5": 2, "7": 1}, "frozen": 3, "searching_last_round": 4},
            {"freeze_rounds": {"6": 1}, "frozen": 1, "searching_last_round": 0},
        ]
    )
    assert freeze["freeze_rounds"] == {"5": 2, "6": 1, "7": 1} and freeze["quartiles"] == [5.0, 5.5, 6.25]  # events 5, 5, 6, 7
    entry = comparison_entry({"1.0": 0.5}, 0.1)
    table = table_markdown({"static": {**entry, "mask_freeze": freeze}, "dense": entry}, "demo")
    assert "| mask freeze round, median (IQR) | 5.5 (5–6.25) | — |" in table
    assert "| masks frozen / still searching | 4 / 4 | — |" in table
