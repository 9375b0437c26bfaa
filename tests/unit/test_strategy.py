"""Split-Mix strategy: per-base aggregation by hand, even base assignment, reply validation."""

from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, Message, MetricRecord, RecordDict

from models.splitmix import SplitMixSpec, init_global_state, is_adversarial_tensor, parse_base_key
from splitmix.protocol import NodeProfile
from splitmix.protocol.codec import to_record, unpack
from strategies.base import ReplyRejected, TensorSpec, validate_arrays
from strategies.splitmix import BaseScheduler, SplitMixStrategy

SPEC = SplitMixSpec(atom_width=0.25)  # 4 bases keeps the toy small


def make_strategy(profiles):
    strategy = SplitMixStrategy(SPEC, "{}", fraction_train=1.0, min_train_clients=1, seed=0, lr_at_round=lambda r: 0.1)
    strategy.profiles = {p.node_id: p for p in profiles}
    return strategy


def reply_with(msg: Message, fill: float, num_examples: int, drop_adv: bool, change=None) -> Message:
    """A reply of ``fill`` everywhere; ``change`` edits the tensors (a dict) before packing."""
    tensors = {}
    for key, array in unpack(msg.content["arrays"]).items():
        if drop_adv and is_adversarial_tensor(parse_base_key(key)[1]):
            continue
        tensors[key] = np.full(array.shape, fill, dtype=array.dtype)
    if change is not None:
        change(tensors)
    arrays = to_record(tensors)
    metrics = MetricRecord({"num-examples": num_examples, "loss": 1.0, "train-time": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def test_per_base_aggregation_matches_hand_computation():
    profiles = [
        NodeProfile(node_id=11, partition_id=0, budget=0.25, adversarial=False, num_examples=10),  # 1 base
        NodeProfile(node_id=12, partition_id=1, budget=0.5, adversarial=True, num_examples=30),  # 2 bases
        NodeProfile(node_id=13, partition_id=2, budget=0.5, adversarial=False, num_examples=60),  # 2 bases
    ]
    strategy = make_strategy(profiles)
    initial = to_record(init_global_state(SPEC, seed=0))
    messages = list(strategy.configure_train(1, initial, None, None))
    assert len(messages) == 3
    fills = {11: 1.0, 12: 2.0, 13: 4.0}
    sizes = {11: 10, 12: 30, 13: 60}
    replies = [reply_with(m, fills[m.metadata.dst_node_id], sizes[m.metadata.dst_node_id], drop_adv=m.metadata.dst_node_id != 12) for m in messages]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["valid"] == 3 and metrics["rejected"] == 0

    for key, value in unpack(new).items():
        base, name = parse_base_key(key)
        holders = [n for n, bases in strategy.assignments.items() if base in bases]
        if is_adversarial_tensor(name):
            holders = [n for n in holders if n == 12]  # only the adversarial client trained adv BN
        if not holders:  # nobody trained it: unchanged
            np.testing.assert_array_equal(value, unpack(initial)[key])
            continue
        expected = sum(fills[n] * sizes[n] for n in holders) / sum(sizes[n] for n in holders)
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    trained = {b for bases in strategy.assignments.values() for b in bases}
    assert len(trained) >= 2


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_per_base_aggregation_over_the_clients_that_trained_each_base(aggregation):
    profiles = [
        NodeProfile(node_id=11, partition_id=0, budget=0.25, adversarial=False, num_examples=10),  # 1 base
        NodeProfile(node_id=12, partition_id=1, budget=0.5, adversarial=True, num_examples=30),  # 2 bases
        NodeProfile(node_id=13, partition_id=2, budget=0.5, adversarial=False, num_examples=60),  # 2 bases
    ]
    strategy = make_strategy(profiles)
    strategy.aggregation, strategy.trim_fraction = aggregation, 0.34  # ≤ 3 holders: the median
    initial = to_record(init_global_state(SPEC, seed=0))
    messages = list(strategy.configure_train(1, initial, None, None))
    fills = {11: 1.0, 12: 2.0, 13: 40.0}
    sizes = {11: 10, 12: 30, 13: 60}
    replies = [reply_with(m, fills[m.metadata.dst_node_id], sizes[m.metadata.dst_node_id], drop_adv=m.metadata.dst_node_id != 12) for m in messages]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["valid"] == 3
    for key, value in unpack(new).items():
        base, name = parse_base_key(key)
        holders = [n for n, bases in strategy.assignments.items() if base in bases]
        if is_adversarial_tensor(name):
            holders = [n for n in holders if n == 12]
        if not holders:
            np.testing.assert_array_equal(value, unpack(initial)[key])  # untouched: its previous value
            continue
        np.testing.assert_allclose(value, float(np.median([fills[n] for n in holders])), rtol=1e-6)


def test_bad_replies_are_rejected_and_the_aggregate_ignores_them():
    profiles = [NodeProfile(node_id=20 + i, partition_id=i, budget=0.25, adversarial=True, num_examples=10) for i in range(4)]
    strategy = make_strategy(profiles)
    initial = to_record(init_global_state(SPEC, seed=0))
    messages = list(strategy.configure_train(1, initial, None, None))
    good = [reply_with(m, 1.0 + i, 10, drop_adv=False) for i, m in enumerate(messages)]

    def missing_key(msg):
        return reply_with(msg, 9.0, 10, drop_adv=False, change=lambda t: t.pop(next(iter(t))))

    def wrong_shape(msg):
        return reply_with(msg, 9.0, 10, drop_adv=False, change=lambda t: t.update({next(iter(t)): np.zeros((3, 3), dtype=np.float32)}))

    def with_nan(msg):
        return reply_with(msg, 9.0, 10, drop_adv=False, change=lambda t: t[next(iter(t))].flat.__setitem__(0, np.nan))

    # Baseline: only the first message's client replies, validly.
    strategy_a = make_strategy(profiles)
    msgs_a = list(strategy_a.configure_train(1, initial, None, None))
    reference, _ = strategy_a.aggregate_train(1, [reply_with(msgs_a[0], 1.0, 10, drop_adv=False)])

    bad = [missing_key(messages[1]), wrong_shape(messages[2]), with_nan(messages[3])]
    new, metrics = strategy.aggregate_train(1, [good[0], *bad])
    assert metrics["rejected"] == 3 and metrics["valid"] == 1
    for key, value in unpack(new).items():
        np.testing.assert_array_equal(value, unpack(reference)[key])


def test_round_below_minimum_keeps_global_model():
    profiles = [NodeProfile(node_id=30 + i, partition_id=i, budget=0.25, adversarial=False, num_examples=5) for i in range(2)]
    strategy = make_strategy(profiles)
    strategy.min_train_clients = 2
    initial = to_record(init_global_state(SPEC, seed=0))
    messages = list(strategy.configure_train(1, initial, None, None))
    new, metrics = strategy.aggregate_train(1, [reply_with(messages[0], 1.0, 5, drop_adv=True)])
    assert new is None and metrics["round-failed"] == 1 and metrics["failures"] == 1


def test_failed_client_counts_as_failure():
    from flwr.app import Error

    profiles = [NodeProfile(node_id=40 + i, partition_id=i, budget=0.25, adversarial=False, num_examples=5) for i in range(2)]
    strategy = make_strategy(profiles)
    messages = list(strategy.configure_train(1, to_record(init_global_state(SPEC, seed=0)), None, None))
    error = Message(Error(code=0, reason="boom"), reply_to=messages[1])
    _, metrics = strategy.aggregate_train(1, [reply_with(messages[0], 1.0, 5, drop_adv=True), error])
    assert metrics["failures"] == 1 and metrics["valid"] == 1


def test_validate_arrays_names_the_problem():
    arrays = unpack(to_record({"base0.w": np.ones((2, 2), dtype=np.float32)}))  # read-only views
    specs = {"base0.w": TensorSpec((2, 2), "float32")}
    checked = validate_arrays(arrays, specs)["base0.w"]
    assert torch.equal(checked, torch.ones(2, 2))
    checked += 1  # writable: a copy, not the received buffer
    assert arrays["base0.w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ReplyRejected, match="dtype float64, expected float32"):
        validate_arrays({"base0.w": np.ones((2, 2), dtype=np.float64)}, specs)
    with pytest.raises(ReplyRejected, match="shape"):
        validate_arrays({"base0.w": np.ones((4,), dtype=np.float32)}, specs)
    with pytest.raises(ReplyRejected, match="unexpected"):
        validate_arrays({**arrays, "base0.x": np.ones(1, dtype=np.float32)}, specs)
    with pytest.raises(ReplyRejected, match="missing"):
        validate_arrays({}, specs)


def test_base_assignment_is_even_over_rounds():
    """Over many rounds, every base is trained about equally often by every budget level."""
    rng = np.random.default_rng(0)
    scheduler = BaseScheduler(8, rng)
    budgets = [1, 2, 4, 8] * 5  # k bases per client: 20 clients, 4 budget levels
    counts = Counter()
    for _ in range(400):
        for k in budgets:
            for b in scheduler.assign(k):
                counts[(k, b)] += 1
    for k in (1, 2, 4, 8):
        per_base = np.array([counts[(k, b)] for b in range(8)])
        assert per_base.sum() == 400 * 5 * k
        # 2000 assignments per level = 250 full cycles: exactly even for every base and budget
        assert (per_base == per_base[0]).all(), (k, per_base)
    # The first base follows a shuffled cycle: each run of 8 first picks covers all 8 bases,
    # and the order differs between cycles.
    scheduler = BaseScheduler(8, np.random.default_rng(1))
    firsts = [scheduler.assign(1)[0] for _ in range(64)]
    for start in range(0, 64, 8):
        assert sorted(firsts[start : start + 8]) == list(range(8))
    assert firsts[:8] != firsts[8:16]
    # Partial rounds stay within one assignment of even at any time.
    scheduler = BaseScheduler(8, np.random.default_rng(2))
    seen = Counter(b for _ in range(13) for b in scheduler.assign(3))
    assert max(seen.values()) - min(seen.values()) <= 3


def test_assigned_bases_are_distinct_and_sent_alone():
    profiles = [NodeProfile(node_id=50, partition_id=0, budget=0.75, adversarial=True, num_examples=5)]
    strategy = make_strategy(profiles)
    initial = to_record(init_global_state(SPEC, seed=0))
    (msg,) = strategy.configure_train(1, initial, None, None)
    bases = list(msg.content["config"]["bases"])
    assert len(bases) == 3 and len(set(bases)) == 3
    sent = {parse_base_key(k)[0] for k in unpack(msg.content["arrays"])}
    assert sent == set(bases)


def test_replies_with_bad_metrics_or_forged_payloads_are_rejected():
    profiles = [NodeProfile(node_id=60 + i, partition_id=i, budget=0.25, adversarial=True, num_examples=10) for i in range(4)]
    strategy = make_strategy(profiles)
    messages = list(strategy.configure_train(1, to_record(init_global_state(SPEC, seed=0)), None, None))

    too_many = reply_with(messages[0], 1.0, 10**9, drop_adv=False)  # claims more data than it has
    no_loss = reply_with(messages[1], 1.0, 10, drop_adv=False)
    del no_loss.content["metrics"]["loss"]
    forged = reply_with(messages[2], 1.0, 10, drop_adv=False)  # its index names a dtype outside the allow-list
    packed = forged.content["arrays"]["packed"]
    data = packed.data.replace(b'"float32"', b'"float31"', 1)
    forged.content["arrays"]["packed"] = Array(dtype="uint8", shape=packed.shape, stype=packed.stype, data=data)
    good = reply_with(messages[3], 1.0, 10, drop_adv=False)

    _, metrics = strategy.aggregate_train(1, [too_many, no_loss, forged, good])
    assert metrics["rejected"] == 3 and metrics["valid"] == 1
    problems = " ".join(strategy.last_round.problems)
    assert "exceeds the 10 examples" in problems and "'loss'" in problems
    assert "malformed tensors: tensor 'base" in problems and "unknown dtype 'float31'" in problems


def test_discovery_rejects_impossible_profiles(ask_connected):
    from flwr.app import ConfigRecord

    strategy = make_strategy([])

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout=None):
            profiles = {1: (0, 0.5), 2: (0, 0.25), 3: (1, float("nan"))}  # node 2 reuses partition 0
            out = []
            for m in messages:
                pid, budget = profiles[m.metadata.dst_node_id]
                record = ConfigRecord({"partition-id": pid, "budget": budget, "adversarial": False, "num-examples": 5})
                out.append(Message(RecordDict({"profile": record}), reply_to=m))
            return out

    stats = ask_connected(strategy, Grid())
    assert set(strategy.profiles) == {1} and stats.rejected == 2


def test_discovery_survives_absurd_numbers_and_does_not_requery_every_round(ask_connected):
    from flwr.app import ConfigRecord

    strategy = make_strategy([])
    asked: list[int] = []

    class Grid:
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                node = m.metadata.dst_node_id
                asked.append(node)
                examples = 5 if node == 1 else float("inf")  # node 2 claims infinitely many examples
                record = ConfigRecord({"partition-id": node - 1, "budget": 0.5, "adversarial": False, "num-examples": examples})
                out.append(Message(RecordDict({"profile": record}), reply_to=m))
            return out

    stats = ask_connected(strategy, Grid())
    assert set(strategy.profiles) == {1} and stats.rejected == 1 and "num-examples" in stats.problems[0]
    for _ in range(4):  # the next rounds do not wait on the broken node again ...
        ask_connected(strategy, Grid())
    assert asked == [1, 2]
    ask_connected(strategy, Grid())  # ... until RETRY_DISCOVERY calls later
    assert asked == [1, 2, 2]
