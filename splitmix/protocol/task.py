"""The run-level instructions every client receives (``config["task"]`` of each message).

The server builds one :class:`ClientTask` from the validated run config and sends it as JSON with
each message, so a ClientApp needs no run config of its own: the same ClientApp works in
simulation and on a SuperNode. Clients parse it once and cache it (keyed by the JSON string).
Technique settings travel as their config sections (``techniques``: section name → values) with
the names of the techniques this run uses (``active``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from clients.recipe import LocalTrainConfig
from models.splitmix import SplitMixSpec
from splitmix.adversarial import PGDConfig
from splitmix.data import DataConfig

if TYPE_CHECKING:
    from splitmix.config import RunConfig
    from techniques.base import Technique
    from techniques.optimizers import OptimizerSection


@dataclass(frozen=True)
class ClientTask:
    data: DataConfig
    spec: SplitMixSpec
    train: LocalTrainConfig
    budgets: str
    adv_fraction: float
    seed: int
    device: str = "auto"
    torch_threads: int = 1
    num_rounds: int = 1
    active: tuple[str, ...] = ()  # techniques this run uses (registry names)
    techniques: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> field values
    fault_delay: float = 0.0  # seconds a "timeout" fault sleeps (the server: longer than any round waits)
    state_dir: str = ""  # simulation: where nodes save their Context state per round (clients/node_state.py)
    eval_pgd: PGDConfig = PGDConfig()  # the attack of robust evaluation (eval-pgd-steps)

    @classmethod
    def from_run(cls, run: RunConfig, spec: SplitMixSpec) -> ClientTask:
        t = run.training
        optimizer = cast("OptimizerSection", run.techniques["optimizer"])
        active = run.active_techniques()
        task = cls(
            data=run.data_config(),
            spec=spec,
            train=LocalTrainConfig(
                epochs=t.local_epochs,
                batch_size=t.batch_size,
                momentum=t.momentum,
                weight_decay=t.weight_decay,
                adv_lambda=t.adv_lambda,
                pgd=run.pgd(),
                optimizer=optimizer.optimizer,
                l2o_artifacts=optimizer.l2o_artifacts,
                masked_loss=t.masked_loss,
            ),
            eval_pgd=run.pgd(max(run.evaluation.eval_pgd_steps, 1)),
            budgets=run.federation.budgets,
            adv_fraction=run.federation.adv_fraction,
            seed=run.seed,
            device=run.system.device,
            torch_threads=run.system.torch_threads,
            num_rounds=run.federation.num_rounds,
            active=tuple(technique.name for technique in active),
            techniques={name: asdict(section) for name, section in run.techniques.items()},  # type: ignore[call-overload]
        )
        for technique in active:
            task = technique.prepare_task(task, run)
        return task

    @property
    def sparse_fraction(self) -> float:
        """Share of clients that train sparse (0 when no sparse technique is on)."""
        from techniques.sparse_base import SparseTechnique

        return self.section("sparse").fraction if any(issubclass(_technique(n), SparseTechnique) for n in self.active) else 0.0

    def section(self, name: str) -> Any:
        """A technique's config section, as the dataclass (built from the values carried)."""
        from techniques import SECTIONS

        return SECTIONS[name](**self.techniques[name])

    def techniques_on(self) -> list[Technique]:
        """This run's techniques, each with its section."""
        return [_technique(name)(self.section(name) if name in self.techniques else None) for name in self.active]

    def with_state_dir(self, path: str) -> ClientTask:
        return replace(self, state_dir=path)

    def to_json(self) -> str:
        return _to_json(self)

    @staticmethod
    def from_json(text: str) -> ClientTask:
        return _parse(text)


def _to_json(task: ClientTask) -> str:
    return json.dumps(asdict(task), sort_keys=True)


def _technique(name: str) -> type[Technique]:
    from techniques import TECHNIQUES

    return TECHNIQUES[name]


@lru_cache(maxsize=16)
def _parse(text: str) -> ClientTask:
    raw = json.loads(text)
    train = dict(raw["train"])
    train["pgd"] = PGDConfig(**train["pgd"])
    return ClientTask(
        data=DataConfig(**raw["data"]),
        spec=SplitMixSpec(**raw["spec"]),
        train=LocalTrainConfig(**train),
        budgets=raw["budgets"],
        adv_fraction=raw["adv_fraction"],
        seed=raw["seed"],
        device=raw["device"],
        torch_threads=raw["torch_threads"],
        num_rounds=raw["num_rounds"],
        active=tuple(raw["active"]),
        techniques=raw["techniques"],
        fault_delay=raw["fault_delay"],
        state_dir=raw["state_dir"],
        eval_pgd=PGDConfig(**raw["eval_pgd"]),
    )
