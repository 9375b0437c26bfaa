"""Client optimizer registry: ``sgd``, ``adam`` and the learned optimizers (issue 8).

``make_optimizer(name, params, lr, momentum, weight_decay, artifacts, state)`` builds what a
client recipe steps each round:

- ``sgd``: ``torch.optim.SGD(lr, momentum, weight_decay)`` (the recipes' default);
- ``adam``: ``torch.optim.Adam(lr, betas=(0.9, 0.999), weight_decay)`` (``momentum`` unused);
- ``symbolic-l2o``: the distilled closed-form rule (``techniques/l2o/symbolic.py``);
- ``lstm-l2o``: the RNNProp LSTM it was distilled from (``techniques/l2o/lstm.py``);
- ``amalgamated-l2o``: the RNNProp student amalgamated from six analytic teachers
  (``techniques/l2o/amalgamation.py``).

For the learned ones ``lr`` is the per-coordinate step bound α (θ ← θ + lr·out, |out| ≲ 1;
meta-trained at α = ``alpha`` in the artifact JSON, 0.01 by default), ``weight_decay`` is added
to the gradient (L2, as in torch's Adam) and ``momentum`` is unused (their momentum is learned).

Artifacts (model weights are never committed): a folder with ``lstm.safetensors``/``lstm.json``,
``symbolic.json`` and ``amalgamated.safetensors``/``amalgamated.json``. ``artifacts=None`` means
the per-user cache ``$SPLITMIX_L2O_DIR`` or ``~/.cache/splitmix/l2o``, subfolder ``default``;
``ensure_default_artifacts()`` meta-trains what is missing there (seeded, deterministic for a
given torch build; a few minutes on one CPU thread) under a file lock, so concurrent simulated
clients train once. ``L2OSettings.tiny()`` is the seconds-long variant tests use.

State across rounds: ``export_state`` / ``import_state`` turn an optimizer's per-parameter state
into a flat ``{"<param name>/<key>": tensor}`` dict (Flower ``ArrayRecord``-ready) and back;
by default only ``persistent_keys`` travel: moments and step counters (and the symbolic rule's
lag buffers), never the LSTM memories, which are stale after aggregation (l2o.md A3/B3).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splitmix.sections import Section, option
from techniques.base import ClientRound, RoundHooks, Technique, register_technique

if TYPE_CHECKING:
    from clients.recipe import TrainResult
    from splitmix.config import RunConfig
    from techniques.l2o.lstm import RNNPropPolicy

OPTIMIZERS = ("sgd", "adam", "symbolic-l2o", "lstm-l2o", "amalgamated-l2o")
LEARNED = ("symbolic-l2o", "lstm-l2o", "amalgamated-l2o")
ENV_DIR = "SPLITMIX_L2O_DIR"
FILES = {
    "lstm-l2o": ("lstm.safetensors", "lstm.json"),
    "symbolic-l2o": ("symbolic.json",),
    "amalgamated-l2o": ("amalgamated.safetensors", "amalgamated.json"),
}
PERSISTENT_KEYS = {"sgd": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
Reporter = Callable[[str], None]


# --------------------------------------------------------------------------- settings
def _default_lstm():
    from techniques.l2o.lstm import MetaTrainConfig

    return MetaTrainConfig()


def _default_distill():
    from techniques.l2o.symbolic import DistillConfig

    return DistillConfig()


def _default_amalgamation():
    from techniques.l2o.amalgamation import AmalgamationConfig

    return AmalgamationConfig()


@dataclass(frozen=True)
class L2OSettings:
    """Everything that decides the artifacts; stored in ``manifest.json`` beside them."""

    name: str = "default"
    lstm: Any = field(default_factory=_default_lstm)
    distill: Any = field(default_factory=_default_distill)
    amalgamation: Any = field(default_factory=_default_amalgamation)
    heldout_hidden: int = 64  # the held-out optimizee the R² traces come from

    @classmethod
    def tiny(cls) -> L2OSettings:
        """Seconds instead of minutes: for tests (the learned optimizers still descend)."""
        from techniques.l2o.amalgamation import AmalgamationConfig
        from techniques.l2o.lstm import MetaTrainConfig
        from techniques.l2o.symbolic import DistillConfig

        return cls(
            name="tiny",
            lstm=MetaTrainConfig(iterations=16, trajectory=40, unroll=10, meta_lr=3e-3),
            distill=DistillConfig(
                runs=2,
                heldout_runs=1,
                steps=60,
                coords_per_tensor=8,
                train_rows=2000,
                population=200,
                generations=4,
                fit_iterations=50,
                tune_iterations=2,
                tune_trajectory=20,
                tune_unroll=10,
                validation_seeds=1,
            ),
            amalgamation=AmalgamationConfig(
                iterations=12, trajectory=40, unroll=10, meta_lr=1e-2, hidden=8, pre=6, tune_steps=40, choice_iterations=4
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lstm": asdict(self.lstm),
            "distill": asdict(self.distill),
            "amalgamation": asdict(self.amalgamation),
            "heldout_hidden": self.heldout_hidden,
        }


def settings_named(name: str) -> L2OSettings:
    if name == "default":
        return L2OSettings()
    if name == "tiny":
        return L2OSettings.tiny()
    raise ValueError(f"unknown L2O settings '{name}'; allowed: default, tiny")


# --------------------------------------------------------------------------- artifact files
def default_artifacts_dir(settings_name: str = "default") -> Path:
    """``$SPLITMIX_L2O_DIR/<settings>`` or ``~/.cache/splitmix/l2o/<settings>``."""
    base = os.environ.get(ENV_DIR) or str(Path.home() / ".cache" / "splitmix" / "l2o")
    return Path(base).expanduser() / settings_name


def missing_artifacts(directory: str | Path) -> list[str]:
    """Learned optimizers whose files are not (all) in ``directory``."""
    directory = Path(directory)
    return [name for name, files in FILES.items() if not all((directory / f).is_file() for f in files)]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory/.lock`` (POSIX); why: Ray runs many clients at once."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_policy(policy: RNNPropPolicy, directory: Path, stem: str, meta: dict[str, Any]) -> None:
    """Weights as safetensors (config in its metadata too) plus a JSON description."""
    from safetensors.torch import save_file

    tmp = directory / f"{stem}.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(tmp), metadata={"config": json.dumps(policy.config())})
    os.replace(tmp, directory / f"{stem}.safetensors")
    write_text_atomic(directory / f"{stem}.json", json.dumps({"config": policy.config(), **meta}, indent=2, default=float))


def load_policy(directory: str | Path, stem: str):
    """An ``RNNPropPolicy`` from ``<stem>.safetensors`` (no unpickling on this path)."""
    from safetensors.torch import load_file

    from techniques.l2o.lstm import RNNPropPolicy

    directory = Path(directory)
    config = json.loads((directory / f"{stem}.json").read_text())["config"]
    policy = RNNPropPolicy(**config)
    policy.load_state_dict(load_file(str(directory / f"{stem}.safetensors")))
    return policy.eval()


@lru_cache(maxsize=16)
def _cached(directory: str, name: str, stamp: float):
    """Load once per process and file version (``stamp`` is the files' newest mtime)."""
    if name == "symbolic-l2o":
        from techniques.l2o.symbolic import SymbolicRule

        return SymbolicRule.load(Path(directory) / "symbolic.json")
    return load_policy(directory, "lstm" if name == "lstm-l2o" else "amalgamated")


def load_artifact(name: str, directory: str | Path):
    """The policy (LSTM, student) or ``SymbolicRule`` of learned optimizer ``name``."""
    directory = Path(directory)
    if name not in FILES:
        raise ValueError(f"'{name}' is not a learned optimizer; allowed: {', '.join(LEARNED)}")
    paths = [directory / f for f in FILES[name]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"learned optimizer '{name}' needs {', '.join(missing)}: "
            f"run `splitmix l2o train --out {directory}` (or pass artifacts=None for the default cache)"
        )
    return _cached(str(directory.resolve()), name, max(p.stat().st_mtime for p in paths))


# --------------------------------------------------------------------------- training
def train_artifacts(
    directory: str | Path, settings: L2OSettings | None = None, only: Iterable[str] | None = None, report: Reporter | None = None
) -> dict[str, Any]:
    """Meta-train the learned optimizers ``only`` (default: all) into ``directory``.

    Order: LSTM → symbolic rule (needs the LSTM) → amalgamated student. Returns the manifest."""
    from techniques.l2o.amalgamation import train_student
    from techniques.l2o.lstm import RNNPropPolicy, meta_train
    from techniques.l2o.symbolic import distill
    from techniques.l2o.tasks import MLPTask

    settings = settings or L2OSettings()
    say = report or (lambda _text: None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = set(only or FILES)
    unknown = wanted - set(FILES)
    if unknown:
        raise ValueError(f"unknown learned optimizer(s) {sorted(unknown)}; allowed: {', '.join(LEARNED)}")
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest |= {"settings": settings.to_dict(), "torch": torch.__version__, "python": platform.python_version()}
    seconds = manifest.setdefault("seconds", {})
    threads = torch.get_num_threads()
    manifest["threads"] = threads
    lc = settings.lstm
    task = MLPTask(hidden=lc.task_hidden, batch_size=lc.batch_size)
    heldout = MLPTask(hidden=settings.heldout_hidden, partition="heldout", batch_size=lc.batch_size)
    if "lstm-l2o" in wanted:
        start = time.perf_counter()
        torch.manual_seed(lc.seed)
        policy = RNNPropPolicy(pre=lc.pre, hidden=lc.hidden)
        say(f"meta-training the RNNProp LSTM ({lc.iterations} trajectories × {lc.trajectory} steps)")
        log = meta_train(policy, task, lc, report=say)
        seconds["lstm-l2o"] = time.perf_counter() - start
        save_policy(
            policy,
            directory,
            "lstm",
            {"kind": "lstm-l2o", "alpha": lc.alpha, "meta_train": asdict(lc), "seconds": seconds["lstm-l2o"], "skipped": log["skipped"]},
        )
    if "symbolic-l2o" in wanted:
        start = time.perf_counter()
        lstm = load_policy(directory, "lstm")
        say("distilling the LSTM into a symbolic rule")
        rule = distill(lstm, task, heldout, settings.distill, report=say)
        rule.info |= {"alpha": settings.distill.alpha, "heldout_task": asdict(heldout)}
        seconds["symbolic-l2o"] = time.perf_counter() - start
        write_text_atomic(directory / "symbolic.json", rule.to_json())
        manifest["formula"] = rule.formula()
        manifest["r2_heldout"] = rule.info.get("r2_heldout_final")
    if "amalgamated-l2o" in wanted:
        start = time.perf_counter()
        ac = settings.amalgamation
        say(f"amalgamating {len(ac.teachers)} teachers into an RNNProp student ({ac.scheme})")
        student, log = train_student(MLPTask(hidden=lc.task_hidden, batch_size=lc.batch_size), ac, report=say)
        seconds["amalgamated-l2o"] = time.perf_counter() - start
        save_policy(
            student,
            directory,
            "amalgamated",
            {
                "kind": "amalgamated-l2o",
                "alpha": ac.alpha,
                "scheme": ac.scheme,
                "teacher_lrs": log["teacher_lrs"],
                "amalgamation": asdict(ac),
                "seconds": seconds["amalgamated-l2o"],
            },
        )
    manifest["seconds_total"] = sum(seconds.values())
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, default=float))
    return manifest


def ensure_default_artifacts(directory: str | Path | None = None, settings: L2OSettings | None = None, report: Reporter | None = None) -> Path:
    """The artifact folder, meta-training whatever is missing first (once, under a file lock)."""
    settings = settings or L2OSettings()
    folder = Path(directory) if directory is not None else default_artifacts_dir(settings.name)
    if not missing_artifacts(folder):
        return folder
    with _locked(folder):
        missing = missing_artifacts(folder)  # another process may have finished meanwhile
        if missing:
            if "lstm-l2o" in missing:
                missing = sorted(set(missing) | {"symbolic-l2o"})  # the rule is distilled from this LSTM
            train_artifacts(folder, settings, missing, report)
    return folder


# --------------------------------------------------------------------------- the registry
def make_optimizer(
    name: str,
    params,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    artifacts: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """A client optimizer by name (see the module doc). ``params``: parameters or, to key
    ``state`` by module path, ``model.named_parameters()``; ``state``: from ``export_state``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; allowed: {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        from techniques.l2o.lstm import LearnedOptimizer
        from techniques.l2o.symbolic import SymbolicOptimizer

        folder = ensure_default_artifacts() if artifacts is None else Path(artifacts)
        artifact = load_artifact(name, folder)
        if name == "symbolic-l2o":
            optimizer = SymbolicOptimizer(params, artifact, lr=lr, weight_decay=weight_decay)
        else:
            optimizer = LearnedOptimizer(params, artifact, lr=lr, weight_decay=weight_decay)
    if state:
        import_state(optimizer, state)
    return optimizer


def persistent_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state worth carrying across rounds (see the module doc)."""
    keys = getattr(optimizer, "persistent_keys", None)
    if keys is not None:
        return tuple(keys)
    if isinstance(optimizer, torch.optim.SGD):
        return PERSISTENT_KEYS["sgd"]
    if isinstance(optimizer, torch.optim.Adam):
        return PERSISTENT_KEYS["adam"]
    return ()


def _named(optimizer: torch.optim.Optimizer, names: Mapping[str, torch.Tensor] | None) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs: the given mapping, the names the optimizer was built with
    (``named_parameters()``), or the position ``"<group>.<index>"``."""
    if names is not None:
        return list(names.items())
    pairs = []
    for g, group in enumerate(optimizer.param_groups):
        labels = group.get("param_names") or [f"{g}.{i}" for i in range(len(group["params"]))]
        pairs += list(zip(labels, group["params"]))
    return pairs


def export_state(
    optimizer: torch.optim.Optimizer, names: Mapping[str, torch.Tensor] | None = None, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{"<param name>/<key>": tensor}`` for the ``keys`` (default ``persistent_keys``) held."""
    wanted = tuple(keys) if keys is not None else persistent_keys(optimizer)
    out: dict[str, torch.Tensor] = {}
    for label, p in _named(optimizer, names):
        for key, value in optimizer.state.get(p, {}).items():
            if key in wanted and isinstance(value, torch.Tensor):
                out[f"{label}/{key}"] = value.detach().clone()
    return out


def import_state(optimizer: torch.optim.Optimizer, state: Mapping[str, torch.Tensor], names: Mapping[str, torch.Tensor] | None = None) -> int:
    """Load what ``export_state`` wrote; entries of unknown parameters or with a shape that no
    longer fits (the model changed) are ignored. Returns the number of parameters restored.

    Missing keys are (re)initialised on the next step (e.g. the LSTM memory)."""
    restored = 0
    for label, p in _named(optimizer, names):
        prefix = f"{label}/"
        entries = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not entries or not _fits(entries, p):
            continue
        target = optimizer.state[p]
        for key, value in entries.items():
            target[key] = value.detach().clone().to(p.device) if key != "step" else value.detach().clone().float()
        restored += 1
    return restored


def _fits(entries: Mapping[str, torch.Tensor], p: torch.Tensor) -> bool:
    """Param-shaped (torch optimizers) or one row per scalar (learned optimizers)."""
    for key, value in entries.items():
        if key == "step":
            continue
        if value.shape != p.shape and (value.dim() == 0 or value.shape[0] != p.numel()):
            return False
    return True


# --------------------------------------------------------------------------- the technique plugin
@dataclass(frozen=True)
class OptimizerSection(Section):
    optimizer: str = option("sgd", "clients' local optimizer (learned ones: docs/techniques.md)", choices=OPTIMIZERS)
    l2o_artifacts: str = option("", 'learned optimizers\' artifact folder ("" = the per-user cache)')


class _KeepOptimizerState(RoundHooks):
    """A learned optimizer's moments/step survive to the next round this client trains the same
    units (in the node's Context state)."""

    def before_training(self, rnd: ClientRound) -> None:
        from splitmix.protocol.codec import to_tensors

        self.key = "optim." + "+".join(rnd.units)
        kept = rnd.context.state.array_records.get(self.key)
        rnd.optimizer_state = to_tensors(kept) if kept is not None else None

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        from splitmix.protocol.codec import to_record

        if result.optimizer_state:
            rnd.context.state[self.key] = to_record({k: v.cpu() for k, v in result.optimizer_state.items()})


@register_technique
class LearnedOptimizer(Technique[OptimizerSection]):
    """Any optimizer but SGD (Adam, symbolic / LSTM / amalgamated L2O): the recipe builds it from
    ``LocalTrainConfig.optimizer``; this plugin keeps its state across rounds."""

    name = "optimizer"
    Config = OptimizerSection

    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        return run.techniques[cls.name].optimizer != "sgd"  # type: ignore[attr-defined]

    def stateful_reason(self, run: RunConfig) -> str | None:
        return f"optimizer = '{self.config.optimizer}' keeps each client's optimizer state in its node state"

    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        return _KeepOptimizerState()
