"""Profiles without a message per node: derived in simulation, asked lazily in a deployment."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from server.federation import run_federation, simulation_node_ids
from server.waiting import send_and_wait
from splitmix.data import client_train_data, partition_sizes
from splitmix.node_config import NodeConfig
from splitmix.profiles import profile_of_node
from splitmix.protocol import NodeProfile
from strategies.node_profiles import ProfileTable, derive_profiles
from strategies.splitmix import SplitMixStrategy
from tests.unit.test_strategy import SPEC


@pytest.mark.parametrize(
    "overrides",
    [
        "num-clients=13 adv-fraction=0.3 budgets='8-4-8d3-1'",
        "num-clients=9 partition=dirichlet dirichlet-alpha=0.3 adv-fraction=0.5 sparse-method=dynamic sparse-fraction=0.4",
    ],
)
def test_derived_profiles_are_what_each_node_would_report(tiny_config, overrides):
    """Every partition's derived profile equals the one its node computes from its node config
    (budget, adversarial, sparse) and its training data (example count)."""
    cfg = tiny_config(overrides)
    task = cfg.client_task()
    n = cfg.federation.num_clients
    ids = [10_000 + 7 * p for p in range(n)]
    table = derive_profiles(task, ids, partition_sizes(task.data).train)
    for p in range(n):
        node = profile_of_node(NodeConfig(p), n, task.budgets, task.adv_fraction, task.seed, task.sparse_fraction)
        expected = NodeProfile(p, node.budget, node.adversarial, node.sparse, len(client_train_data(task.data, p)), ids[p])
        assert table.profile(p) == expected
        assert table.row(ids[p]) == p
    assert table.row(3) is None
    assert 0 < int(table.adversarial.sum()) < n  # both kinds present: the comparison above means something


def test_simulation_node_order_is_flowers_registration_order():
    """Flower's Simulation Engine registers partition i as the i-th node; the in-memory grid lists
    nodes in that order (what ``simulation_node_ids`` relies on; a Flower upgrade that breaks it
    fails here)."""
    from flwr.server.superlink.fleet.vce.vce_api import (
        FLWR_IN_MEMORY_DB_NAME,
        LinkStateFactory,
        NoOpFederationManager,
        ObjectStoreFactory,
        _register_nodes,
    )
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(50, factory)
    by_partition = sorted(mapping, key=mapping.__getitem__)
    assert simulation_node_ids(InMemoryGrid(factory)) == by_partition
    assert by_partition != sorted(by_partition)  # node ids are random: the order is not theirs


def test_simulation_start_sends_no_profile_query(tmp_path, in_process_grid, tiny_config):
    """The run derives every profile: the only messages are the sampled clients' work."""
    cfg = tiny_config(f"num-clients=8 fraction-train=0.5 num-rounds=2 eval-every=5 out-dir='{tmp_path}' run-name=q")
    grid = in_process_grid(8)
    run_federation(grid, cfg)
    kinds = [m.metadata.message_type for m in grid.sent]
    assert "query" not in kinds
    assert kinds.count("train") == 2 * 4  # 2 rounds × 4 sampled clients
    assert kinds.count("evaluate") == 8  # the final evaluation, every client


def test_eval_clients_evaluates_a_fixed_seeded_sample(tmp_path, in_process_grid, tiny_config):
    cfg = tiny_config(f"num-clients=8 num-rounds=2 eval-clients=3 out-dir='{tmp_path}' run-name=e")
    grid = in_process_grid(8)
    run_federation(grid, cfg)
    evaluated = [[m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "evaluate"][i : i + 3] for i in (0, 3)]
    assert len(set(evaluated[0])) == 3 and evaluated[0] == evaluated[1]  # the same 3 clients in both rounds


def _table(num_examples: list[int]) -> ProfileTable:
    n = len(num_examples)
    return ProfileTable(np.arange(100, 100 + n, dtype=np.uint64), np.full(n, 0.5), np.zeros(n, bool), np.zeros(n, bool), np.asarray(num_examples))


def test_clients_without_training_data_are_never_sampled():
    strategy = SplitMixStrategy(SPEC, "{}", fraction_train=1.0, min_train_clients=1, seed=0, lr_at_round=lambda r: 0.1)
    strategy.use_table(_table([5, 0, 3, 0, 0, 8]))
    assert [p.partition_id for p in strategy.sample()] == [0, 2, 5]


def test_table_sampling_draws_as_the_per_node_sampling_did():
    """Same seed, same eligible nodes: the numpy table draws the same clients as the per-node
    profiles (so runs, checkpoints and results/ made before stay comparable)."""
    sizes = [4, 6, 2, 9, 3, 5, 7, 1, 8, 2]
    a = SplitMixStrategy(SPEC, "{}", fraction_train=0.3, min_train_clients=2, seed=3, lr_at_round=lambda r: 0.1)
    b = SplitMixStrategy(SPEC, "{}", fraction_train=0.3, min_train_clients=2, seed=3, lr_at_round=lambda r: 0.1)
    table = _table(sizes)
    a.use_table(table)
    b.profiles = {int(table.node_ids[p]): table.profile(p) for p in range(len(sizes))}
    for _ in range(5):
        assert a.sample() == b.sample()


def test_a_deployment_asks_only_the_nodes_it_samples():
    """100 connected nodes, 10 % sampled: only the drawn ones are asked, each once (cached)."""
    asked: list[int] = []

    def send(messages: list[Message]) -> list[Message]:
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            asked.append(node)
            record = ConfigRecord({"partition-id": node - 1000, "budget": 0.5, "adversarial": False, "num-examples": 5})
            out.append(Message(RecordDict({"profile": record}), reply_to=m))
        return out

    class Grid:
        def get_node_ids(self):
            return list(range(1000, 1100))

    strategy = SplitMixStrategy(SPEC, "{}", fraction_train=0.1, min_train_clients=2, seed=0, lr_at_round=lambda r: 0.1)
    strategy.attach(send, timeout=1.0)
    strategy.refresh(Grid())
    first = strategy.sample()
    assert len(first) == 10 and sorted(asked) == sorted(p.node_id for p in first)
    for _ in range(3):
        strategy.refresh(Grid())
        strategy.sample()
    assert len(asked) == len(set(asked)) and 10 < len(asked) <= 40  # never the same node twice, never all 100


def test_a_deployment_evaluates_nodes_whose_ids_use_all_64_bits(tiny_config):
    """Flower's node ids are unsigned 64-bit: the eval-clients sample of connected nodes keeps
    ids ≥ 2⁶³ (an int64 array raised OverflowError and failed the run at its first evaluation)."""
    from types import SimpleNamespace

    from server.federation import Federation

    ids = [2**64 - 1, 2**63 + 5, 7]

    def send(messages: list[Message]) -> list[Message]:
        record = lambda m: ConfigRecord({"partition-id": ids.index(m.metadata.dst_node_id), "budget": 1.0, "adversarial": False, "num-examples": 5})  # noqa: E731
        return [Message(RecordDict({"profile": record(m)}), reply_to=m) for m in messages]

    class Grid:
        def get_node_ids(self):
            return ids

    strategy = SplitMixStrategy(SPEC, "{}", fraction_train=1.0, min_train_clients=1, seed=0, lr_at_round=lambda r: 0.1)
    strategy.attach(send, timeout=1.0)
    strategy.refresh(Grid())
    fed = SimpleNamespace(strategy=strategy, cfg=tiny_config("num-clients=3 eval-clients=2"), _record_queries=lambda problems: None)
    fed._eval_sample = lambda candidates: Federation._eval_sample(fed, candidates)
    picked = Federation.nodes(fed)
    assert len(picked) == 2 and {p.node_id for p in picked} < set(ids)
    assert [p.partition_id for p in picked] == sorted(ids.index(p.node_id) for p in picked)


def test_reply_for_another_partition_is_rejected():
    """A derived node-to-partition map gone wrong shows: the reply names another partition."""
    strategy = SplitMixStrategy(SPEC, "{}", fraction_train=1.0, min_train_clients=1, seed=0, lr_at_round=lambda r: 0.1)
    strategy.use_table(_table([5, 5]))
    from models.splitmix import init_global_state
    from splitmix.protocol.codec import to_record
    from tests.unit.test_strategy import reply_with

    messages = list(strategy.configure_train(1, to_record(init_global_state(SPEC, seed=0)), None, None))
    replies = [reply_with(m, 0.0, 5, drop_adv=True) for m in messages]
    replies[1].content.metric_records["metrics"] = MetricRecord({"num-examples": 5, "loss": 1.0, "train-time": 0.1, "partition-id": 0})
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["valid"] == 1 and metrics["rejected"] == 1
    assert "partition 0, but the node holds partition 1" in strategy.last_round.problems[0]


class SlowGrid:
    """Answers message ``i`` only from its ``delays[i]``-th pull on (never when None)."""

    def __init__(self, delays):
        self.delays, self.pulls, self.messages = delays, 0, {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.messages[f"m{i}"] = (m, self.delays[i])
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in ids:
            m, delay = self.messages[mid]
            if delay is not None and self.pulls >= delay:
                out.append(Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=m))
        return out


def test_waiting_names_the_nodes_it_waits_for(monkeypatch):
    import server.waiting

    monkeypatch.setattr(server.waiting, "PROGRESS_EVERY", 0.0)  # a progress line at every poll
    lines: list[str] = []
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8)]
    replies = send_and_wait(SlowGrid([1, 4]), messages, timeout=600.0, say=lines.append, what="train round 1")
    assert len(replies) == 2  # the slow node's reply came on the 4th pull, long before the deadline
    assert lines and all(line.startswith("train round 1: 1/2 replied; waiting up to") and line.endswith("for node 8") for line in lines)


def test_waiting_gives_up_at_the_deadline():
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8)]
    replies = send_and_wait(SlowGrid([1, None]), messages, timeout=0.2, say=lambda _: None, what="w")
    assert len(replies) == 1
