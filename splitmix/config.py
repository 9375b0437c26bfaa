"""Run configuration: flat ``key = value`` pairs → validated, sectioned, frozen dataclasses.

Configuration flows one way: pyproject's ``[tool.flwr.app.config]`` (the defaults) → a
``--config`` TOML file → ``--run-config`` overrides → :class:`RunConfig`. Keys stay flat and
hyphenated everywhere (one list of keys for Flower and for ``splitmix simulate``); each key is
declared, with its allowed values and documentation, by the section that owns it:

- ``federation`` (:class:`FederationConfig`): method, clients, rounds, budgets, aggregation;
- ``data`` (:class:`DataSection`), ``model`` (:class:`ModelConfig`), ``training``
  (:class:`TrainingConfig`), ``evaluation`` (:class:`EvaluationConfig`), ``system``
  (:class:`SystemConfig`: where results go, Ray resources, devices);
- one section per technique, declared in the technique's module (``techniques/``) and collected
  from the technique registry: ``cfg.techniques["flying-bird"]``.

Each section validates its own fields on construction; checks between sections run in
:meth:`RunConfig.__post_init__` and in each technique's ``check``. Invalid input fails fast with
one line naming the key, the value and what is allowed. pyproject's defaults are checked against
the dataclasses by a test, and ``docs/configuration.md``'s key table is generated from them
(``python -m splitmix.config --markdown``).
"""

from __future__ import annotations

import json
import shlex
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import techniques  # noqa: F401  (registers every technique and its config section)
from models.registry import list_models
from models.splitmix import SplitMixSpec
from splitmix.adversarial import PGDConfig
from splitmix.data import DATASETS, PARTITIONS, DataConfig
from splitmix.profiles import parse_budgets
from splitmix.sections import ConfigError, Section, allowed_text, coerce, option, section_fields
from strategies.aggregation import AGGREGATORS
from strategies.registry import METHODS
from techniques.base import SECTIONS, TECHNIQUES, Technique

if TYPE_CHECKING:
    from splitmix.protocol.task import ClientTask
    from strategies.registry import Method

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_overrides"]

# Upper bounds of integer keys: far above any real run (the paper's runs have 50-100 clients and
# a few hundred rounds), low enough to catch a typed extra zero or a mistyped exponent.
MAX_COUNT = 100_000  # rounds, evaluation intervals, clients evaluated
MAX_CLIENTS = 1_000_000  # the largest populations simulated in the literature (FedScale, pfl-research)
MAX_STEPS = 1000  # PGD steps


@dataclass(frozen=True)
class FederationConfig(Section):
    method: str = option("splitmix", "federated method (docs/methods.md)", choices=tuple(METHODS))
    fedavg_clients: str = option(
        "capable",
        "FedAvg/FedBN: each width model trained by the clients that afford it (`capable`, as in the paper), or by `all` (budget-violating)",
        choices=("capable", "all"),
    )
    seed: int = option(0, "seed of everything (same config and seed: same weights)", lo=0, hi=2**31 - 1)
    num_clients: int = option(50, "number of clients (virtual SuperNodes)", lo=1, hi=MAX_CLIENTS)
    fraction_train: float = option(1.0, "share of clients sampled each round", lo=0, hi=1, lo_open=True)
    min_train_clients: int = option(2, "fewest valid replies for a round to update the model", lo=1, hi=MAX_COUNT)
    num_rounds: int = option(40, "federated rounds", lo=1, hi=MAX_COUNT)
    rewind_round: int = option(
        2, "keep the served weights after this round as `rewind.safetensors`: `splitmix prune`'s IMP rewinds to them (0 = none)", lo=0, hi=MAX_COUNT
    )
    budgets: str = option("8-4-2-1", "budget levels (N = width 1/N, `NdM` = M/N) over equal contiguous client groups")
    adv_fraction: float = option(0.5, "share of clients that train adversarially (PGD)", lo=0, hi=1)
    round_timeout: float = option(600.0, "seconds a round waits for replies", lo=0, lo_open=True)
    client_wait: float = option(300.0, "start-up deadline: seconds to wait for nodes to connect and answer first", lo=0)
    aggregation: str = option("mean", "reducer of the aggregation kernel (strategies/aggregation.py)", choices=AGGREGATORS)
    trim_fraction: float = option(0.1, "trimmed mean: share cut from each end", lo=0, hi=0.5, hi_open=True)

    def validate(self) -> None:
        if self.min_train_clients > self.num_clients:
            raise ConfigError(f"config key 'min-train-clients' = {self.min_train_clients} exceeds num-clients = {self.num_clients}")
        try:
            parse_budgets(self.budgets)
        except ValueError as err:
            raise ConfigError(f"config key 'budgets' = {err}") from None


@dataclass(frozen=True)
class DataSection(Section):
    dataset: str = option("digits", "`digits` is embedded; the others are read from data-root", choices=tuple(DATASETS))
    data_root: str = option("", "folder of a non-embedded data set (see `download`)")
    download: bool = option(False, "fetch `mnist`, `svhn` or `cifar10` into data-root with torchvision if missing (needs internet)")
    partition: str = option("iid", "how training data is split over clients", choices=tuple(PARTITIONS))
    dirichlet_alpha: float = option(0.5, "concentration of the Dirichlet label partition", lo=0, lo_open=True)
    val_ratio: float = option(
        0.2,
        "fraction of each client's training share held out as its validation split (checkpoint and learning-rate selection)",
        lo=0,
        hi=1,
        hi_open=True,
    )

    def validate(self) -> None:
        from splitmix.data import DOWNLOADABLE

        if not self.download:
            return
        if self.dataset not in DOWNLOADABLE:
            how = "its domains are placed in data-root by hand" if self.dataset == "digits5" else "it is embedded"
            allowed = ", ".join(DOWNLOADABLE)
            raise ConfigError(f"config key 'download' = true with dataset '{self.dataset}': {how}; download = true is allowed with dataset {allowed}")
        if not self.data_root:
            raise ConfigError("config key 'download' = true needs data-root: the folder to download into")


@dataclass(frozen=True)
class ModelConfig(Section):
    model: str = option("cnn", "model family (models/registry.py)", choices=tuple(list_models()))
    atom_width: float = option(0.125, "width of one base r (N = 1/r bases)", lo=0, hi=1, lo_open=True)
    bn_stats: str = option(
        "tracked",
        "Split-Mix and FedAvg: `tracked` running BN statistics, or `static` (none in training; gathered from the clients' "
        "training data before evaluation). HeteroFL/SHeteroFL are always static, FedBN always tracked",
        choices=("tracked", "static"),
    )
    vit_depth: int = option(4, "ViT: transformer blocks", lo=1, hi=256)
    vit_dim: int = option(256, "ViT: embedding width at width 1", lo=1, hi=65536)
    vit_heads: int = option(32, "ViT: attention heads at width 1", lo=1, hi=4096)
    vit_patch: int = option(0, "ViT: patch size (0 = automatic)", lo=0, hi=1024)
    vit_mlp_ratio: float = option(2.0, "ViT: MLP hidden width / embedding width", lo=0, lo_open=True)

    def validate(self) -> None:
        try:
            SplitMixSpec(atom_width=self.atom_width)
        except ValueError as err:
            raise ConfigError(f"config key 'atom-width' = {self.atom_width}: {err}") from None

    @property
    def is_vit(self) -> bool:
        return self.model.startswith("vit")


@dataclass(frozen=True)
class TrainingConfig(Section):
    local_epochs: int = option(2, "local epochs per round", lo=1, hi=1000)
    batch_size: int = option(32, "local batch size", lo=2, hi=65536)
    lr: float = option(0.05, "learning rate", lo=0, lo_open=True)
    lr_schedule: str = option("cosine", "learning rate over rounds", choices=("cosine", "constant"))
    masked_loss: bool = option(False, "HeteroFL's masked cross-entropy: logits of classes absent from a client's data set to 0 in its loss")
    momentum: float = option(0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    weight_decay: float = option(0.0005, "weight decay", lo=0)
    adv_lambda: float = option(0.5, "adversarial clients' loss (1−λ)·clean + λ·adversarial", lo=0, hi=1)
    pgd_eps: float = option(0.1, "PGD L∞ radius in training", lo=0)
    pgd_alpha: float = option(0.036, "PGD step size", lo=0, lo_open=True)
    pgd_steps: int = option(7, "PGD steps in training", lo=1, hi=MAX_STEPS)


@dataclass(frozen=True)
class EvaluationConfig(Section):
    eval_lambdas: str = option("0,0.5,1", "robustness levels λ evaluated (must include 0)")
    eval_every: int = option(1, "clean evaluation every N rounds (and the last)", lo=1, hi=MAX_COUNT)
    eval_robust_every: int = option(0, "PGD evaluation every N rounds (0 = final round only)", lo=0, hi=MAX_COUNT)
    eval_pgd_steps: int = option(10, "PGD steps in evaluation (0 = no robust evaluation)", lo=0, hi=MAX_STEPS)
    eval_train_examples: int = option(0, "training examples also evaluated (robust generalisation gap)", lo=0, hi=10**7)
    eval_clients: int = option(0, "clients that evaluate (a seeded sample fixed for the run; 0 = every client)", lo=0, hi=MAX_COUNT)

    def validate(self) -> None:
        if 0.0 not in self.lambdas:
            raise ConfigError(f"config key 'eval-lambdas' = '{self.eval_lambdas}' must include 0 (the standard model)")

    @property
    def lambdas(self) -> list[float]:
        try:
            values = sorted({float(v) for v in self.eval_lambdas.split(",") if v.strip()})
        except ValueError:
            raise ConfigError(f"config key 'eval-lambdas' = '{self.eval_lambdas}' must be comma-separated numbers in [0, 1]") from None
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"config key 'eval-lambdas' = '{self.eval_lambdas}' must be numbers in [0, 1]")
        return values


@dataclass(frozen=True)
class SystemConfig(Section):
    out_dir: str = option("runs", "folder of run folders")
    run_name: str = option("", "run folder name (default: a timestamp)")
    client_num_cpus: float = option(1.0, "Ray CPUs per virtual client (→ number of actors)", lo=0, lo_open=True)
    client_num_gpus: float = option(0.0, "Ray GPUs per virtual client", lo=0)
    torch_threads: int = option(1, "torch threads per actor", lo=1, hi=1024)
    device: str = option("auto", "`auto` uses CUDA when present", choices=("auto", "cpu", "cuda"))
    ray_address: str = option("", "join this Ray cluster instead of starting one")


CORE_SECTIONS: dict[str, type[Section]] = {
    "federation": FederationConfig,
    "data": DataSection,
    "model": ModelConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "system": SystemConfig,
}


def all_sections() -> dict[str, type[Section]]:
    """Core sections, then technique sections in registration order."""
    return {**CORE_SECTIONS, **SECTIONS}


def key_index() -> dict[str, tuple[str, str, Any]]:
    """``run-config key -> (section, field name, field)``; a key declared twice is a bug."""
    index: dict[str, tuple[str, str, Any]] = {}
    for section, cls in all_sections().items():
        for key, f in section_fields(cls):
            if key in index:
                raise RuntimeError(f"config key '{key}' is declared by sections '{index[key][0]}' and '{section}'")
            index[key] = (section, f.name, f)
    return index


def _technique_defaults() -> Mapping[str, Section]:
    return MappingProxyType({name: cls() for name, cls in SECTIONS.items()})


@dataclass(frozen=True)
class RunConfig:
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataSection = field(default_factory=DataSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    techniques: Mapping[str, Section] = field(default_factory=_technique_defaults)

    def __post_init__(self) -> None:
        widths = parse_budgets(self.federation.budgets)
        too_small = [w for w in widths if w + 1e-9 < self.model.atom_width]
        if too_small:
            raise ConfigError(
                f"config key 'budgets' = '{self.federation.budgets}' has widths {too_small} below the atom "
                f"width {self.model.atom_width}; every budget must afford at least one base"
            )
        if self.data.partition == "domains" and self.federation.num_clients < 5:
            raise ConfigError(f"config key 'num-clients' = {self.federation.num_clients}: the 'domains' partition needs at least 5")
        self._check_vit()
        for cls in TECHNIQUES.values():
            cls.check(self)

    def _check_vit(self) -> None:
        """ViT topology keys must describe a buildable model at every width."""
        m = self.model
        if not m.is_vit:
            return
        if m.vit_dim % m.vit_heads:
            raise ConfigError(f"config key 'vit-dim' = {m.vit_dim} must be a multiple of vit-heads = {m.vit_heads}")
        heads_at_atom = m.vit_heads * m.atom_width
        if heads_at_atom < 1 or abs(heads_at_atom - round(heads_at_atom)) > 1e-6:
            raise ConfigError(
                f"config key 'vit-heads' = {m.vit_heads}: every base (atom width {m.atom_width}) needs a whole "
                f"number of heads (vit-heads × atom-width = {heads_at_atom:g}); use a multiple of {round(1 / m.atom_width)}"
            )
        image = DATASETS[self.data.dataset].image_size
        if m.vit_patch and image % m.vit_patch:
            raise ConfigError(f"config key 'vit-patch' = {m.vit_patch} must divide the image size {image} of '{self.data.dataset}' (0 = automatic)")

    # ------------------------------------------------------------------ derived views
    @property
    def seed(self) -> int:
        return self.federation.seed

    @property
    def lambdas(self) -> list[float]:
        return self.evaluation.lambdas

    def active_techniques(self) -> list[Technique]:
        """The techniques this run uses, in registration order, with their sections."""
        return [cls(self.techniques.get(name)) for name, cls in TECHNIQUES.items() if cls.enabled(self)]

    def model_options(self) -> str:
        """The model family's extra keywords as canonical JSON (ViT topology; empty otherwise)."""
        m = self.model
        if not m.is_vit:
            return ""
        options: dict[str, Any] = {"depth": m.vit_depth, "embed_dim": m.vit_dim, "num_heads": m.vit_heads, "mlp_ratio": m.vit_mlp_ratio}
        if m.vit_patch:
            options["patch_size"] = m.vit_patch
        return json.dumps(options, sort_keys=True)

    def spec(self) -> SplitMixSpec:
        info = DATASETS[self.data.dataset]
        return SplitMixSpec(
            arch=self.model.model,
            atom_width=self.model.atom_width,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
            dual_bn=True,
            track_stats=self.model.bn_stats == "tracked",
            model_options=self.model_options(),
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            dataset=self.data.dataset,
            root=self.data.data_root,
            partition=self.data.partition,
            num_partitions=self.federation.num_clients,
            alpha=self.data.dirichlet_alpha,
            seed=self.federation.seed,
            download=self.data.download,
            val_ratio=self.data.val_ratio,
        )

    def pgd(self, steps: int | None = None) -> PGDConfig:
        t = self.training
        return PGDConfig(eps=t.pgd_eps, alpha=t.pgd_alpha, steps=steps or t.pgd_steps)

    def make_method(self) -> Method:
        from strategies.registry import make_method

        return make_method(
            self.federation.method,
            self.spec(),
            fedavg_all_clients=self.federation.fedavg_clients == "all",
            budgets=parse_budgets(self.federation.budgets),
        )

    def client_task(self, spec: SplitMixSpec | None = None) -> ClientTask:
        """What clients are told; ``spec`` is the method's model spec (e.g. static BN)."""
        from splitmix.protocol.task import ClientTask

        return ClientTask.from_run(self, spec or self.spec())

    def to_run_config(self) -> dict[str, Any]:
        """Back to flat hyphenated keys (what is written to the run folder)."""
        out: dict[str, Any] = {}
        for section in (self.federation, self.data, self.model, self.training, self.evaluation, self.system, *self.techniques.values()):
            out.update(section.to_run_config())
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Validate flat ``key: value`` pairs (hyphenated keys, as in pyproject)."""
        index = key_index()
        values: dict[str, dict[str, Any]] = {name: {} for name in all_sections()}
        for key, value in mapping.items():
            if key not in index:
                raise ConfigError(f"unknown config key '{key}'; allowed keys: {', '.join(sorted(index))}")
            section, name, f = index[key]
            values[section][name] = coerce(f, value)
        built = {name: sec(**values[name]) for name, sec in all_sections().items()}
        core = {name: built.pop(name) for name in CORE_SECTIONS}
        return cls(**core, techniques=MappingProxyType(built))  # type: ignore[arg-type]


def parse_overrides(text: str) -> dict[str, Any]:
    """``"key=value key=value"`` → dict; values are TOML (numbers, true/false, quoted strings),
    and a bare word is taken as a string, so ``dataset=mnist`` works as well as ``dataset='mnist'``.
    A key given twice is an error: silently keeping the last value hides a typo'd command line."""
    out: dict[str, Any] = {}
    raw_of: dict[str, str] = {}
    for token in shlex.split(text):
        if "=" not in token:
            raise ConfigError(f"run-config override '{token}' is not of the form key=value")
        key, raw = token.split("=", 1)
        key = key.strip()
        if key in raw_of:
            raise ConfigError(f"run-config key '{key}' is given twice ({key}={raw_of[key]} and {key}={raw}); give each key once")
        raw_of[key] = raw
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def load_config(config_file: str | Path | None = None, overrides: str | Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults ← ``config_file`` (flat TOML, or a pyproject with ``[tool.flwr.app.config]``) ← overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from None
        values.update(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data))
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, str) else overrides)
    return RunConfig.from_mapping(values)


def defaults() -> dict[str, Any]:
    """Every key's default (what pyproject's ``[tool.flwr.app.config]`` must hold)."""
    return RunConfig().to_run_config()


def markdown_table() -> str:
    """The key reference of docs/configuration.md, one table per section."""
    lines: list[str] = []
    for name, cls in all_sections().items():
        lines += [f"### `{name}`", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        for key, f in section_fields(cls):
            default = json.dumps(f.default) if isinstance(f.default, (str, bool)) else f"{f.default}"
            lines.append(f"| `{key}` | `{default}` | {allowed_text(f)} | {f.metadata.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


BEGIN_GENERATED, END_GENERATED = "<!-- BEGIN GENERATED: config keys -->\n", "<!-- END GENERATED -->"


def update_docs(path: str | Path) -> None:
    """Rewrite the generated key table between the markers of ``path`` (docs/configuration.md)."""
    path = Path(path)
    text = path.read_text()
    head, rest = text.split(BEGIN_GENERATED, 1)
    _, tail = rest.split(END_GENERATED, 1)
    path.write_text(head + BEGIN_GENERATED + markdown_table() + END_GENERATED + tail)


if __name__ == "__main__":  # python -m splitmix.config [--defaults | --update-docs FILE]
    if "--defaults" in sys.argv:
        for key, value in defaults().items():
            print(f"{key} = {json.dumps(value) if isinstance(value, (str, bool)) else value}")
    elif "--update-docs" in sys.argv:
        update_docs(sys.argv[sys.argv.index("--update-docs") + 1])
    else:
        print(markdown_table(), end="")
