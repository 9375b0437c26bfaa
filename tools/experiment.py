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

Runs land in ``<out-dir>/<name>/runs/<method>-seed<seed>/`` (ordinary run folders). A run whose
``summary.json`` exists is complete and skipped, so an interrupted experiment resumes; a run
folder without it is a leftover of an interrupted run and is redone from scratch.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.store import load_weights
from splitmix.config import ConfigError, RunConfig, load_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
Runner = Callable[[RunConfig], Path]


@dataclass(frozen=True)
class Experiment:
    name: str
    methods: list[str]
    seeds: list[int]
    run_config: dict[str, Any] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def run_name(self, method: str, seed: int) -> str:
        return f"{method}-seed{seed}"

    def config_for(self, method: str, seed: int, out_dir: Path, extra: dict[str, Any] | None = None) -> RunConfig:
        overrides = self.method_overrides.get(method, {})
        values = {**self.run_config, **overrides, **(extra or {})}
        # An entry of `methods` is a method name, or a label whose [method.<label>] table names
        # the method (variants of one method, e.g. sparse training settings).
        values.update({"method": overrides.get("method", method), "seed": seed, "out-dir": str(out_dir), "run-name": self.run_name(method, seed)})
        return load_config(overrides=values)


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


def load_experiment(name_or_path: str) -> Experiment:
    path = find_experiment(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"experiment file '{path}' is not valid TOML: {err}") from None
    unknown = set(data) - {"name", "description", "methods", "seeds", "run-config", "method"}
    if unknown:
        raise ConfigError(
            f"experiment file '{path}': unknown key(s) {sorted(unknown)}; allowed: name, description, methods, seeds, run-config, method"
        )
    for key in ("methods", "seeds"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise ConfigError(f"experiment file '{path}': '{key}' must be a non-empty list")
    experiment = Experiment(
        name=str(data.get("name", path.stem)),
        methods=[str(m) for m in data["methods"]],
        seeds=[int(s) for s in data["seeds"]],
        run_config=dict(data.get("run-config", {})),
        method_overrides={str(k): dict(v) for k, v in data.get("method", {}).items()},
        description=str(data.get("description", "")),
    )
    for method in experiment.methods:  # fail fast: every run's config must validate
        for seed in experiment.seeds:
            experiment.config_for(method, seed, Path("."))
    stray = set(experiment.method_overrides) - set(experiment.methods)
    if stray:
        raise ConfigError(f"experiment file '{path}': overrides for methods not in 'methods': {sorted(stray)}")
    return experiment


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path = "experiments",
    extra: dict[str, Any] | None = None,
    runner: Runner | None = None,
    report: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) every method × seed, then write the comparison; returns the folder."""
    if runner is None:
        from server.simulation import simulate  # noqa: PLC0415 (Ray only when needed)

        def runner(cfg: RunConfig) -> Path:  # per-round progress lines of every run
            return simulate(cfg, report=lambda text: report(f"  {text}"))

    root = Path(out_dir).resolve() / experiment.name
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (root / "experiment.json").write_text(json.dumps({**asdict(experiment), "extra": extra or {}}, indent=2) + "\n")
    total = len(experiment.methods) * len(experiment.seeds)
    done = 0
    for method in experiment.methods:
        for seed in experiment.seeds:
            done += 1
            run_dir = runs / experiment.run_name(method, seed)
            if (run_dir / "summary.json").is_file():
                report(f"[{done}/{total}] {run_dir.name}: complete, skipped")
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted run: start it again
            report(f"[{done}/{total}] {run_dir.name}: running")
            start = time.perf_counter()
            runner(experiment.config_for(method, seed, runs, extra))
            (run_dir / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - start}) + "\n")
    write_comparison(root, experiment)
    return root


def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def storage_bytes(weights: Path) -> int:
    """Bytes of the tensors a method must store to serve every width it offers."""
    return sum(t.numel() * t.element_size() for t in load_weights(weights).values())


def summarize_method(run_dirs: list[Path]) -> dict[str, Any]:
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    rounds = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in run_dirs]
    widths = list(summaries[0]["widths"])
    out: dict[str, Any] = {"accuracy": {}, "robust_accuracy": {}}
    for w in widths:
        out["accuracy"][w] = _mean_std([s["widths"][w]["accuracy"] for s in summaries])
        robust = [s["widths"][w]["robust_accuracy"] for s in summaries]
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
    return out


def write_comparison(root: Path, experiment: Experiment) -> dict[str, Any]:
    from server.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_width, plot_patch_similarity

    comparison = {}
    for method in experiment.methods:
        dirs = [root / "runs" / experiment.run_name(method, s) for s in experiment.seeds]
        comparison[method] = summarize_method([d for d in dirs if (d / "summary.json").is_file()])
    (root / "comparison.json").write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
    widths = sorted({w for c in comparison.values() for w in c["accuracy"]}, key=float)
    lines = ["method,width,accuracy_mean,accuracy_std,robust_mean,robust_std,params,macs"]
    for method, c in comparison.items():
        for w in widths:
            if w in c["accuracy"]:
                acc, rob = c["accuracy"][w], c["robust_accuracy"][w] or {"mean": "", "std": ""}
                lines.append(f"{method},{w},{acc['mean']:.4f},{acc['std']:.4f},{rob['mean']},{rob['std']},{c['params'][w]},{c['macs'][w]}")
    (root / "comparison.csv").write_text("\n".join(lines) + "\n")
    (root / "comparison.md").write_text(markdown_table(comparison, widths, experiment))
    plot_accuracy_vs_width(comparison, widths, root / "accuracy_vs_width.png")
    plot_accuracy_vs_bytes(comparison, root / "accuracy_vs_upload.png")
    if any("patch_similarity" in c for c in comparison.values()):
        plot_patch_similarity(comparison, root / "patch_similarity.png")
    return comparison


def markdown_table(comparison: dict[str, Any], widths: list[str], experiment: Experiment) -> str:
    methods = list(comparison)
    head = "| width | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    rows = []
    for w in widths:
        cells = []
        for m in methods:
            acc = comparison[m]["accuracy"].get(w)
            cells.append(f"{acc['mean']:.3f} ± {acc['std']:.3f}" if acc else "—")
        rows.append(f"| {w} | " + " | ".join(cells) + " |")
    mb = lambda v: f"{v / 1e6:.2f}"  # noqa: E731
    rows.append("| upload MB/round | " + " | ".join(mb(comparison[m]["upload_bytes_per_round"]) for m in methods) + " |")
    rows.append("| download MB/round | " + " | ".join(mb(comparison[m]["download_bytes_per_round"]) for m in methods) + " |")
    rows.append("| storage MB | " + " | ".join(mb(comparison[m]["storage_bytes"]) for m in methods) + " |")
    top = widths[-1]
    if all(comparison[m]["robust_accuracy"].get(top) for m in methods):
        rows.append(f"| robust acc @{top} | " + " | ".join(f"{comparison[m]['robust_accuracy'][top]['mean']:.3f}" for m in methods) + " |")
    if any("robust_gap" in comparison[m] for m in methods):
        rows.append(
            f"| robust gap @{top} (train − test) | "
            + " | ".join(f"{comparison[m]['robust_gap']['mean']:.3f}" if "robust_gap" in comparison[m] else "—" for m in methods)
            + " |"
        )
    if any("train_flops_fraction" in comparison[m] for m in methods):
        rows.append(
            "| training FLOPs saved | "
            + " | ".join(
                f"{1 - comparison[m]['train_flops_fraction']['mean']:.0%}" if "train_flops_fraction" in comparison[m] else "0%" for m in methods
            )
            + " |"
        )
    if any("patch_similarity" in comparison[m] for m in methods):
        fmt = lambda m, i: f"{comparison[m]['patch_similarity'][i]:.3f}" if "patch_similarity" in comparison[m] else "—"  # noqa: E731
        rows.append("| patch similarity, block 1 | " + " | ".join(fmt(m, 0) for m in methods) + " |")
        rows.append("| patch similarity, last block | " + " | ".join(fmt(m, -1) for m in methods) + " |")
    rows.append("| wall s/run | " + " | ".join(f"{comparison[m]['wall_s']:.0f}" if comparison[m]["wall_s"] else "—" for m in methods) + " |")
    title = f"{experiment.name}: test accuracy (λ = 0), mean ± std over seeds {experiment.seeds}\n\n"
    return title + head + "\n".join(rows) + "\n"
