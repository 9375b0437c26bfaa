"""`splitmix experiment`: comparison.json schema, resume without redoing finished runs."""

import json

import pytest

from server.federation import run_federation
from tools.experiment import Experiment, load_experiment, run_experiment

TINY = {"num-clients": 4, "num-rounds": 1, "local-epochs": 1, "adv-fraction": 0.0, "eval-pgd-steps": 1, "eval-lambdas": "0", "budgets": "2-1"}


def in_process_runner(grid_factory, calls):
    def run(cfg):
        calls.append((cfg.federation.method, cfg.seed))
        return run_federation(grid_factory(cfg.federation.num_clients), cfg)

    return run


@pytest.fixture
def experiment():
    return Experiment(name="tiny", methods=["splitmix", "heterofl", "fedavg"], seeds=[0, 1], run_config=TINY)


@pytest.mark.slow
def test_comparison_has_the_documented_schema(tmp_path, experiment, in_process_grid):
    calls = []
    root = run_experiment(experiment, tmp_path, runner=in_process_runner(in_process_grid, calls), report=lambda _: None)
    assert len(calls) == 6
    comparison = json.loads((root / "comparison.json").read_text())
    assert set(comparison) == {"splitmix", "heterofl", "fedavg"}
    for method, result in comparison.items():
        for key in ("accuracy", "robust_accuracy", "upload_bytes_per_round", "download_bytes_per_round", "storage_bytes", "wall_s"):
            assert key in result, (method, key)
        for _, stats in result["accuracy"].items():
            assert set(stats) == {"mean", "std", "n"} and stats["n"] == 2 and 0 <= stats["mean"] <= 1
    assert list(comparison["splitmix"]["accuracy"]) == ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875", "1.0"]
    assert list(comparison["fedavg"]["accuracy"]) == ["1.0"]  # FedAvg serves only the full width
    # Split-Mix stores 8 bases at 1/8 width: far fewer bytes than one full-width network
    assert comparison["splitmix"]["storage_bytes"] < comparison["heterofl"]["storage_bytes"] / 5
    for name in ("comparison.csv", "comparison.md", "accuracy_vs_width.png", "accuracy_vs_upload.png", "experiment.json"):
        assert (root / name).stat().st_size > 0
    assert "| upload MB/round |" in (root / "comparison.md").read_text()


@pytest.mark.slow
def test_interrupted_experiment_resumes_without_redoing_finished_runs(tmp_path, experiment, in_process_grid):
    calls = []
    runner = in_process_runner(in_process_grid, calls)

    def crash_on_third(cfg):
        if len(calls) == 2:
            (tmp_path / "tiny" / "runs" / f"{cfg.federation.method}-seed{cfg.seed}").mkdir(parents=True)  # a torn run
            raise KeyboardInterrupt
        return runner(cfg)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path, runner=crash_on_third, report=lambda _: None)
    assert calls == [("splitmix", 0), ("splitmix", 1)]
    finished = (tmp_path / "tiny" / "runs" / "splitmix-seed0" / "summary.json").read_text()

    calls.clear()
    run_experiment(experiment, tmp_path, runner=runner, report=lambda _: None)
    assert calls == [("heterofl", 0), ("heterofl", 1), ("fedavg", 0), ("fedavg", 1)]
    assert (tmp_path / "tiny" / "runs" / "splitmix-seed0" / "summary.json").read_text() == finished


def test_experiment_files_fail_fast(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["splitmix", "fedprox"]\nseeds = [0]\n')
    with pytest.raises(ValueError, match="'method' = 'fedprox'"):
        load_experiment(str(bad))
    with pytest.raises(ValueError, match="no experiment 'nope'"):
        load_experiment("nope")
    shipped = load_experiment("digits-domains-comparison")
    assert len(shipped.seeds) >= 3 and {"splitmix", "heterofl"} <= set(shipped.methods)
