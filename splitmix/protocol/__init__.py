"""The protocol between the ServerApp and the ClientApp: message keys, the node profile, the
train instruction and the reply, with their codecs. Both sides import it; no key is spelled
anywhere else.

A round, as messages (Flower Message API):

- ``query`` (server → node): ``config["task"]`` = the run's :class:`~splitmix.protocol.task.ClientTask`
  as JSON. Reply: ``profile`` (:class:`NodeProfile`, see :func:`profile_to_record`).
- ``train`` (server → node): ``arrays`` (the tensors the node trains) and ``config`` (:class:`Instruction`).
  Reply: ``arrays`` (trained tensors; a sparse client sends kept entries,
  ``splitmix/protocol/sparse_codec.py``) and ``metrics`` (:data:`REQUIRED_METRICS` and more).
- ``query.bn_stats`` (server → node, static-BN methods, before an evaluation): ``arrays`` (the
  served state) and ``config`` (task, method). Reply: ``arrays`` with, per statistics model tag
  and BN, the sum, sum of squares and count of the BN's inputs over the node's *training* split
  (``models/bn_moments.py``).
- ``evaluate`` (server → node): ``arrays`` (the served state) and ``config`` (task, method,
  widths, λs, whether to attack). Reply: ``metrics`` with correct-prediction counts per split
  (``val``, ``test``), kind (``correct``, ``robust``), width and λ (:func:`eval_key`) and the
  split sizes (``val/n``, ``test/n``).

Every ``arrays`` record holds ONE packed Flower ``Array`` (``splitmix/protocol/codec.py``: an
index and the tensors' bytes); ``sparse_codec.py`` packs a sparse reply's kept entries the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

# ----------------------------------------------------------------------------- message types
QUERY = "query"
TRAIN = "train"
BN_STATS_QUERY = "query.bn_stats"
EVALUATE = "evaluate"

# ----------------------------------------------------------------------------- record names
CONFIG = "config"  # ConfigRecord of an instruction
ARRAYS = "arrays"  # ArrayRecord of tensors, both ways
METRICS = "metrics"  # MetricRecord of a train reply
PROFILE = "profile"  # ConfigRecord of a query reply

# ----------------------------------------------------------------------------- instruction keys
TASK = "task"
ROUND = "round"
LR = "lr"
SEED = "seed"
METHOD = "method"  # which method's client step trains the arrays (strategies/registry.py)
BASES = "bases"  # Split-Mix: indices of the bases sent, in stacking order
WIDTH = "width"  # width methods: the slice's width
SLIM_WIDTHS = "slim-widths"  # SHeteroFL: every width trained on each batch
WIDTHS = "widths"  # evaluate: the widths to evaluate
LAMBDAS = "lambdas"  # evaluate: the robustness levels λ
ROBUST = "robust"  # evaluate: 1 = also PGD accuracy
LOCAL_NORM = "local-bn"  # FedBN: normalisation layers stay on the node

# ----------------------------------------------------------------------------- reply metrics
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
TRAIN_TIME = "train-time"
REQUIRED_METRICS = (NUM_EXAMPLES, LOSS, TRAIN_TIME)
FRACTION_METRICS = ("density",)  # sparse clients; must lie in [0, 1]
COST_METRICS = ("flops-fraction",)  # training FLOPs / dense training FLOPs: finite, >= 0, may exceed 1 (UVC's search)
SUM_PREFIX = "sum:"  # a client metric summed over the round's valid replies into the round's row (key without the prefix)
MEAN_PREFIX = "mean:"  # a client metric averaged over the valid replies that carry it (e.g. a unit's density)


# ----------------------------------------------------------------------------- the profile
@dataclass(frozen=True)
class NodeProfile:
    """What the server must know of a node to give it work: its partition, compute budget (the
    widest width it can train, in (0, 1]), whether it trains adversarially or sparse, and how many
    examples it holds (the cap on its aggregation weight). ``node_id`` is Flower's id of the node
    (0 on the node itself, which does not know it)."""

    partition_id: int
    budget: float
    adversarial: bool
    sparse: bool = False
    num_examples: int = 0
    node_id: int = 0


def profile_to_record(profile: NodeProfile) -> ConfigRecord:
    return ConfigRecord(
        {
            "partition-id": profile.partition_id,
            "budget": profile.budget,
            "adversarial": profile.adversarial,
            "sparse": profile.sparse,
            NUM_EXAMPLES: profile.num_examples,
        }
    )


def profile_from_record(record: ConfigRecord, node_id: int) -> NodeProfile:
    """The profile a node reported; raises ValueError/KeyError/TypeError naming what is wrong."""
    for key in ("partition-id", NUM_EXAMPLES):
        if isinstance(record[key], bool) or not isinstance(record[key], int):
            raise ValueError(f"'{key}' = {record[key]!r} is not an integer")
    profile = NodeProfile(
        partition_id=int(record["partition-id"]),  # type: ignore[arg-type]
        budget=float(record["budget"]),  # type: ignore[arg-type]
        adversarial=bool(record["adversarial"]),
        sparse=bool(record.get("sparse", False)),
        num_examples=int(record[NUM_EXAMPLES]),  # type: ignore[arg-type]
        node_id=node_id,
    )
    if not (math.isfinite(profile.budget) and 0.0 < profile.budget <= 1.0):
        raise ValueError(f"budget {profile.budget} is not in (0, 1]")
    if profile.num_examples < 0 or profile.partition_id < 0:
        raise ValueError("negative partition-id or num-examples")
    return profile


# ----------------------------------------------------------------------------- typed reads
# A record value's static type is the union of every value type a record may hold; the reader
# knows which one its key holds. These convert exactly as int()/float()/bytes() do.
def as_int(value: Any) -> int:
    return int(value)


def as_float(value: Any) -> float:
    return float(value)


def as_bytes(value: Any) -> bytes:
    return bytes(value)


# ----------------------------------------------------------------------------- the instruction
@dataclass(frozen=True)
class Instruction:
    """The ``config`` of a train message: the run's task (JSON), the round, its learning rate,
    the client's seed, and the method's fields (which bases, which width, local norms)."""

    task: str
    server_round: int
    lr: float
    seed: int
    method: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({TASK: self.task, ROUND: self.server_round, LR: self.lr, SEED: self.seed, METHOD: self.method, **self.extra})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Instruction:
        known = {TASK, ROUND, LR, SEED, METHOD}
        return cls(
            task=str(record[TASK]),
            server_round=int(record[ROUND]),  # type: ignore[arg-type]
            lr=float(record[LR]),  # type: ignore[arg-type]
            seed=int(record[SEED]),  # type: ignore[arg-type]
            method=str(record.get(METHOD, "splitmix")),
            extra={k: v for k, v in record.items() if k not in known},
        )


def query_message(task_json: str, node_id: int) -> Message:
    return Message(RecordDict({CONFIG: ConfigRecord({TASK: task_json})}), dst_node_id=node_id, message_type=QUERY)


def task_of(msg: Message) -> str:
    return str(msg.content[CONFIG][TASK])


def train_message(arrays: Any, instruction: Instruction, node_id: int) -> Message:
    return Message(RecordDict({ARRAYS: arrays, CONFIG: instruction.to_record()}), dst_node_id=node_id, message_type=TRAIN)


def reply_message(msg: Message, arrays: Any, metrics: Mapping[str, float | int]) -> Message:
    return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(dict(metrics))}), reply_to=msg)


def bn_stats_message(arrays: Any, task_json: str, method: str, node_id: int) -> Message:
    config = ConfigRecord({TASK: task_json, METHOD: method})
    return Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node_id, message_type=BN_STATS_QUERY)


def evaluate_message(arrays: Any, task_json: str, method: str, widths: list[float], lambdas: list[float], robust: bool, node_id: int) -> Message:
    config = ConfigRecord({TASK: task_json, METHOD: method, WIDTHS: list(widths), LAMBDAS: list(lambdas), ROBUST: int(robust)})
    return Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node_id, message_type=EVALUATE)


SPLITS = ("val", "test")  # a client's evaluation splits


def eval_key(split: str, kind: str, width: float, lam: float) -> str:
    """Metric key of an evaluate reply: ``test/correct/w0.125/l0``, ``val/robust/w1/l0.5``."""
    return f"{split}/{kind}/w{round(width, 6):g}/l{round(lam, 6):g}"


def split_size_key(split: str) -> str:
    return f"{split}/n"


def profile_reply(msg: Message, profile: NodeProfile) -> Message:
    return Message(RecordDict({PROFILE: profile_to_record(profile)}), reply_to=msg)
