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
the per-user cache ``$SPLITMIX_L2O_DIR`` or ``~/.cache/splitmix/l2o``, subfolder ``default``.
Clients never train artifacts: ``splitmix l2o train`` does, once. In a federation the server
puts the SHA-256 of its artifact (``artifact_digest``) into the clients' task, and every node
checks its own against it at start-up (``check_node``; the server stops the run on a mismatch
or a missing artifact) and again before each round, so every client runs the same rule.
``ensure_default_artifacts()`` (tests, tools) meta-trains what is missing in a folder under a file
lock. ``L2OSettings.tiny()`` is the seconds-long variant tests use.

State across rounds: ``export_state`` / ``import_state`` turn an optimizer's per-parameter state
into a flat ``{"<param name>/<key>": tensor}`` dict (Flower ``ArrayRecord``-ready) and back;
by default only ``persistent_keys`` travel: moments and step counters (and the symbolic rule's
lag buffers), never the LSTM memories, which are stale after aggregation (l2o.md A3/B3). The
technique keeps that state per unit (``split_state`` / ``join_state``: a Split-Mix base's slice of
every stacked tensor under its own Context record), so a client that gets the same bases in
another order, or only some of them again, gets each base's own state back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splitmix.sections import Section, option
from techniques.base import ClientRound, NodeCheckError, RoundHooks, Technique, register_technique

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


def artifact_digest(name: str, directory: str | Path) -> str:
    """SHA-256 over the files of learned optimizer ``name`` (names and bytes, in ``FILES`` order);
    why: nodes compare it with the server's so every client runs the same rule."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for fname in FILES[name]:
        path = directory / fname
        if not path.is_file():
            raise FileNotFoundError(f"learned optimizer '{name}' needs {path}: run `splitmix l2o train --out {directory}`")
        digest.update(fname.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def artifacts_folder(setting: str) -> Path:
    """The ``l2o-artifacts`` folder (``""`` = the per-user cache)."""
    return Path(setting) if setting else default_artifacts_dir()


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

        folder = default_artifacts_dir() if artifacts is None else Path(artifacts)
        artifact = load_artifact(name, folder)  # never trains: a missing artifact is an error
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


def split_state(state: Mapping[str, torch.Tensor], units: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """An exported state of a stack of ``len(units)`` units → one state per unit: every tensor's
    slice of that unit along dim 0 (stacked parameters and their param-shaped or flat per-scalar
    state are the units' chunks in order); ``step`` is copied to each."""
    out: dict[str, dict[str, torch.Tensor]] = {u: {} for u in units}
    k = len(units)
    for key, value in state.items():
        if key.endswith("/step") or value.dim() == 0:
            for u in units:
                out[u][key] = value.detach().clone()
            continue
        if value.shape[0] % k:
            raise ValueError(f"optimizer state '{key}' of shape {tuple(value.shape)} does not split into {k} units")
        for u, chunk in zip(units, value.chunk(k, dim=0)):
            out[u][key] = chunk.clone()
    return out


def join_state(kept: Mapping[str, Mapping[str, torch.Tensor] | None], units: list[str]) -> dict[str, torch.Tensor] | None:
    """Per-unit states → the state of a stack of ``units`` in this order (inverse of
    :func:`split_state`). A unit without kept state gets zeros (a fresh optimizer's moments);
    ``step`` is the largest kept one. ``None`` when no unit has state."""
    have: dict[str, Mapping[str, torch.Tensor]] = {}
    for u in units:
        value = kept.get(u)
        if value:
            have[u] = value
    if not have:
        return None
    keys = sorted(set().union(*(set(st) for st in have.values())))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [have[u].get(key) for u in units if u in have]
        like = next(p for p in parts if p is not None)
        if key.endswith("/step") or like.dim() == 0:
            out[key] = torch.stack([p.reshape(()) for p in parts if p is not None]).max()
            continue
        chunks = []
        for u in units:
            part = have[u].get(key) if u in have else None
            chunks.append(part if part is not None and part.shape == like.shape else torch.zeros_like(like))
        out[key] = torch.cat(chunks, dim=0)
    return out


def _node_check(task: Any) -> None:
    """This node's artifact is the one the server hashed (raises ``NodeCheckError`` otherwise)."""
    name, expected = task.train.optimizer, task.train.l2o_sha256
    if name not in LEARNED:
        return
    folder = artifacts_folder(task.train.l2o_artifacts)
    try:
        mine = artifact_digest(name, folder)
    except FileNotFoundError:
        raise NodeCheckError(f"learned optimizer '{name}' has no artifact in {folder} on this node: copy the server's there") from None
    if not expected:
        raise NodeCheckError(f"learned optimizer '{name}': the task carries no artifact digest (the server did not hash its artifact)")
    if mine != expected:
        raise NodeCheckError(
            f"learned optimizer '{name}': this node's artifact in {folder} (sha256 {mine[:12]}…) is not the server's ({expected[:12]}…)"
        )


class _KeepOptimizerState(RoundHooks):
    """The optimizer's moments/step survive, per unit, to the next round this client trains that
    unit (one Context record ``optim.<unit>`` each), whatever the units' order in the stack."""

    def before_training(self, rnd: ClientRound) -> None:
        from splitmix.protocol.codec import to_tensors

        _node_check(rnd.task)
        records = rnd.context.state.array_records
        kept = {u: to_tensors(records[f"optim.{u}"]) for u in rnd.units if f"optim.{u}" in records}
        rnd.optimizer_state = join_state(kept, list(rnd.units))

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        from splitmix.protocol.codec import to_record

        if result.optimizer_state:
            for unit, state in split_state({k: v.cpu() for k, v in result.optimizer_state.items()}, list(rnd.units)).items():
                rnd.context.state[f"optim.{unit}"] = to_record(state)


@register_technique
class LearnedOptimizer(Technique[OptimizerSection]):
    """Any optimizer but SGD (Adam, symbolic / LSTM / amalgamated L2O): the recipe builds it from
    ``LocalTrainConfig.optimizer``; this plugin keeps its state across rounds."""

    name = "optimizer"
    Config = OptimizerSection

    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        return run.techniques[cls.name].optimizer != "sgd"  # type: ignore[attr-defined]

    def prepare_task(self, task: Any, run: RunConfig) -> Any:
        """A learned optimizer: the digest of the server's artifact goes to every client."""
        name = self.config.optimizer
        if name not in LEARNED:
            return task
        digest = artifact_digest(name, artifacts_folder(self.config.l2o_artifacts))
        return replace(task, train=replace(task.train, l2o_sha256=digest))

    def check_node(self, task: Any) -> None:
        _node_check(task)

    def stateful_reason(self, run: RunConfig) -> str | None:
        return f"optimizer = '{self.config.optimizer}' keeps each client's optimizer state in its node state"

    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        return _KeepOptimizerState()
