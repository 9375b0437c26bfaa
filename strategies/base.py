"""What every heterogeneous-FL strategy shares: node profiles, seeded sampling, reply
validation and byte accounting (aggregation: ``strategies/aggregation.py``).

Method-specific strategies (``strategies/splitmix.py``, ``heterofl.py``, ``fedavg.py``) only decide
*which tensors* each client gets and receives back; everything here is written once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from splitmix import protocol
from splitmix.protocol import NodeProfile, as_float
from splitmix.protocol.codec import record_bytes, to_record, unpack
from splitmix.protocol.sparse_codec import sparse_from_arrays
from strategies.aggregation import Contribution, Entry
from strategies.node_profiles import ProfileTable

log = logging.getLogger("splitmix")

Sender = Callable[[list[Message]], Iterable[Message]]  # messages -> replies (waits, reports progress)


class ReplyRejected(ValueError):
    """A client reply failed validation; it is logged and left out of the aggregate."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class RoundStats:
    """Per-round accounting that lands in the run's metrics."""

    sampled: int = 0
    replies: int = 0
    failures: int = 0
    rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    examples: int = 0
    loss: float = float("nan")
    client_time: float = 0.0
    flops_fraction: float = 1.0  # example-weighted share of dense training FLOPs (sparse clients < 1)
    sparse_replies: int = 0
    problems: list[str] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "sampled": self.sampled,
            "replies": self.replies,
            "failures": self.failures,
            "rejected": self.rejected,
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "examples": self.examples,
            "train-loss": self.loss,
            "client-time": self.client_time,
            "train-flops-fraction": self.flops_fraction,
            "sparse-replies": self.sparse_replies,
        }


def is_sparse_reply(arrays: Mapping[str, np.ndarray]) -> bool:
    """A sparse client's reply: ``<key>::idx``/``<key>::val`` pairs and a ``::dense`` pack."""
    return any("::" in key for key in arrays)


def validate_arrays(arrays: Mapping[str, np.ndarray], expected: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Check keys, shapes, dtypes and finiteness of a dense reply's (unpacked) tensors; return
    them as writable tensors.

    Raises :class:`ReplyRejected` naming the first problem found.
    """
    keys = set(arrays)
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing:
        raise ReplyRejected(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if extra:
        raise ReplyRejected(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
    values: dict[str, np.ndarray] = {}
    for key in sorted(expected):
        array, spec = arrays[key], expected[key]
        if tuple(array.shape) != spec.shape:
            raise ReplyRejected(f"tensor '{key}' has shape {tuple(array.shape)}, expected {spec.shape}")
        if array.dtype.name != spec.dtype:
            raise ReplyRejected(f"tensor '{key}' has dtype {array.dtype.name}, expected {spec.dtype}")
        values[key] = array
    return _checked_tensors(values)


def _checked_tensors(values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """One contiguous copy per dtype: a single NaN/Inf check per reply, and writable tensors
    (views into that copy) without a copy per tensor."""
    by_dtype: dict[np.dtype, list[str]] = {}
    for key, value in values.items():
        by_dtype.setdefault(value.dtype, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for dtype, keys in by_dtype.items():
        flat = np.concatenate([values[k].reshape(-1) for k in keys])
        if np.issubdtype(dtype, np.floating) and not np.isfinite(flat).all():
            bad = next(k for k in keys if not np.isfinite(values[k]).all())
            raise ReplyRejected(f"tensor '{bad}' contains NaN or Inf")
        buffer, offset = torch.from_numpy(flat), 0
        for key in keys:
            size = values[key].size
            out[key] = buffer[offset : offset + size].view(values[key].shape)
            offset += size
    return out


MAGNITUDE_FACTOR = 1e3  # a returned tensor may not exceed 1e3 · (max |sent| + 1) in absolute value


def magnitude_bound(sent_peak: float) -> float:
    """The largest |value| a reply may hold in a tensor whose sent values peak at ``sent_peak``.

    Honest local training moves weights by a few learning-rate steps and BN running statistics
    by the data's scale, far inside this bound (the +1 covers tensors sent as zeros, e.g. biases);
    a reply scaled by an absurd factor (the ``scaled`` fault: × 1e6) is far outside it.
    """
    return MAGNITUDE_FACTOR * (sent_peak + 1.0)


def check_magnitudes(tensors: Mapping[str, Entry], bounds: dict[str, float]) -> None:
    """Raise :class:`ReplyRejected` for the first floating tensor beyond its bound (sparse
    entries are ``(mask, values)`` pairs: their values are checked)."""
    for key in sorted(tensors):
        value = tensors[key]
        if isinstance(value, tuple):
            value = value[1]
        if key not in bounds or not value.is_floating_point() or value.numel() == 0:
            continue
        low, high = torch.aminmax(value)
        peak = max(abs(float(low)), abs(float(high)))
        if peak > bounds[key]:
            raise ReplyRejected(f"tensor '{key}' has |value| up to {peak:.3g}, beyond the bound {bounds[key]:.3g} (1e3 · (max |sent| + 1))")


RETRY_DISCOVERY = 5  # discovery calls (rounds) between profile queries to a node that failed one


def reply_num_examples(msg: Message, limit: int | None = None) -> int:
    """Check the reply's metrics; return its example count (the aggregation weight).

    The count must be a positive integer no larger than what the node reported at discovery
    (``limit``): a client cannot buy itself more weight than its data.
    """
    metrics = msg.content.metric_records.get(protocol.METRICS)
    if metrics is None:
        raise ReplyRejected(f"reply has no '{protocol.METRICS}' record")
    for key in protocol.REQUIRED_METRICS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReplyRejected(f"metric '{key}' = {value!r} is not a finite number")
    for key in protocol.FRACTION_METRICS:
        if key in metrics:
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ReplyRejected(f"metric '{key}' = {value!r} is not a fraction in [0, 1]")
    for key, value in metrics.items():  # costs (may exceed 1) and technique metrics forwarded into the round's row
        if key in protocol.COST_METRICS or key.startswith((protocol.SUM_PREFIX, protocol.MEAN_PREFIX)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ReplyRejected(f"metric '{key}' = {value!r} is not a finite number >= 0")
            if key.partition(":")[2].startswith("density") and value > 1:
                raise ReplyRejected(f"metric '{key}' = {value!r} is not a fraction in [0, 1]")
    value = cast(float, metrics[protocol.NUM_EXAMPLES])  # a finite number: checked with REQUIRED_METRICS above
    if value <= 0 or value != int(value):
        raise ReplyRejected(f"'num-examples' = {value!r} is not a positive integer")
    if limit is not None and value > limit:
        raise ReplyRejected(f"'num-examples' = {int(value)} exceeds the {limit} examples the node reported")
    return int(value)


def forwarded_metrics(replies: Iterable[MetricRecord]) -> dict[str, float]:
    """Technique metrics for the round's row: ``sum:<key>`` summed over the replies (e.g. how many
    Robust Bird masks froze), ``mean:<key>`` averaged over the replies that carry it (e.g. the
    density a unit's Flying Bird+ clients reached); the row key drops the prefix."""
    sums: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for metrics in replies:
        for key, value in metrics.items():
            if key.startswith(protocol.SUM_PREFIX):
                name = key[len(protocol.SUM_PREFIX) :]
                sums[name] = sums.get(name, 0.0) + float(cast(float, value))
            elif key.startswith(protocol.MEAN_PREFIX):
                means.setdefault(key[len(protocol.MEAN_PREFIX) :], []).append(float(cast(float, value)))
    return {**sums, **{name: sum(values) / len(values) for name, values in means.items()}}


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local training in one round (shuffling, PGD starts)."""
    return (run_seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31 - 1)


class FederatedStrategy(Strategy):
    """Profiles, sampling and validation shared by the heterogeneous strategies.

    Subclasses implement ``configure_train`` (which tensors each sampled node gets, recording in
    ``_sent`` what it must send back) and ``combine`` (how valid replies make the new model).
    Client-side evaluation is off: the server evaluates every width centrally.
    """

    def __init__(self, task_json: str, fraction_train: float, min_train_clients: int, seed: int, lr_at_round: Callable[[int], float]) -> None:
        self.task_json = task_json
        self.fraction_train = fraction_train
        self.min_train_clients = min_train_clients
        self.seed = seed
        self.lr_at_round = lr_at_round
        self.rng = np.random.default_rng(seed)
        self.profiles: dict[int, NodeProfile] = {}
        self.online: set[int] | None = None  # nodes the grid lists as connected (None: all known)
        self.last_round = RoundStats()
        self._sent: dict[int, dict[str, TensorSpec]] = {}  # node -> what its reply must hold
        self._outbox: dict[int, Message] = {}  # node -> the instruction sent to it this round
        self._discoveries = 0  # rounds begun (profile queries that failed are retried by this count)
        self._retry_at: dict[int, int] = {}  # node whose profile failed -> discovery call to ask again
        self.table: ProfileTable | None = None  # simulation: every partition's derived profile
        self._send: Sender | None = None  # deployment: how profile queries are sent (lazily)
        self._query_timeout = 0.0
        self.query_stats: list[RoundStats] = []  # lazy profile queries since the round loop last took them
        self._current = to_record({})  # the global model of the round being trained
        self._bounds: tuple[ArrayRecord | None, dict[str, float]] = (None, {})
        self.aggregation = "mean"  # a reducer of strategies/aggregation.py
        self.trim_fraction = 0.1

    def summary(self) -> None:
        pass

    def train_message(self, profile: NodeProfile, payload: ArrayRecord, server_round: int, method: str, extra: dict) -> Message:
        """A train instruction: the tensors, the run's task, round, lr, seed and method fields."""
        instruction = protocol.Instruction(
            task=self.task_json,
            server_round=server_round,
            lr=self.lr_at_round(server_round),
            seed=client_seed(self.seed, server_round, profile.partition_id),
            method=method,
            extra=extra,
        )
        message = protocol.train_message(payload, instruction, profile.node_id)
        self._outbox[profile.node_id] = message
        return message

    def combine(self, contributions: list[Contribution]) -> ArrayRecord:
        """The new global ArrayRecord from (tensors, weight) pairs; method-specific."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.last_round
        valid = self.collect_valid(server_round, replies, dict(self._sent), stats)
        if len(valid) < self.min_train_clients:
            problem = (
                f"round {server_round}: only {len(valid)} valid replies (< min-train-clients = {self.min_train_clients}); global model left unchanged"
            )
            stats.problems.append(problem)
            log.warning(problem)
            return None, MetricRecord({**stats.as_metrics(), "valid": len(valid), "round-failed": 1})
        stats.examples = sum(n for _, _, n, _ in valid)
        stats.loss = sum(as_float(m["loss"]) * n for _, _, n, m in valid) / stats.examples
        stats.client_time = sum(as_float(m["train-time"]) for _, _, _, m in valid)
        stats.flops_fraction = sum(as_float(m.get("flops-fraction", 1.0)) * n for _, _, n, m in valid) / stats.examples
        new = self.combine([(tensors, float(n)) for _, tensors, n, _ in valid])
        forwarded = forwarded_metrics([m for _, _, _, m in valid])
        return new, MetricRecord({**stats.as_metrics(), **forwarded, "valid": len(valid), "round-failed": 0})

    # ------------------------------------------------------------------ profiles
    def use_table(self, table: ProfileTable) -> None:
        """Simulation: every partition's profile is derived (``strategies/node_profiles.py``);
        no node is asked, and every virtual node is always connected."""
        self.table, self.online = table, None

    def attach(self, send: Sender, timeout: float) -> None:
        """Deployment: nodes are asked for their profile when first sampled or evaluated, through
        ``send`` (which waits up to ``timeout`` seconds and reports who it is waiting for)."""
        self._send, self._query_timeout = send, timeout

    def profile_of(self, node: int) -> NodeProfile | None:
        if node in self.profiles:
            return self.profiles[node]
        row = self.table.row(node) if self.table is not None else None
        return None if row is None else self.table.profile(row)  # type: ignore[union-attr]

    def refresh(self, grid: Grid) -> None:
        """Before a round: which nodes are connected now (a deployment; a simulation's nodes
        never leave). Only connected nodes are sampled, so a node that died stops being sent work
        once the SuperLink marks it offline, and a node that (re)joins is asked for its profile
        when first sampled (a restarted node may come back under a new node id; its partition
        then moves to the new id)."""
        self._discoveries += 1
        if self.table is None:
            self.online = set(grid.get_node_ids())

    def known_profiles(self, nodes: Iterable[int]) -> tuple[list[NodeProfile], RoundStats]:
        """The profiles of ``nodes``; in a deployment the ones not known yet are asked now (those
        that fail are left out and asked again only ``RETRY_DISCOVERY`` rounds later)."""
        nodes = list(nodes)
        stats = RoundStats()
        unknown = [n for n in nodes if self.profile_of(n) is None and self._retry_at.get(n, 0) <= self._discoveries]
        if unknown and self._send is not None:
            stats = self._query(unknown, self._send)
        found = [self.profile_of(n) for n in nodes]
        return [p for p in found if p is not None], stats

    def _query(self, unknown: list[int], send: Sender) -> RoundStats:
        """Ask ``unknown`` for their profiles; malformed or conflicting replies are rejected."""
        stats = RoundStats()
        if not unknown:
            return stats
        messages = {n: protocol.query_message(self.task_json, n) for n in unknown}
        replies = send(list(messages.values()))
        # As in collect_valid: the SuperLink answers for an unreachable node under its own id.
        addressee = {m.metadata.message_id: n for n, m in messages.items() if m.metadata.message_id}
        for node in unknown:
            self._retry_at[node] = self._discoveries + RETRY_DISCOVERY
        answered: set[int] = set()
        for reply in replies:
            node = addressee.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                stats.failures += 1
                stats.problems.append(f"node {node}: profile query failed: {reply.error.reason}")
                continue
            try:
                profile = protocol.profile_from_record(reply.content.config_records[protocol.PROFILE], node)
                holders = [n for n, q in self.profiles.items() if q.partition_id == profile.partition_id]
                if any(n in self.online for n in holders) if self.online is not None else holders:
                    raise ValueError(f"partition-id {profile.partition_id} is already taken by another connected node")
                for stale in holders:  # the partition's previous node is gone
                    del self.profiles[stale]
                self.profiles[node] = profile
                self._retry_at.pop(node, None)
            except (KeyError, TypeError, ValueError, OverflowError) as err:
                stats.rejected += 1
                stats.problems.append(f"node {node}: malformed profile reply ({err})")
        silent = [n for n in unknown if n not in answered]
        stats.failures += len(silent)
        stats.problems.extend(f"node {n}: no profile reply before the deadline" for n in silent)
        for problem in stats.problems:
            log.warning(problem)
        return stats

    def _sample_size(self, available: int) -> int:
        """``fraction-train`` of ``available`` nodes, at least ``min-train-clients``, at most all."""
        return min(available, max(self.min_train_clients, int(round(self.fraction_train * available))))

    def sample(self, eligible: Callable[[NodeProfile], bool] | None = None) -> list[NodeProfile]:
        """A seeded sample of the connected, ``eligible`` nodes that hold training data, in
        partition order: ``fraction-train`` of them, at least ``min-train-clients``.

        Simulation: drawn from the derived profile table (numpy; no per-node objects). Deployment:
        drawn from the connected nodes whose profile is known or not yet asked; the drawn unknown
        ones are asked now (lazily) and those that turn out ineligible or fail are left out of
        this round. Once every node is known both draw exactly the same way.
        """
        if self.table is not None:
            rows = np.flatnonzero(self.table.eligible(eligible))
            count = self._sample_size(len(rows))
            if count == 0:
                return []
            picked = self.rng.choice(len(rows), size=count, replace=False)
            return [self.table.profile(int(rows[i])) for i in sorted(picked)]
        known = sorted(
            (
                p
                for p in self.profiles.values()
                if (eligible is None or eligible(p)) and p.num_examples != 0 and (self.online is None or p.node_id in self.online)
            ),
            key=lambda p: p.partition_id,
        )
        unknown: list[int] = []
        if self._send is not None and self.online is not None:
            unknown = sorted(n for n in self.online if n not in self.profiles and self._retry_at.get(n, 0) <= self._discoveries)
        pool: list[NodeProfile | int] = [*known, *unknown]
        if not pool:
            return []
        count = self._sample_size(len(pool))
        drawn = [pool[i] for i in sorted(self.rng.choice(len(pool), size=count, replace=False))]
        asked = [n for n in drawn if isinstance(n, int)]
        if asked:
            _, stats = self.known_profiles(asked)
            self.query_stats.append(stats)
        chosen = [p if isinstance(p, NodeProfile) else self.profiles.get(p) for p in drawn]
        return sorted(
            (p for p in chosen if p is not None and (eligible is None or eligible(p)) and p.num_examples != 0),
            key=lambda p: p.partition_id,
        )

    # ------------------------------------------------------------------ replies
    def collect_valid(
        self,
        server_round: int,
        replies: Iterable[Message],
        expected: dict[int, dict[str, TensorSpec]],
        stats: RoundStats,
    ) -> list[tuple[NodeProfile, Mapping[str, Entry], int, MetricRecord]]:
        """Validate replies; bad ones are logged with the node/partition and counted, not used."""
        valid: list[tuple[NodeProfile, Mapping[str, Entry], int, MetricRecord]] = []
        # Error replies the SuperLink makes for an unreachable node carry the SuperLink's id as
        # source; the id of the instruction they answer names the node.
        addressee = {m.metadata.message_id: n for n, m in self._outbox.items() if m.metadata.message_id}
        self._outbox = {}
        for msg in replies:
            stats.replies += 1
            node = addressee.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            profile = self.profile_of(node)
            who = f"node {node}" + (f" (partition {profile.partition_id})" if profile else "")
            sent = expected.pop(node, None)
            if msg.has_error():
                stats.failures += 1
                stats.problems.append(f"round {server_round}: {who} failed: {msg.error.reason}")
                continue
            try:
                if sent is None or profile is None:
                    raise ReplyRejected("reply from a node that was not sent work this round (or a duplicate)")
                if protocol.ARRAYS not in msg.content.array_records:
                    raise ReplyRejected(f"reply has no '{protocol.ARRAYS}' record")
                record = msg.content.array_records[protocol.ARRAYS]
                stats.bytes_up += record_bytes(record)
                try:
                    arrays = unpack(record)
                except ValueError as err:
                    raise ReplyRejected(f"malformed tensors: {err}") from None
                tensors: Mapping[str, Entry]
                if is_sparse_reply(arrays):  # kept entries of masked weights (+ packed dense tensors)
                    try:
                        tensors = sparse_from_arrays(arrays, sent)
                    except ValueError as err:
                        raise ReplyRejected(str(err)) from None
                    stats.sparse_replies += 1
                else:
                    tensors = validate_arrays(arrays, sent)
                check_magnitudes(tensors, self.magnitude_bounds())
                num_examples = reply_num_examples(msg, profile.num_examples)
                claimed = msg.content.metric_records[protocol.METRICS].get("partition-id")
                if claimed is not None and claimed != profile.partition_id:  # e.g. a derived node-to-partition map gone wrong
                    raise ReplyRejected(f"reply is for partition {claimed!r}, but the node holds partition {profile.partition_id}")
            except ReplyRejected as err:
                stats.rejected += 1
                stats.problems.append(f"round {server_round}: rejected reply from {who}: {err}")
                continue
            valid.append((profile, tensors, num_examples, msg.content.metric_records[protocol.METRICS]))
        stats.failures += len(expected)  # sent work, no reply before the timeout
        for node in expected:
            profile = self.profile_of(node)
            who = f"node {node}" + (f" (partition {profile.partition_id})" if profile else "")
            stats.problems.append(f"round {server_round}: {who} did not reply in time")
        for problem in stats.problems:
            log.warning(problem)
        valid.sort(key=lambda item: item[0].partition_id)  # deterministic aggregation order
        return valid

    def magnitude_bounds(self) -> dict[str, float]:
        """Per-key bound on |value| of a reply, from the global model sent this round (cached)."""
        current, bounds = self._bounds
        if current is not self._current:
            bounds = {}
            for key, value in unpack(self._current).items():
                if np.issubdtype(value.dtype, np.floating):
                    bounds[key] = magnitude_bound(float(np.abs(value).max()) if value.size else 0.0)
            self._bounds = (self._current, bounds)
        return bounds

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """What a resumed run needs to sample and assign exactly as the uninterrupted one: the
        sampling generator's state and counters (JSON-serialisable). Profiles are not saved: they
        are asked again from the nodes (node ids change between processes; partitions do not)."""
        return {"rng": self.rng.bit_generator.state, "discoveries": self._discoveries}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]  # in place: schedulers share this generator
        self._discoveries = int(state["discoveries"])

    # ------------------------------------------------------------------ client-side evaluation: off
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
