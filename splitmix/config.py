"""Run configuration: flat ``key = value`` pairs (pyproject's ``[tool.flwr.app.config]``, a
``--config`` TOML file, ``--run-config`` overrides) → one validated, frozen dataclass.

Invalid input fails fast with a message naming the key, the value and what is allowed. The
dataclass defaults mirror pyproject's ``[tool.flwr.app.config]`` (a test keeps them identical),
so ``flwr run .`` and ``splitmix simulate`` start from the same defaults.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from splitmix.adversarial import PGDConfig
from techniques.diversity import DiversityConfig
from techniques.optimizers import OPTIMIZERS

# Fault injection (issue 9): what a sampled client does wrong; "mixed" draws one kind per fault.
FAULT_KINDS = ("mixed", "crash", "timeout", "missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan", "inf", "scaled", "sign-flip")
from splitmix.data import DATASETS, PARTITIONS, DataConfig
from splitmix.profiles import parse_budgets
from clients.recipe import LocalTrainConfig
from techniques.sparse_training import SPARSE_METHODS, SparseConfig
from splitmix.protocol.task import ClientTask
from models.registry import list_models
from models.splitmix import SplitMixSpec
from strategies.methods import METHODS, Method, make_method
from strategies.robust_aggregation import AGGREGATORS


class ConfigError(ValueError):
    """A run-config key has an invalid value (the message names key, value and what is allowed)."""


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass(frozen=True)
class SimulationConfig:
    method: str = field(default="splitmix", metadata=_choice(*METHODS))
    fedavg_clients: str = field(default="capable", metadata=_choice("capable", "all"))
    bn_stats: str = field(default="tracked", metadata=_choice("tracked", "static"))
    seed: int = field(default=0, metadata=_range(0))
    dataset: str = field(default="digits", metadata=_choice(*DATASETS))
    data_root: str = ""
    partition: str = field(default="iid", metadata=_choice(*PARTITIONS))
    dirichlet_alpha: float = field(default=0.5, metadata=_range(0, lo_open=True))
    num_clients: int = field(default=50, metadata=_range(1))
    fraction_train: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    min_train_clients: int = field(default=2, metadata=_range(1))
    num_rounds: int = field(default=40, metadata=_range(1))
    model: str = field(default="cnn", metadata=_choice(*list_models()))
    atom_width: float = field(default=0.125, metadata=_range(0, 1, lo_open=True))
    budgets: str = "8-4-2-1"
    adv_fraction: float = field(default=0.5, metadata=_range(0, 1))
    adv_lambda: float = field(default=0.5, metadata=_range(0, 1))
    pgd_eps: float = field(default=0.1, metadata=_range(0))
    pgd_alpha: float = field(default=0.036, metadata=_range(0, lo_open=True))
    pgd_steps: int = field(default=7, metadata=_range(1))
    local_epochs: int = field(default=2, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(2))
    lr: float = field(default=0.05, metadata=_range(0, lo_open=True))
    lr_schedule: str = field(default="cosine", metadata=_choice("cosine", "constant"))
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    weight_decay: float = field(default=0.0005, metadata=_range(0))
    eval_lambdas: str = "0,0.5,1"
    eval_every: int = field(default=1, metadata=_range(1))
    eval_robust_every: int = field(default=0, metadata=_range(0))
    eval_pgd_steps: int = field(default=10, metadata=_range(0))
    out_dir: str = "runs"
    run_name: str = ""
    client_num_cpus: float = field(default=1.0, metadata=_range(0, lo_open=True))
    client_num_gpus: float = field(default=0.0, metadata=_range(0))
    torch_threads: int = field(default=1, metadata=_range(1))
    device: str = field(default="auto", metadata=_choice("auto", "cpu", "cuda"))
    round_timeout: float = field(default=600.0, metadata=_range(0, lo_open=True))
    client_wait: float = field(default=60.0, metadata=_range(0))
    sparse_method: str = field(default="none", metadata=_choice(*SPARSE_METHODS))
    sparse_fraction: float = field(default=1.0, metadata=_range(0, 1))
    sparsity: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    sparse_update_every: int = field(default=20, metadata=_range(1))
    sparse_drop_fraction: float = field(default=0.5, metadata=_range(0, 1))
    sparse_search_threshold: float = field(default=0.08, metadata=_range(0, 1))
    sparse_rescale: bool = True
    eval_train_examples: int = field(default=0, metadata=_range(0))
    vit_depth: int = field(default=4, metadata=_range(1))
    vit_dim: int = field(default=256, metadata=_range(1))
    vit_heads: int = field(default=32, metadata=_range(1))
    vit_patch: int = field(default=0, metadata=_range(0))
    vit_mlp_ratio: float = field(default=2.0, metadata=_range(0, lo_open=True))
    diversity_patch_cosine: float = field(default=0.0, metadata=_range(0))
    diversity_patch_contrastive: float = field(default=0.0, metadata=_range(0))
    diversity_heads: float = field(default=0.0, metadata=_range(0))
    diversity_condition: float = field(default=0.0, metadata=_range(0))
    optimizer: str = field(default="sgd", metadata=_choice(*OPTIMIZERS))
    l2o_artifacts: str = ""
    aggregation: str = field(default="mean", metadata=_choice(*AGGREGATORS))
    trim_fraction: float = field(default=0.1, metadata=_range(0, 0.5, hi_open=True))
    ray_address: str = ""
    fault_fraction: float = field(default=0.0, metadata=_range(0, 1))
    fault_kind: str = field(default="mixed", metadata=_choice(*FAULT_KINDS))
    uvc_flops_ratio: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        try:
            SplitMixSpec(atom_width=self.atom_width)
        except ValueError as err:
            raise ConfigError(f"config key 'atom-width' = {self.atom_width}: {err}") from None
        try:
            widths = parse_budgets(self.budgets)
        except ValueError as err:
            raise ConfigError(f"config key 'budgets' = '{self.budgets}': {err}") from None
        too_small = [w for w in widths if w + 1e-9 < self.atom_width]
        if too_small:
            raise ConfigError(
                f"config key 'budgets' = '{self.budgets}' has widths {too_small} below the atom "
                f"width {self.atom_width}; every budget must afford at least one base"
            )
        if self.min_train_clients > self.num_clients:
            raise ConfigError(
                f"config key 'min-train-clients' = {self.min_train_clients} exceeds num-clients = {self.num_clients}"
            )
        lambdas = self.lambdas  # validates the list
        if 0.0 not in lambdas:
            raise ConfigError(f"config key 'eval-lambdas' = '{self.eval_lambdas}' must include 0 (the standard model)")
        self._check_vit()
        if self.sparse_method == "uvc" and not self.is_vit:
            raise ConfigError(f"config key 'sparse-method' = 'uvc' compresses ViT bases; model = '{self.model}' is not a ViT")
        if self.aggregation != "mean" and self.method != "splitmix":
            raise ConfigError(
                f"config key 'aggregation' = '{self.aggregation}' is implemented for method = 'splitmix' only "
                f"(per base); method = '{self.method}' averages nested slices: use aggregation = 'mean'"
            )
        if self.partition == "domains" and self.num_clients < 5:
            raise ConfigError(f"config key 'num-clients' = {self.num_clients}: the 'domains' partition needs at least 5")

    def _check_vit(self) -> None:
        """ViT topology keys must describe a buildable model at every width; diversity terms
        need a ViT (they regularise tokens, attention heads and q/k/v weights)."""
        diversity = {k: v for k, v in self.diversity().__dict__.items() if k != "prefix_tokens" and v}
        if not self.is_vit:
            if diversity:
                key = "diversity-" + {"patch_cosine": "patch-cosine", "patch_contrastive": "patch-contrastive",
                                      "attention_heads": "heads", "weight_condition": "condition"}[next(iter(diversity))]
                raise ConfigError(f"config key '{key}' needs a ViT model (model = vit, vit_attnscale or vit_featscale), not model = '{self.model}'")
            return
        if self.vit_dim % self.vit_heads:
            raise ConfigError(f"config key 'vit-dim' = {self.vit_dim} must be a multiple of vit-heads = {self.vit_heads}")
        heads_at_atom = self.vit_heads * self.atom_width
        if heads_at_atom < 1 or abs(heads_at_atom - round(heads_at_atom)) > 1e-6:
            raise ConfigError(
                f"config key 'vit-heads' = {self.vit_heads}: every base (atom width {self.atom_width}) needs a whole "
                f"number of heads (vit-heads × atom-width = {heads_at_atom:g}); use a multiple of {round(1 / self.atom_width)}"
            )
        image = DATASETS[self.dataset].image_size
        if self.vit_patch and image % self.vit_patch:
            raise ConfigError(f"config key 'vit-patch' = {self.vit_patch} must divide the image size {image} of '{self.dataset}' (0 = automatic)")

    # ------------------------------------------------------------------ derived views
    @property
    def is_vit(self) -> bool:
        return self.model.startswith("vit")

    def model_options(self) -> str:
        """The model family's extra keywords as canonical JSON (ViT topology; empty otherwise)."""
        if not self.is_vit:
            return ""
        options = {"depth": self.vit_depth, "embed_dim": self.vit_dim, "num_heads": self.vit_heads, "mlp_ratio": self.vit_mlp_ratio}
        if self.vit_patch:
            options["patch_size"] = self.vit_patch
        return json.dumps(options, sort_keys=True)

    def diversity(self) -> DiversityConfig:
        return DiversityConfig(
            patch_cosine=self.diversity_patch_cosine,
            patch_contrastive=self.diversity_patch_contrastive,
            attention_heads=self.diversity_heads,
            weight_condition=self.diversity_condition,
        )

    @property
    def lambdas(self) -> list[float]:
        try:
            values = sorted({float(v) for v in self.eval_lambdas.split(",") if v.strip()})
        except ValueError:
            raise ConfigError(
                f"config key 'eval-lambdas' = '{self.eval_lambdas}' must be comma-separated numbers in [0, 1]"
            ) from None
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"config key 'eval-lambdas' = '{self.eval_lambdas}' must be numbers in [0, 1]")
        return values

    def spec(self) -> SplitMixSpec:
        info = DATASETS[self.dataset]
        return SplitMixSpec(
            arch=self.model,
            atom_width=self.atom_width,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
            dual_bn=True,
            track_stats=self.bn_stats == "tracked",
            model_options=self.model_options(),
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            dataset=self.dataset,
            root=self.data_root,
            partition=self.partition,
            num_partitions=self.num_clients,
            alpha=self.dirichlet_alpha,
            seed=self.seed,
        )

    def pgd(self, steps: int | None = None) -> PGDConfig:
        return PGDConfig(eps=self.pgd_eps, alpha=self.pgd_alpha, steps=steps or self.pgd_steps)

    def make_method(self) -> Method:
        return make_method(self.method, self.spec(), fedavg_all_clients=self.fedavg_clients == "all")

    def client_task(self, spec: SplitMixSpec | None = None) -> ClientTask:
        """What clients are told; ``spec`` is the method's model spec (e.g. static BN)."""
        return ClientTask(
            data=self.data_config(),
            spec=spec or self.spec(),
            train=LocalTrainConfig(
                epochs=self.local_epochs,
                batch_size=self.batch_size,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                adv_lambda=self.adv_lambda,
                pgd=self.pgd(),
                diversity=self.diversity(),
                optimizer=self.optimizer,
                l2o_artifacts=self.l2o_artifacts,
            ),
            budgets=self.budgets,
            adv_fraction=self.adv_fraction,
            seed=self.seed,
            device=self.device,
            torch_threads=self.torch_threads,
            sparse=SparseConfig(
                method=self.sparse_method,
                fraction=self.sparse_fraction,
                sparsity=self.sparsity,
                update_every=self.sparse_update_every,
                drop_fraction=self.sparse_drop_fraction,
                search_threshold=self.sparse_search_threshold,
                rescale=self.sparse_rescale,
                flops_ratio=self.uvc_flops_ratio,
            ),
            num_rounds=self.num_rounds,
            fault_fraction=self.fault_fraction,
            fault_kind=self.fault_kind,
        )

    def to_run_config(self) -> dict[str, Any]:
        """Back to flat hyphenated keys (what is written to the run folder)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "SimulationConfig":
        """Validate flat ``key: value`` pairs (hyphenated keys, as in pyproject)."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in known:
                allowed = ", ".join(sorted(n.replace("_", "-") for n in known))
                raise ConfigError(f"unknown config key '{key}'; allowed keys: {allowed}")
            kwargs[name] = _coerce(key, value, known[name].type)
        return cls(**kwargs)


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    expected = type_name if isinstance(type_name, str) else type_name.__name__
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' = {value!r} must be an integer")
        return value
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a number")
        return float(value)
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} must be true or false")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. eval-lambdas=0 or budgets=8 typed without quotes
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' = {value!r} must be a string")
    return value


def _check_field(f, value: Any) -> None:
    key = f.name.replace("_", "-")
    coerced = _coerce(key, value, f.type)  # also guards direct construction of the dataclass
    if isinstance(coerced, str) and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' = {value!r} must be a string")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' = {value!r} must be a finite number")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of: {', '.join(f.metadata['choices'])}")
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        )
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {interval}")


def parse_overrides(text: str) -> dict[str, Any]:
    """``"key=value key=value"`` → dict; values are TOML (numbers, true/false, quoted strings),
    and a bare word is taken as a string, so ``dataset=mnist`` works as well as ``dataset='mnist'``."""
    import shlex

    out: dict[str, Any] = {}
    for token in shlex.split(text):
        if "=" not in token:
            raise ConfigError(f"run-config override '{token}' is not of the form key=value")
        key, raw = token.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def load_config(config_file: str | Path | None = None, overrides: str | Mapping[str, Any] | None = None) -> SimulationConfig:
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
    return SimulationConfig.from_mapping(values)
