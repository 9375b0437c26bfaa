"""The run-level instructions every client receives (inside the message's ConfigRecord).

The server builds one :class:`ClientTask` from the validated run config and sends it as JSON with
each message, so a ClientApp needs no run config of its own: the same ClientApp works in
simulation and on a SuperNode. Clients parse it once and cache it (keyed by the JSON string).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from splitmix.adversarial import PGDConfig
from splitmix.data import DataConfig
from techniques.diversity import DiversityConfig
from clients.recipe import LocalTrainConfig
from techniques.sparse_training import SparseConfig
from models.splitmix import SplitMixSpec


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
    sparse: SparseConfig = SparseConfig()
    num_rounds: int = 1
    fault_fraction: float = 0.0  # fault injection (techniques/faults.py)
    fault_kind: str = "mixed"
    fault_delay: float = 0.0  # seconds a "timeout" fault sleeps (the server sets round-timeout + 1)
    state_dir: str = ""  # simulation: where nodes save their Context state per round (clients/node_state.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "ClientTask":
        return _parse(text)


@lru_cache(maxsize=16)
def _parse(text: str) -> ClientTask:
    raw = json.loads(text)
    train = dict(raw["train"])
    train["pgd"] = PGDConfig(**train["pgd"])
    train["diversity"] = DiversityConfig(**train.get("diversity", {}))
    return ClientTask(
        data=DataConfig(**raw["data"]),
        spec=SplitMixSpec(**raw["spec"]),
        train=LocalTrainConfig(**train),
        budgets=raw["budgets"],
        adv_fraction=raw["adv_fraction"],
        seed=raw["seed"],
        device=raw["device"],
        torch_threads=raw["torch_threads"],
        sparse=SparseConfig(**raw.get("sparse", {})),
        num_rounds=raw.get("num_rounds", 1),
        fault_fraction=raw.get("fault_fraction", 0.0),
        fault_kind=raw.get("fault_kind", "mixed"),
        fault_delay=raw.get("fault_delay", 0.0),
        state_dir=raw.get("state_dir", ""),
    )
