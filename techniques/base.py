"""What a client-local technique is, and the registry that makes adding one a module + an entry.

A technique (sparse training, diversity regularisers, a learned optimizer, fault injection, …)
is a :class:`Technique` subclass registered with :func:`register_technique`. It owns

- its **config section** (``Config``: a :class:`splitmix.sections.Section` dataclass whose keys
  sit in the flat run config), with cross-section checks in :meth:`Technique.check`;
- its **server hooks**: whether it is on, what it needs in the clients' task, the global model's
  initial state, the model the server evaluates and stores, why clients keep state, summary;
- its **client hooks**: :meth:`Technique.client_round` returns a :class:`RoundHooks` object that
  the ClientApp and the local recipe call around one round of local training.

The round loop (``server/federation.py``) and the ClientApp (``clients/app.py``) only call these
hooks on the techniques that are on; they never compare technique names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch

from splitmix.sections import Section

if TYPE_CHECKING:
    from clients.recipe import TrainResult
    from splitmix.config import RunConfig

State = dict[str, torch.Tensor]

ConfigT = TypeVar("ConfigT", bound=Section | None)  # a technique's config section (None: it has none)
TechniqueT = TypeVar("TechniqueT", bound="type[Technique[Any]]")

SECTIONS: dict[str, type[Section]] = {}  # config sections of techniques (and technique families)
TECHNIQUES: dict[str, type[Technique[Any]]] = {}


def register_section(name: str) -> Callable[[type], type]:
    """Register a config section under ``name`` (the run config gets ``cfg.techniques[name]``)."""

    def wrap(cls: type) -> type:
        if name in SECTIONS and SECTIONS[name] is not cls:
            raise ValueError(f"config section '{name}' is registered twice")
        SECTIONS[name] = cls
        return cls

    return wrap


def register_technique(cls: TechniqueT) -> TechniqueT:
    """Class decorator: register a technique by its ``name`` (and its ``Config`` section)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TECHNIQUES:
        raise ValueError(f"technique '{cls.name}' is registered twice")
    TECHNIQUES[cls.name] = cls
    if cls.Config is not None:
        register_section(cls.name)(cls.Config)
    return cls


NODE_CHECK_FAILED = "node check failed"  # the marker the server looks for in a failed profile query


class NodeCheckError(RuntimeError):
    """A node cannot take part as set up (e.g. a different learned-optimizer artifact); why a
    marker: Flower hands the server only the text of a client's exception."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{NODE_CHECK_FAILED}: {message}")


@dataclass
class ServerContext:
    """What server hooks may look at: the run config, the method and its model spec."""

    run: RunConfig
    method: Any  # strategies.registry.Method
    prunable: set[str] = field(default_factory=set)  # conv/linear weight names of one unit
    rows: list[dict[str, Any]] = field(default_factory=list)  # the run's round rows so far (metrics.jsonl)

    def latest(self, prefix: str) -> dict[str, float]:
        """``{name: value}`` of the newest row value of every row key ``<prefix><name>`` (e.g. the
        density each unit's clients last reported)."""
        out: dict[str, float] = {}
        for row in self.rows:
            out.update({k[len(prefix) :]: float(v) for k, v in row.items() if k.startswith(prefix)})
        return out


@dataclass
class ClientRound:
    """One client's round, as technique hooks see it. Hooks may replace ``data`` (e.g. hold part
    of it out) before training and add ``metrics`` / ``masks`` after it."""

    model: torch.nn.Module  # the stacked bases (Split-Mix) or the width slice being trained
    units: list[str]  # state unit per stacked chunk: ["base3", "base4"] or ["width"]
    task: Any  # splitmix.protocol.task.ClientTask
    profile: Any  # splitmix.protocol.NodeProfile
    context: Any  # flwr.app.Context (its .state survives rounds on the node)
    data: Any  # splitmix.data.ArrayData: what the recipe trains on
    device: torch.device
    seed: int  # this client's seed for this round
    server_round: int
    width: float = 1.0  # width of a slice model (width methods)
    single_unit: Callable[[], torch.nn.Module] | None = None  # builds one unit's model
    optimizer_state: dict | None = None  # a learned optimizer's state to resume
    metrics: dict[str, float] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # upload key -> kept entries

    def upload_key(self, unit: str, name: str) -> str:
        """The reply key of parameter ``name`` of ``unit``."""
        return f"{unit}.{name}" if unit.startswith("base") else name


class RoundHooks:
    """Client hooks of one technique for one round; every method is optional (no-op)."""

    forward: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]] | None = None
    """If set: the clean forward pass of training, returning (logits, extra loss)."""

    extra_loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | float] | None = None
    """If set: a loss added on every batch ``(model, x, y)`` (SHeteroFL's narrower widths)."""

    adversarial_share: Callable[[], torch.Tensor | None] | None = None
    """If set: per stacked unit, the weight of the adversarial loss on an adversarial client
    (1 = as its profile says, 0 = clean training for that unit now: Robust Bird's search)."""

    def before_training(self, rnd: ClientRound) -> None:
        """After the model holds the received weights, before the first step."""

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After every optimizer step."""

    def after_epoch(self) -> None:
        """After every local epoch."""

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        """After the last step: keep state in ``rnd.context.state``, add metrics and masks."""

    def before_upload(self, tensors: State, received: Callable[[], State]) -> State:
        """The tensors about to be sent (``received()`` gives what the server sent)."""
        return tensors


class Technique(Generic[ConfigT]):
    """A client-local technique; subclasses set ``name`` and ``Config`` and override hooks.

    The type parameter is the class of ``Config`` (its instance is ``self.config``), e.g.
    ``class RobustBird(SparseTechnique[RobustBirdConfig])``; ``None`` for a technique without one."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[Section] | None] = None

    def __init__(self, config: ConfigT) -> None:
        self.config: ConfigT = config

    # ------------------------------------------------------------------ configuration
    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        """Whether this run uses the technique."""
        return False

    @classmethod
    def check(cls, run: RunConfig) -> None:
        """Checks against other sections (raise ``ConfigError`` naming the key), run always."""

    # ------------------------------------------------------------------ server hooks
    def prepare_task(self, task: Any, run: RunConfig) -> Any:
        """The clients' task (``ClientTask``) with whatever this technique adds to it."""
        return task

    def check_node(self, task: Any) -> None:
        """On every node at start-up (its profile query): raise :class:`NodeCheckError` when this
        node cannot run the technique as the server set it up (the server then stops the run)."""

    def stateful_reason(self, run: RunConfig) -> str | None:
        """Why clients keep state across rounds in their Context (resume needs it saved)."""
        return None

    def initial_state(self, state: State, ctx: ServerContext) -> State:
        """The global model before round 1."""
        return state

    def served_state(self, state: State, ctx: ServerContext) -> State:
        """The model the server evaluates and stores."""
        return state

    def summary(self, rounds: list[dict], run: RunConfig) -> dict[str, Any]:
        """Entries this technique adds to the run's summary.json."""
        return {}

    # ------------------------------------------------------------------ client hooks
    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        """Hooks for one round of this client (None: nothing to do this round)."""
        return None


def section_of(run: RunConfig, name: str) -> Any:
    return run.techniques[name]
