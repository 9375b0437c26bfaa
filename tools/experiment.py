"""``splitmix experiment``: run every method × seed of a named experiment on the same clients and
write the comparison up.

An experiment file (TOML, in ``configs/``) names the methods, the seeds, the run config they all
share and optional per-method overrides (e.g. a learning rate, documented in the file):

```toml
name = "digits-domains-comparison"
methods = ["splitmix", "heterofl", "sheterofl", "fedavg", "fedbn"]
seeds = [0, 1, 2]
[run-config]            # shared by every run
partition = "domains"
[method.heterofl]       # only for HeteroFL runs
lr = 0.05
```

An entry of ``methods`` may also be a label for a variant: ``methods = ["dense", "static-90"]``
with ``[method.static-90]`` holding ``method = "splitmix"`` and the variant's keys.

Per-method learning-rate tuning (optional ``[tuning]`` table):

```toml
[tuning]
lr = [0.01, 0.03, 0.1, 0.3]   # the grid, shared by every method: >= 3 increasing positive values
seed = 3                      # default max(seeds) + 1; never one of the reported seeds
[tuning.run-config]           # optional overrides for the (short) tuning runs only
num-rounds = 10
[method.fedbn]
lr-grid = [0.03, 0.1, 0.3, 1.0]   # this method's own grid instead of [tuning] lr
```

With ``[tuning]``, each method first runs one tuning run per grid value (seed ``[tuning] seed``,
run config = run-config < method overrides < tuning run-config < ``--run-config`` extras), picks
the lr with the best validation score (mean over the widths of ``summary["best"]["widths"]`` of
``val_client_accuracy.mean``: clients' validation splits, never the test splits), reports a
"grid edge: widen the grid" warning when that lr is the smallest or largest of its grid, then runs
its seeds with that lr. ``[method.<m>] lr`` and ``--run-config lr=…`` cannot be combined with
``[tuning]``. Without ``[tuning]`` every run uses the lr of its run config.

Runs land in ``<out-dir>/<name>/runs/<method>-seed<seed>/`` and tuning runs in
``<out-dir>/<name>/tuning/<method>-lr<lr>/`` (ordinary run folders). A run whose
``summary.json`` exists is complete and skipped, so an interrupted experiment resumes; a run
folder without it is a leftover of an interrupted run and is redone from scratch.

``comparison.json`` is keyed by method (entry of ``methods``); each entry holds, per width ``w``
the method serves (a width it does not serve is absent):

- ``client_accuracy[w]``: ``{"mean", "std", "n"}`` over seeds of each seed's mean client test
  accuracy (each client on its own test split, λ = 0) at that seed's round with the best
  validation client accuracy: the paper's metric and the headline; ``client_accuracy_final``: the
  same at the final round; ``client_std[w]`` / ``client_std_final[w]``: mean over seeds of the
  std across clients; ``val_client_accuracy[w]``: the validation score at the best round;
- ``accuracy[w]`` / ``accuracy_final[w]``: pooled test accuracy (all clients' test splits
  together), best-validation / final round, ``{"mean", "std", "n"}`` over seeds;
  ``robust_accuracy[w]`` (final round; ``null`` when not evaluated); ``params[w]``, ``macs[w]``;
- ``best_round`` (one per seed), ``lr`` (the chosen or configured lr), ``budget_respecting_widths``
  (widths every client's budget can train), ``upload_bytes_per_round``,
  ``download_bytes_per_round``, ``storage_bytes``, ``wall_s`` (mean per seed run), ``seeds``;
- ``tuning`` (with ``[tuning]``): ``{"grid", "seed", "run_config", "scores": {lr: validation
  score}, "chosen_lr", "at_edge"}``;
- ``provenance``: :func:`tools.provenance.provenance` of this invocation (commit, dirty, package
  versions, machine, UTC date, wall time, command) plus ``run_commits`` (the commits recorded by
  the runs, which may predate a resume); the same record in every method entry;
- when recorded: ``robust_gap``, ``train_robust_accuracy``, ``patch_similarity``,
  ``train_flops_fraction``.

``comparison.md`` (:func:`tools.results_docs.table_markdown`) and ``comparison.csv`` hold the
headline table; the plots show client accuracy where recorded. ``run_experiment(...,
results_dir=DIR)`` (``splitmix experiment NAME --results DIR``) copies ``comparison.json`` to
``DIR/<name>.json``, the file that docs tables are generated from (``python -m
tools.results_docs --update docs/results.md``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from server.store import load_weights
from splitmix.config import ConfigError, RunConfig, load_config
from tools.provenance import git_state, provenance
from tools.results_docs import table_markdown

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
Runner = Callable[[RunConfig], Path]
TUNING_KEYS = ("lr", "seed", "run-config")
FIXED_KEYS = ("lr", "seed", "method", "out-dir", "run-name")  # set by the experiment, not by [tuning.run-config]
EDGE_WARNING = "grid edge: widen the grid"


def lr_text(lr: float) -> str:
    """An lr as it appears in tuning folder names and in ``tuning.scores`` keys."""
    return f"{lr:g}"


@dataclass(frozen=True)
class Tuning:
    """The ``[tuning]`` table: an lr grid per method, run on a seed that is not reported."""

    grid: list[float]
    seed: int | None = None  # None: max(seeds) + 1
    run_config: dict[str, Any] = field(default_factory=dict)
    method_grids: dict[str, list[float]] = field(default_factory=dict)  # [method.<m>] lr-grid


@dataclass(frozen=True)
class Experiment:
    name: str
    methods: list[str]
    seeds: list[int]
    run_config: dict[str, Any] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    tuning: Tuning | None = None

    def run_name(self, method: str, seed: int) -> str:
        return f"{method}-seed{seed}"

    def _values(self, method: str, out_dir: Path, run_name: str, *layers: dict[str, Any] | None) -> dict[str, Any]:
        overrides = {k: v for k, v in self.method_overrides.get(method, {}).items() if k != "lr-grid"}
        values = {**self.run_config, **overrides}
        for layer in layers:
            values.update(layer or {})
        # An entry of `methods` is a method name, or a label whose [method.<label>] table names
        # the method (variants of one method, e.g. sparse training settings).
        values.update({"method": overrides.get("method", method), "out-dir": str(out_dir), "run-name": run_name})
        return values

    def config_for(self, method: str, seed: int, out_dir: Path, extra: dict[str, Any] | None = None, lr: float | None = None) -> RunConfig:
        """A reported run's config; ``lr`` (the tuned one) overrides every other lr."""
        values = self._values(method, out_dir, self.run_name(method, seed), extra)
        values["seed"] = seed
        if lr is not None:
            values["lr"] = lr
        return load_config(overrides=values)

    # ------------------------------------------------------------------ tuning
    @property
    def tuning_seed(self) -> int:
        if self.tuning is None:
            raise ValueError(f"experiment '{self.name}' has no [tuning] table")
        return self.tuning.seed if self.tuning.seed is not None else max(self.seeds) + 1

    def lr_grid(self, method: str) -> list[float]:
        if self.tuning is None:
            return []
        return list(self.tuning.method_grids.get(method, self.tuning.grid))

    def tuning_run_name(self, method: str, lr: float) -> str:
        return f"{method}-lr{lr_text(lr)}"

    def tuning_config(self, method: str, lr: float, out_dir: Path, extra: dict[str, Any] | None = None) -> RunConfig:
        """A tuning run's config: run-config < method overrides < [tuning.run-config] < extra; seed and lr fixed."""
        tuning_overrides = self.tuning.run_config if self.tuning else {}
        values = self._values(method, out_dir, self.tuning_run_name(method, lr), tuning_overrides, extra)
        values.update({"seed": self.tuning_seed, "lr": lr})
        return load_config(overrides=values)

    def check(self) -> None:
        """Cross-field rules of the experiment (ConfigError, one line naming the key)."""
        lr_grids = [m for m, o in self.method_overrides.items() if "lr-grid" in o]
        if self.tuning is None:
            if lr_grids:
                raise ConfigError(f"[method.{lr_grids[0]}] 'lr-grid' needs a [tuning] table")
            return
        check_grid(self.tuning.grid, "[tuning] 'lr'")
        for method, grid in self.tuning.method_grids.items():
            if method not in self.methods:
                raise ConfigError(f"[method.{method}] 'lr-grid': '{method}' is not in 'methods'")
            check_grid(grid, f"[method.{method}] 'lr-grid'")
        if self.tuning_seed in self.seeds:
            raise ConfigError(f"[tuning] 'seed' = {self.tuning_seed} is a reported seed {self.seeds}; tuning must not reuse the evaluation seeds")
        fixed = sorted(set(self.tuning.run_config) & set(FIXED_KEYS))
        if fixed:
            raise ConfigError(f"[tuning.run-config] cannot set {fixed} (the experiment sets them: lr from the grid, seed from [tuning] 'seed')")
        with_lr = [m for m, o in self.method_overrides.items() if "lr" in o]
        if with_lr:
            raise ConfigError(f"[method.{with_lr[0]}] 'lr' conflicts with [tuning]: give the method an 'lr-grid' instead")

    def check_extra(self, extra: dict[str, Any] | None, out_dir: Path = Path(".")) -> None:
        """``--run-config`` extras must leave every run's config valid (and not fight the tuning)."""
        if self.tuning is not None and extra and "lr" in extra:
            raise ConfigError("--run-config sets 'lr', but the experiment tunes lr per method ([tuning]); drop 'lr' or the [tuning] table")
        for method in self.methods:
            self.config_for(method, self.seeds[0], out_dir, extra)
            for lr in self.lr_grid(method):
                self.tuning_config(method, lr, out_dir, extra)


def check_grid(grid: Any, where: str) -> list[float]:
    ok = (
        isinstance(grid, list)
        and len(grid) >= 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in grid)
        and all(a < b for a, b in zip(grid, grid[1:]))
    )
    if not ok:
        raise ConfigError(f"{where} = {grid!r} must be a list of >= 3 strictly increasing positive learning rates (so an interior best can exist)")
    return [float(v) for v in grid]


def find_experiment(name_or_path: str) -> Path:
    """A path to a TOML file, or a name looked up in ./configs and the project's configs/."""
    candidates = [Path(name_or_path)]
    for folder in (Path("configs"), CONFIGS_DIR):
        candidates += [folder / name_or_path, folder / f"{name_or_path}.toml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml") if "methods" in p.read_text())
    raise ConfigError(f"no experiment '{name_or_path}'; known experiments: {', '.join(known) or 'none'}")


def _parse_tuning(raw: Any, overrides: dict[str, dict[str, Any]]) -> Tuning | None:
    grids = {m: check_grid(o["lr-grid"], f"[method.{m}] 'lr-grid'") for m, o in overrides.items() if "lr-grid" in o}
    if raw is None:
        if grids:
            raise ConfigError(f"[method.{next(iter(grids))}] 'lr-grid' needs a [tuning] table")
        return None
    if not isinstance(raw, dict):
        raise ConfigError("'tuning' must be a table ([tuning] with lr = [...])")
    unknown = sorted(set(raw) - set(TUNING_KEYS))
    if unknown:
        raise ConfigError(f"[tuning]: unknown key(s) {unknown}; allowed: {', '.join(TUNING_KEYS)}")
    if "lr" not in raw:
        raise ConfigError("[tuning] 'lr' (the learning-rate grid) is required")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"[tuning] 'seed' = {seed!r} must be an integer >= 0")
    run_config = raw.get("run-config", {})
    if not isinstance(run_config, dict):
        raise ConfigError("[tuning] 'run-config' must be a table of run-config keys")
    return Tuning(grid=check_grid(raw["lr"], "[tuning] 'lr'"), seed=seed, run_config=dict(run_config), method_grids=grids)


def load_experiment(name_or_path: str) -> Experiment:
    path = find_experiment(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"experiment file '{path}' is not valid TOML: {err}") from None
    allowed = ("name", "description", "methods", "seeds", "run-config", "method", "tuning")
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"experiment file '{path}': unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    for key in ("methods", "seeds"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise ConfigError(f"experiment file '{path}': '{key}' must be a non-empty list")
    overrides = {str(k): dict(v) for k, v in data.get("method", {}).items()}
    try:
        experiment = Experiment(
            name=str(data.get("name", path.stem)),
            methods=[str(m) for m in data["methods"]],
            seeds=[int(s) for s in data["seeds"]],
            run_config=dict(data.get("run-config", {})),
            method_overrides=overrides,
            description=str(data.get("description", "")),
            tuning=_parse_tuning(data.get("tuning"), overrides),
        )
        experiment.check()
    except ConfigError as err:
        raise ConfigError(f"experiment file '{path}': {err}") from None
    experiment.check_extra(None)  # fail fast: every run's config (tuning runs too) must validate
    stray = set(experiment.method_overrides) - set(experiment.methods)
    if stray:
        raise ConfigError(f"experiment file '{path}': overrides for methods not in 'methods': {sorted(stray)}")
    return experiment


# ---------------------------------------------------------------------------------- running
def validation_score(summary: dict[str, Any]) -> float | None:
    """Mean over the widths of ``summary["best"]`` of the validation client accuracy (None: not recorded)."""
    widths = (summary.get("best") or {}).get("widths") or {}
    values = [e["val_client_accuracy"]["mean"] for e in widths.values() if (e.get("val_client_accuracy") or {}).get("mean") is not None]
    return float(np.mean(values)) if values else None


def tuning_result(root: Path, experiment: Experiment, method: str) -> dict[str, Any] | None:
    """The tuning table of ``method`` from its complete tuning runs (None without [tuning])."""
    if experiment.tuning is None:
        return None
    grid = experiment.lr_grid(method)
    scores: dict[str, float | None] = {}
    for lr in grid:
        summary = root / "tuning" / experiment.tuning_run_name(method, lr) / "summary.json"
        scores[lr_text(lr)] = validation_score(json.loads(summary.read_text())) if summary.is_file() else None
    scored = [(score, i) for i, lr in enumerate(grid) if (score := scores[lr_text(lr)]) is not None and np.isfinite(score)]
    best = max(scored, key=lambda si: (si[0], -si[1]), default=None)  # ties: the smaller lr
    result: dict[str, Any] = {
        "grid": grid,
        "seed": experiment.tuning_seed,
        "run_config": dict(experiment.tuning.run_config),
        "scores": scores,
        "criterion": "mean over widths of validation client accuracy at the best round",
        "chosen_lr": None if best is None else grid[best[1]],
        "at_edge": best is not None and best[1] in (0, len(grid) - 1),
    }
    if result["at_edge"]:
        result["warning"] = EDGE_WARNING
    return result


def in_process_runner(report: Callable[[str], None]) -> Runner:
    """Runs on the in-process Grid (``server/local_grid.py``: the real ClientApp handlers, one
    client after another, no Ray); why: small runs where Ray's start-up dominates."""

    def runner(cfg: RunConfig) -> Path:
        from server.federation import run_federation  # noqa: PLC0415
        from server.local_grid import InProcessGrid  # noqa: PLC0415

        return run_federation(InProcessGrid(cfg.federation.num_clients), cfg, report=lambda text: report(f"  {text}"))

    return runner


def _default_runner(report: Callable[[str], None]) -> Runner:
    from server.simulation import simulate  # noqa: PLC0415 (Ray only when needed)

    def runner(cfg: RunConfig) -> Path:  # per-round progress lines of every run
        return simulate(cfg, report=lambda text: report(f"  {text}"))

    return runner


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path = "experiments",
    extra: dict[str, Any] | None = None,
    runner: Runner | None = None,
    report: Callable[[str], None] = print,
    results_dir: str | Path | None = None,
    command: str | None = None,
) -> Path:
    """Run (or resume) the tuning runs and every method × seed, then write the comparison (and,
    with ``results_dir``, copy comparison.json to ``results_dir/<name>.json``); returns the folder."""
    started, clock = time.time(), time.perf_counter()
    experiment.check()
    experiment.check_extra(extra)
    run = runner or _default_runner(report)
    root = Path(out_dir).resolve() / experiment.name
    runs, tuning_dir = root / "runs", root / "tuning"
    runs.mkdir(parents=True, exist_ok=True)
    (root / "experiment.json").write_text(json.dumps({**asdict(experiment), "extra": extra or {}}, indent=2) + "\n")
    total = sum(len(experiment.lr_grid(m)) for m in experiment.methods) + len(experiment.methods) * len(experiment.seeds)
    done = 0

    def run_once(run_dir: Path, make_cfg: Callable[[], RunConfig]) -> bool:
        """Run into ``run_dir`` unless complete; False when it was skipped."""
        nonlocal done
        done += 1
        label = f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent == tuning_dir else run_dir.name
        if (run_dir / "summary.json").is_file():
            report(f"[{done}/{total}] {label}: complete, skipped")
            return False
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again
        report(f"[{done}/{total}] {label}: running")
        start = time.perf_counter()
        run(make_cfg())
        (run_dir / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - start, **git_state()}) + "\n")
        return True

    lrs: dict[str, float] = {}
    for method in experiment.methods:
        lr: float | None = None
        if experiment.tuning is not None:
            for value in experiment.lr_grid(method):
                run_once(tuning_dir / experiment.tuning_run_name(method, value), partial(experiment.tuning_config, method, value, tuning_dir, extra))
            tuned = tuning_result(root, experiment, method)
            assert tuned is not None
            if tuned["chosen_lr"] is None:
                raise RuntimeError(f"tuning {method}: no tuning run recorded a validation client accuracy (summary['best']); cannot choose an lr")
            lr = float(tuned["chosen_lr"])
            report(f"tuning {method}: lr {lr_text(lr)} (validation client accuracy {tuned['scores'][lr_text(lr)]:.4f}; grid {tuned['grid']})")
            if tuned["at_edge"]:
                report(f"warning: tuning {method}: best lr {lr_text(lr)} is at an edge of the grid {tuned['grid']}: {EDGE_WARNING}")
        lrs[method] = lr if lr is not None else experiment.config_for(method, experiment.seeds[0], runs, extra).training.lr
        for seed in experiment.seeds:
            run_dir = runs / experiment.run_name(method, seed)
            if not run_once(run_dir, partial(experiment.config_for, method, seed, runs, extra, lr)):
                recorded = json.loads((run_dir / "summary.json").read_text()).get("lr")
                if recorded is not None and not np.isclose(recorded, lrs[method]):
                    report(f"warning: {run_dir.name} was run with lr {recorded:g}, not {lrs[method]:g}; delete the folder to redo it")
    record = provenance(started, time.perf_counter() - clock, command or shlex.join(sys.argv))
    write_comparison(root, experiment, record, lrs)
    if results_dir is not None:
        report(f"results: {export_results(root, experiment, results_dir)}")
    return root


def export_results(root: Path, experiment: Experiment, results_dir: str | Path) -> Path:
    """Copy ``comparison.json`` to ``results_dir/<name>.json`` (the committed result)."""
    target = Path(results_dir) / f"{experiment.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "comparison.json", target)
    return target


# ------------------------------------------------------------------------------ comparison
def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def storage_bytes(weights: Path) -> int:
    """Bytes of the tensors a method must store to serve every width it offers."""
    return sum(t.numel() * t.element_size() for t in load_weights(weights).values())


def _best_widths(summary: dict[str, Any]) -> dict[str, Any]:
    """Per-width numbers at the best-validation round (the final round when not recorded)."""
    best = summary.get("best") or {}
    return best.get("widths") or summary["widths"]


def _per_width(entries: list[dict[str, Any]], widths: list[str], get: Callable[[dict[str, Any]], Any]) -> dict[str, list[float]]:
    """For each width present in every seed's entries with a value, the values over seeds."""
    out = {}
    for w in widths:
        values = [get(e[w]) if w in e else None for e in entries]
        present = [float(v) for v in values if v is not None]
        if len(present) == len(values):
            out[w] = present
    return out


def summarize_method(run_dirs: list[Path], lr: float | None = None) -> dict[str, Any]:
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    rounds = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in run_dirs]
    widths = [w for w in summaries[0]["widths"] if all(w in s["widths"] for s in summaries)]
    final = [s["widths"] for s in summaries]
    best = [_best_widths(s) for s in summaries]
    client_mean = lambda e: (e.get("client_accuracy") or {}).get("mean")
    client_std = lambda e: (e.get("client_accuracy") or {}).get("std")
    out: dict[str, Any] = {
        "client_accuracy": {w: _mean_std(v) for w, v in _per_width(best, widths, client_mean).items()},
        "client_accuracy_final": {w: _mean_std(v) for w, v in _per_width(final, widths, client_mean).items()},
        "client_std": {w: float(np.mean(v)) for w, v in _per_width(best, widths, client_std).items()},
        "client_std_final": {w: float(np.mean(v)) for w, v in _per_width(final, widths, client_std).items()},
        "val_client_accuracy": {
            w: _mean_std(v) for w, v in _per_width(best, widths, lambda e: (e.get("val_client_accuracy") or {}).get("mean")).items()
        },
        "accuracy": {w: _mean_std(v) for w, v in _per_width(best, widths, lambda e: e.get("accuracy")).items()},
        "accuracy_final": {w: _mean_std(v) for w, v in _per_width(final, widths, lambda e: e.get("accuracy")).items()},
        "robust_accuracy": {},
        "best_round": [(s.get("best") or {}).get("round") for s in summaries],
        "lr": lr,
        "budget_respecting_widths": summaries[0].get("budget_respecting_widths"),
    }
    recorded_lrs = [s.get("lr") for s in summaries]
    if lr is None and recorded_lrs[0] is not None and all(x == recorded_lrs[0] for x in recorded_lrs):
        out["lr"] = recorded_lrs[0]
    elif any(x is not None and (out["lr"] is None or not np.isclose(x, out["lr"])) for x in recorded_lrs):
        out["lr_per_seed"] = recorded_lrs  # runs resumed from another lr: visible, not hidden
    for w in widths:
        robust = [s["widths"][w].get("robust_accuracy") for s in summaries]
        out["robust_accuracy"][w] = _mean_std(robust) if all(r is not None for r in robust) else None
    out["params"] = {w: summaries[0]["widths"][w]["params"] for w in widths}
    out["macs"] = {w: summaries[0]["widths"][w]["macs"] for w in widths}
    out["upload_bytes_per_round"] = float(np.mean([np.mean([r["bytes-up"] for r in rs]) for rs in rounds]))
    out["download_bytes_per_round"] = float(np.mean([np.mean([r["bytes-down"] for r in rs]) for rs in rounds]))
    out["storage_bytes"] = storage_bytes(run_dirs[0] / "model.safetensors")
    walls = [json.loads((d / "wall.json").read_text())["wall_s"] for d in run_dirs if (d / "wall.json").is_file()]
    out["wall_s"] = float(np.mean(walls)) if walls else None
    out["seeds"] = len(run_dirs)
    top = widths[-1]
    gaps = [s["widths"][top].get("robust_gap") for s in summaries]
    if all(g is not None for g in gaps):  # runs with eval-train-examples
        out["robust_gap"] = _mean_std(gaps)
        out["train_robust_accuracy"] = _mean_std([s["widths"][top]["train_robust_accuracy"] for s in summaries])
    if all(s.get("oversmoothing") for s in summaries):  # ViT runs: patch similarity per block
        out["patch_similarity"] = np.mean([s["oversmoothing"]["patch_similarity"] for s in summaries], axis=0).tolist()
    if all("sparse" in s for s in summaries):
        out["train_flops_fraction"] = _mean_std([s["sparse"]["train_flops_fraction"] for s in summaries])
    if all("robust_bird" in s.get("sparse", {}) for s in summaries):
        out["mask_freeze"] = mask_freeze([s["sparse"]["robust_bird"] for s in summaries])
    return out


def mask_freeze(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Robust Bird over seeds: masks (client × base) frozen per round, summed, with the median and
    quartiles of the freeze round over all freeze events, and per seed how many froze and how
    many bases were still searching in the last round."""
    counts: dict[int, int] = {}
    for record in records:
        for rnd, n in record["freeze_rounds"].items():
            counts[int(rnd)] = counts.get(int(rnd), 0) + int(n)
    events = np.repeat(sorted(counts), [counts[r] for r in sorted(counts)])
    quartiles = np.percentile(events, [25, 50, 75]).tolist() if len(events) else None
    return {
        "freeze_rounds": {str(r): counts[r] for r in sorted(counts)},
        "quartiles": quartiles,
        "frozen": [int(r["frozen"]) for r in records],
        "searching_last_round": [int(r["searching_last_round"]) for r in records],
    }


def _run_commits(dirs: list[Path]) -> list[str]:
    commits = set()
    for d in dirs:
        wall = d / "wall.json"
        if wall.is_file():
            commit = json.loads(wall.read_text()).get("commit")
            if commit:
                commits.add(str(commit))
    return sorted(commits)


def write_comparison(
    root: Path, experiment: Experiment, provenance_record: dict[str, Any] | None = None, lrs: dict[str, float] | None = None
) -> dict[str, Any]:
    from server.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_width, plot_patch_similarity

    comparison = {}
    for method in experiment.methods:
        dirs = [root / "runs" / experiment.run_name(method, s) for s in experiment.seeds]
        complete = [d for d in dirs if (d / "summary.json").is_file()]
        entry = summarize_method(complete, (lrs or {}).get(method))
        tuned = tuning_result(root, experiment, method)
        tuning_dirs = []
        if tuned is not None:
            entry["tuning"] = tuned
            tuning_dirs = [root / "tuning" / experiment.tuning_run_name(method, lr) for lr in experiment.lr_grid(method)]
        if provenance_record is not None:
            entry["provenance"] = {**provenance_record, "run_commits": _run_commits(complete + tuning_dirs)}
        comparison[method] = entry
    (root / "comparison.json").write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
    (root / "comparison.csv").write_text(comparison_csv(comparison))
    (root / "comparison.md").write_text(table_markdown(comparison, experiment.name))
    widths = sorted({w for c in comparison.values() for w in c["accuracy"]}, key=float)
    # The plots show the headline metric (client accuracy, best-validation round) where recorded.
    view = {m: {**c, "accuracy": c["client_accuracy"] or c["accuracy"]} for m, c in comparison.items()}
    plot_accuracy_vs_width(view, widths, root / "accuracy_vs_width.png")
    plot_accuracy_vs_bytes(view, root / "accuracy_vs_upload.png")
    if any("patch_similarity" in c for c in comparison.values()):
        plot_patch_similarity(comparison, root / "patch_similarity.png")
    return comparison


CSV_COLUMNS = (
    "method,width,served,budget_respecting,client_accuracy_mean,client_accuracy_std,seeds,client_std,"
    "client_accuracy_final_mean,client_accuracy_final_std,accuracy_mean,accuracy_std,accuracy_final_mean,accuracy_final_std,"
    "robust_mean,robust_std,params,macs,lr"
)


def comparison_csv(comparison: dict[str, Any]) -> str:
    """One row per method × width (every width any method serves; empty cells where not served)."""
    widths = sorted({w for c in comparison.values() for w in c["accuracy"]}, key=float)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    stats = lambda s: (fmt(s["mean"]), fmt(s["std"])) if s else ("", "")
    lines = [CSV_COLUMNS]
    for method, c in comparison.items():
        respecting = c.get("budget_respecting_widths")
        for w in widths:
            served = w in c["accuracy"]
            budget = "" if respecting is None or not served else str(w in respecting).lower()
            client = c["client_accuracy"].get(w)
            cells = [
                method,
                w,
                str(served).lower(),
                budget,
                *stats(client),
                str(client["n"]) if client else "",
                fmt(c["client_std"].get(w)),
                *stats(c["client_accuracy_final"].get(w)),
                *stats(c["accuracy"].get(w)),
                *stats(c["accuracy_final"].get(w)),
                *stats(c["robust_accuracy"].get(w)),
                fmt(c["params"].get(w)),
                fmt(c["macs"].get(w)),
                "" if c.get("lr") is None or not served else f"{c['lr']:g}",
            ]
            lines.append(",".join(cells))
    return "\n".join(lines) + "\n"
