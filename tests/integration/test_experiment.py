"""`splitmix experiment`: comparison.json schema, per-method lr tuning on validation client
accuracy, provenance, --results, resume without redoing finished runs.

Most tests use a fake runner that writes run folders in the summary.json layout of the server
(per-width client accuracy, best-validation round, budget-respecting widths) with numbers that
are known functions of method, seed, width and lr; two slow tests run the real federation.
"""

import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from splitmix.config import ConfigError
from tools.experiment import Experiment, Tuning, load_experiment, run_experiment

TINY = {"num-clients": 4, "num-rounds": 1, "local-epochs": 1, "adv-fraction": 0.0, "eval-pgd-steps": 1, "eval-lambdas": "0", "budgets": "2-1"}
FAKE_RUN_CONFIG = {"num-clients": 8, "num-rounds": 20, "budgets": "8-4-2-1", "adv-fraction": 0.0}
WIDTHS = ("0.125", "0.25", "0.5", "1.0")
SERVED = {"splitmix": WIDTHS, "heterofl": WIDTHS, "fedbn": ("0.5", "1.0")}  # FedBN: only some widths


def peaked(lr: float) -> float:
    """Validation score of the fake runs: best at lr = 0.1."""
    return 0.9 - 0.1 * abs(math.log10(lr) - math.log10(0.1))


def rising(lr: float) -> float:
    return 0.5 + 0.1 * math.log10(lr)


# Known numbers of the fake runs (i = index of the width among all widths)
def client_best(i: int, seed: int) -> float:
    return 0.70 + 0.02 * i + 0.01 * seed + 0.005


def client_final(i: int, seed: int) -> float:
    return 0.70 + 0.02 * i + 0.01 * seed


def across_clients_std(seed: int) -> float:
    return 0.05 + 0.002 * seed


def pooled_best(i: int, seed: int) -> float:
    return client_best(i, seed) + 0.003


class FakeRunner:
    """Writes a complete run folder for each config it gets; records every config."""

    def __init__(self, val=peaked):
        self.val = val
        self.configs = []

    def __call__(self, cfg):
        self.configs.append(cfg)
        method, seed, lr = cfg.federation.method, cfg.seed, cfg.training.lr
        run = Path(cfg.system.out_dir) / cfg.system.run_name
        run.mkdir(parents=True)
        widths, best = {}, {}
        for i, w in enumerate(WIDTHS):
            if w not in SERVED[method]:
                continue
            val = {"mean": self.val(lr) + 0.001 * i, "std": 0.04, "n": 8}
            widths[w] = {
                "accuracy": client_final(i, seed) + 0.003,
                "client_accuracy": {"mean": client_final(i, seed), "std": across_clients_std(seed) + 0.01, "n": 8},
                "val_client_accuracy": val,
                "robust_accuracy": None,
                "params": 1000 * (i + 1),
                "macs": 10000 * (i + 1),
                "by_lambda": {},
            }
            best[w] = {
                "accuracy": pooled_best(i, seed),
                "client_accuracy": {"mean": client_best(i, seed), "std": across_clients_std(seed), "n": 8},
                "val_client_accuracy": val,
            }
        summary = {
            "widths": widths,
            "best": {"round": 10 + seed, "criterion": "mean over widths of validation client accuracy", "widths": best},
            "budget_respecting_widths": ["0.125"],
            "lr": lr,
        }
        (run / "summary.json").write_text(json.dumps(summary))
        rows = [{"round": r, "bytes-up": 1000 * (r + 1), "bytes-down": 2000} for r in range(2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        save_file({"w": torch.zeros(4)}, str(run / "model.safetensors"))
        return run


def quiet(_):
    return None


def tuned_experiment(**tuning):
    return Experiment(
        name="tuned",
        methods=["splitmix", "fedbn"],
        seeds=[0, 1, 2],
        run_config=FAKE_RUN_CONFIG,
        tuning=Tuning(grid=[0.01, 0.03, 0.1, 0.3, 1.0], run_config={"num-rounds": 3}, **tuning),
    )


def test_tuning_picks_the_best_validation_lr_and_the_seeds_use_it(tmp_path):
    runner = FakeRunner(peaked)
    root = run_experiment(tuned_experiment(), tmp_path, runner=runner, report=quiet)
    grid = [0.01, 0.03, 0.1, 0.3, 1.0]
    for method in ("splitmix", "fedbn"):
        mine = [c for c in runner.configs if c.federation.method == method]
        tuning, seeds = mine[:5], mine[5:]
        # tuning first, on seed max(seeds) + 1 (never a reported seed), short runs, one per grid value
        assert [c.training.lr for c in tuning] == grid
        assert {c.seed for c in tuning} == {3} and {c.federation.num_rounds for c in tuning} == {3}
        assert [c.system.run_name for c in tuning] == [f"{method}-lr{lr:g}" for lr in grid]
        assert all((root / "tuning" / c.system.run_name / "summary.json").is_file() for c in tuning)
        # then the reported seeds, full length, with the chosen lr
        assert [c.seed for c in seeds] == [0, 1, 2]
        assert {c.training.lr for c in seeds} == {0.1} and {c.federation.num_rounds for c in seeds} == {20}
    comparison = json.loads((root / "comparison.json").read_text())
    for method in ("splitmix", "fedbn"):
        t = comparison[method]["tuning"]
        assert t["grid"] == grid and t["chosen_lr"] == 0.1 and t["at_edge"] is False and t["seed"] == 3
        n_widths = len(SERVED[method])
        offset = sum(0.001 * WIDTHS.index(w) for w in SERVED[method]) / n_widths  # mean over served widths
        assert t["scores"] == pytest.approx({f"{lr:g}": peaked(lr) + offset for lr in grid})
        assert comparison[method]["lr"] == 0.1
    assert "| lr | 0.1 | 0.1 |" in (root / "comparison.md").read_text()


def test_best_lr_at_the_grid_edge_is_reported(tmp_path):
    lines = []
    root = run_experiment(tuned_experiment(), tmp_path, runner=FakeRunner(rising), report=lines.append)
    comparison = json.loads((root / "comparison.json").read_text())
    t = comparison["splitmix"]["tuning"]
    assert t["chosen_lr"] == 1.0 and t["at_edge"] is True and t["warning"] == "grid edge: widen the grid"
    warnings = [line for line in lines if "grid edge: widen the grid" in line]
    assert len(warnings) == 2 and "splitmix" in warnings[0]
    assert "| lr | 1 ‡ | 1 ‡ |" in (root / "comparison.md").read_text()


def test_per_method_grid_and_tuning_seed(tmp_path):
    experiment = tuned_experiment(seed=7, method_grids={"fedbn": [0.3, 1.0, 3.0]})
    runner = FakeRunner(peaked)
    root = run_experiment(experiment, tmp_path, runner=runner, report=quiet)
    fedbn_tuning = [c for c in runner.configs if c.federation.method == "fedbn" and c.seed == 7]
    assert [c.training.lr for c in fedbn_tuning] == [0.3, 1.0, 3.0]
    comparison = json.loads((root / "comparison.json").read_text())
    assert comparison["fedbn"]["tuning"]["chosen_lr"] == 0.3 and comparison["fedbn"]["tuning"]["at_edge"] is True
    assert comparison["splitmix"]["tuning"]["chosen_lr"] == 0.1


def test_comparison_numbers_by_hand(tmp_path):
    experiment = Experiment(name="plain", methods=["splitmix", "fedbn"], seeds=[0, 1, 2], run_config={**FAKE_RUN_CONFIG, "lr": 0.02})
    runner = FakeRunner()
    root = run_experiment(experiment, tmp_path, runner=runner, report=quiet, command="splitmix experiment plain")
    assert {c.training.lr for c in runner.configs} == {0.02} and len(runner.configs) == 6  # no [tuning]: configured lr
    comparison = json.loads((root / "comparison.json").read_text())
    assert set(comparison) == {"splitmix", "fedbn"}
    seeds = [0, 1, 2]
    for method, c in comparison.items():
        assert list(c["client_accuracy"]) == list(SERVED[method])  # missing widths are absent
        for w in SERVED[method]:
            i = WIDTHS.index(w)
            best = [client_best(i, s) for s in seeds]
            final = [client_final(i, s) for s in seeds]
            pooled = [pooled_best(i, s) for s in seeds]
            assert c["client_accuracy"][w] == pytest.approx({"mean": statistics.mean(best), "std": statistics.stdev(best), "n": 3})
            assert c["client_accuracy_final"][w] == pytest.approx({"mean": statistics.mean(final), "std": statistics.stdev(final), "n": 3})
            assert c["client_std"][w] == pytest.approx(statistics.mean(across_clients_std(s) for s in seeds))
            assert c["accuracy"][w] == pytest.approx({"mean": statistics.mean(pooled), "std": statistics.stdev(pooled), "n": 3})
            assert c["accuracy_final"][w]["mean"] == pytest.approx(statistics.mean(final) + 0.003)
            assert c["robust_accuracy"][w] is None
        assert c["best_round"] == [10, 11, 12]
        assert c["lr"] == 0.02 and "tuning" not in c
        assert c["budget_respecting_widths"] == ["0.125"]
        assert c["upload_bytes_per_round"] == 1500 and c["download_bytes_per_round"] == 2000 and c["storage_bytes"] == 16
        assert c["seeds"] == 3 and c["wall_s"] is not None
        p = c["provenance"]
        assert set(p) >= {"commit", "dirty", "versions", "machine", "date", "wall_s", "command", "run_commits"}
        assert p["command"] == "splitmix experiment plain" and p["wall_s"] > 0 and p["date"].endswith("+00:00")
        assert p["versions"]["torch"] and p["versions"]["numpy"] and p["versions"]["python"] and "flwr-datasets" in p["versions"]
        assert p["machine"]["cpu_count"] >= 1 and p["machine"]["platform"]
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        assert p["commit"] == head  # the project's own checkout (CI runs in a clone)
    assert comparison["splitmix"]["provenance"] == comparison["fedbn"]["provenance"]
    table = (root / "comparison.md").read_text()
    s = comparison["splitmix"]["client_accuracy"]["0.125"]
    assert f"| 0.125 | {s['mean']:.3f} ± {s['std']:.3f} | — |" in table  # FedBN does not serve 1/8
    assert "| 1.0 † |" in table and "| 0.125 |" in table  # widths some client's budget cannot train
    assert "| lr | 0.02 | 0.02 |" in table and "| upload MB/round |" in table
    csv = (root / "comparison.csv").read_text().splitlines()
    assert csv[0].startswith("method,width,served,budget_respecting,client_accuracy_mean,client_accuracy_std")
    assert len(csv) == 1 + 2 * 4 and any(row.startswith("fedbn,0.125,false,,,,") for row in csv)  # not served: empty cells
    assert any(row.startswith("splitmix,1.0,true,false,") for row in csv)
    for name in ("accuracy_vs_width.png", "accuracy_vs_upload.png", "experiment.json"):
        assert (root / name).stat().st_size > 0


def test_results_option_copies_the_comparison(tmp_path, monkeypatch):
    experiment = Experiment(name="copied", methods=["splitmix"], seeds=[0, 1], run_config=FAKE_RUN_CONFIG)
    root = run_experiment(experiment, tmp_path / "out", runner=FakeRunner(), report=quiet, results_dir=tmp_path / "results" / "deep")
    assert (tmp_path / "results" / "deep" / "copied.json").read_text() == (root / "comparison.json").read_text()

    # the CLI option, through `splitmix experiment` with the simulator replaced by the fake runner
    import tools.experiment
    from splitmix.cli import main

    monkeypatch.setattr(tools.experiment, "_default_runner", lambda report: FakeRunner())
    toml = tmp_path / "cli-exp.toml"
    toml.write_text(
        'name = "cli-exp"\nmethods = ["splitmix", "fedbn"]\nseeds = [0, 1]\n'
        '[run-config]\nnum-clients = 8\nbudgets = "8-4-2-1"\nadv-fraction = 0.0\n'
        "[tuning]\nlr = [0.03, 0.1, 0.3]\n"
    )
    rc = main(["experiment", str(toml), "--out-dir", str(tmp_path / "cli-out"), "--results", str(tmp_path / "res")])
    assert rc == 0
    copied = json.loads((tmp_path / "res" / "cli-exp.json").read_text())
    assert copied == json.loads((tmp_path / "cli-out" / "cli-exp" / "comparison.json").read_text())
    assert copied["splitmix"]["tuning"]["chosen_lr"] == 0.1 and copied["splitmix"]["tuning"]["seed"] == 2
    assert "--results" in copied["fedbn"]["provenance"]["command"]


def test_interrupted_tuning_resumes(tmp_path):
    runner = FakeRunner()

    def crash_on_third(cfg):
        if len(runner.configs) == 2:
            (tmp_path / "tuned" / "tuning" / cfg.system.run_name).mkdir(parents=True)  # a torn run
            raise KeyboardInterrupt
        return runner(cfg)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(tuned_experiment(), tmp_path, runner=crash_on_third, report=quiet)
    runner.configs.clear()
    run_experiment(tuned_experiment(), tmp_path, runner=runner, report=quiet)
    lrs = [(c.federation.method, c.seed, c.training.lr) for c in runner.configs]
    assert lrs[:3] == [("splitmix", 3, 0.1), ("splitmix", 3, 0.3), ("splitmix", 3, 1.0)]  # 0.01 and 0.03 were complete
    assert len(lrs) == 3 + 3 + 5 + 3


@pytest.mark.parametrize(
    ("tuning", "extra", "message"),
    [
        ("lr = [0.01, 0.1]", "", r"\[tuning\] 'lr' = \[0.01, 0.1\] must be a list of >= 3"),
        ("lr = [0.1, 0.01, 0.3]", "", r"\[tuning\] 'lr'.*strictly increasing"),
        ("lr = [0.0, 0.01, 0.3]", "", r"\[tuning\] 'lr'.*positive"),
        ('lr = "0.1"', "", r"\[tuning\] 'lr'"),
        ("lr = [0.01, 0.1, 1.0]\nrounds = 3", "", r"\[tuning\]: unknown key\(s\) \['rounds'\]"),
        ("seed = 4", "", r"\[tuning\] 'lr' \(the learning-rate grid\) is required"),
        ("lr = [0.01, 0.1, 1.0]\nseed = 1", "", r"\[tuning\] 'seed' = 1 is a reported seed"),
        ("lr = [0.01, 0.1, 1.0]\nseed = -1", "", r"\[tuning\] 'seed' = -1"),
        ("lr = [0.01, 0.1, 1.0]\n[tuning.run-config]\nlr = 0.1", "", r"\[tuning.run-config\] cannot set \['lr'\]"),
        ("lr = [0.01, 0.1, 1.0]\n[tuning.run-config]\nnum-rounds = 0", "", r"'num-rounds'"),
        ("lr = [0.01, 0.1, 1.0]", "[method.heterofl]\nlr = 0.1", r"\[method.heterofl\] 'lr' conflicts with \[tuning\]"),
        ("lr = [0.01, 0.1, 1.0]", "[method.heterofl]\nlr-grid = [0.1, 0.2]", r"\[method.heterofl\] 'lr-grid'"),
        (None, "[method.heterofl]\nlr-grid = [0.1, 0.2, 0.3]", r"\[method.heterofl\] 'lr-grid' needs a \[tuning\] table"),
    ],
)
def test_tuning_table_fails_fast(tmp_path, tuning, extra, message):
    path = tmp_path / "exp.toml"
    body = 'methods = ["splitmix", "heterofl"]\nseeds = [0, 1, 2]\n'
    body += f"[tuning]\n{tuning}\n" if tuning is not None else ""
    path.write_text(body + extra + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(str(path))
    assert "\n" not in str(info.value)


def test_tuning_table_loads(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        'methods = ["splitmix", "heterofl"]\nseeds = [0, 1, 2]\n[tuning]\nlr = [0.01, 0.03, 0.1, 0.3]\n'
        "[tuning.run-config]\nnum-rounds = 5\n[method.heterofl]\nlr-grid = [0.03, 0.1, 0.3]\n"
    )
    experiment = load_experiment(str(path))
    assert experiment.tuning_seed == 3 and experiment.lr_grid("splitmix") == [0.01, 0.03, 0.1, 0.3]
    assert experiment.lr_grid("heterofl") == [0.03, 0.1, 0.3]
    cfg = experiment.tuning_config("heterofl", 0.3, tmp_path)
    assert (cfg.training.lr, cfg.seed, cfg.federation.num_rounds, cfg.system.run_name) == (0.3, 3, 5, "heterofl-lr0.3")
    with pytest.raises(ConfigError, match="--run-config sets 'lr'"):
        experiment.check_extra({"lr": 0.1})


def test_experiment_files_fail_fast(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["splitmix", "fedprox"]\nseeds = [0]\n')
    with pytest.raises(ValueError, match="'method' = 'fedprox'"):
        load_experiment(str(bad))
    with pytest.raises(ValueError, match="no experiment 'nope'"):
        load_experiment("nope")
    shipped = load_experiment("digits-domains-comparison")
    assert len(shipped.seeds) >= 3 and {"splitmix", "heterofl"} <= set(shipped.methods)


# ------------------------------------------------------------------ the real federation (slow)
def in_process_runner(grid_factory, calls):
    from server.federation import run_federation

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
        for key in (
            "client_accuracy",
            "client_accuracy_final",
            "client_std",
            "accuracy",
            "accuracy_final",
            "robust_accuracy",
            "best_round",
            "lr",
            "budget_respecting_widths",
            "provenance",
            "upload_bytes_per_round",
            "download_bytes_per_round",
            "storage_bytes",
            "wall_s",
        ):
            assert key in result, (method, key)
        assert result["lr"] == 0.05
        for _, stats in [*result["accuracy"].items(), *result["client_accuracy"].items()]:
            assert set(stats) == {"mean", "std", "n"} and stats["n"] == 2 and 0 <= stats["mean"] <= 1
        assert set(result["client_accuracy"]) <= set(result["accuracy"])
    assert len(comparison["splitmix"]["accuracy"]) > 1 and "1.0" in comparison["splitmix"]["accuracy"]
    assert "1.0" in comparison["fedavg"]["accuracy"] and "0.125" not in comparison["fedavg"]["accuracy"]
    summary = json.loads((root / "runs" / "splitmix-seed0" / "summary.json").read_text())
    if "best" in summary:  # the server records per-client accuracy and the best-validation round
        for result in comparison.values():
            assert set(result["client_accuracy"]) == set(result["accuracy"]) and all(isinstance(r, int) for r in result["best_round"])
            assert set(result["budget_respecting_widths"]) <= set(result["accuracy"])
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


def test_cli_in_process_runner_runs_the_real_federation(tmp_path):
    """`splitmix experiment --in-process`: one run on the in-process Grid writes a full run folder
    whose summary has the run's rounds (no Ray)."""
    from splitmix.config import RunConfig
    from tools.experiment import in_process_runner as cli_runner

    cfg = RunConfig.from_mapping({**TINY, "out-dir": str(tmp_path)})
    lines: list[str] = []
    run_dir = cli_runner(lines.append)(cfg)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["best"]["round"] in range(1, cfg.federation.num_rounds + 1)
    assert any("round" in line for line in lines)
