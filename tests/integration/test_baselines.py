"""Baselines: HeteroFL slicing and its per-client (count) average by hand, FedBN keeps BN local
per width model, byte counts match what was sent."""

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from models.blocks import norm_state_keys
from models.slicing import leading_slices
from models.splitmix import SplitMixSpec, is_adversarial_tensor
from splitmix.protocol import NodeProfile
from splitmix.protocol.codec import to_record, to_tensors, unpack
from strategies.fedbn import FedBN
from strategies.heterofl import HeteroFL
from strategies.splitmix import SplitMix

SPEC = SplitMixSpec()


def reply(msg: Message, fill: float, n: int, drop_adv: bool) -> Message:
    sent = unpack(msg.content["arrays"])
    arrays = to_record({key: np.full(a.shape, fill, dtype=a.dtype) for key, a in sent.items() if not (drop_adv and is_adversarial_tensor(key))})
    metrics = MetricRecord({"num-examples": n, "loss": 1.0, "train-time": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def strategy_for(method, profiles):
    strategy = method.strategy("{}", 1.0, 1, 0, lambda r: 0.1)
    strategy.profiles = {p.node_id: p for p in profiles}
    return strategy


def test_heterofl_slices_and_per_client_average_match_hand_computation():
    method = HeteroFL(SPEC)
    profiles = [
        NodeProfile(node_id=1, partition_id=0, budget=0.25, adversarial=True, num_examples=10),
        NodeProfile(node_id=2, partition_id=1, budget=0.5, adversarial=True, num_examples=30),
        NodeProfile(node_id=3, partition_id=2, budget=1.0, adversarial=True, num_examples=60),
    ]
    strategy = strategy_for(method, profiles)
    state = method.initial_state(seed=0)
    initial = to_record(state)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, initial, None, None)}

    # Slicing: the width-0.5 client gets the leading half of conv2's output and input channels.
    sent = to_tensors(messages[2].content["arrays"])
    assert sent["conv2.weight"].shape == (64, 32, 3, 3)
    torch.testing.assert_close(sent["conv2.weight"], state["conv2.weight"][:64, :32])
    assert sent["fc2.weight"].shape == (10, 256)  # classes are never sliced

    fills, sizes = {1: 1.0, 2: 2.0, 3: 4.0}, {1: 10, 2: 30, 3: 60}
    new, metrics = strategy.aggregate_train(1, [reply(m, fills[n], sizes[n], False) for n, m in messages.items()])
    assert metrics["valid"] == 3
    w = to_tensors(new)["conv2.weight"]
    # the official combine counts clients: each holder weighs 1, whatever its number of examples
    assert float(w[0, 0, 0, 0]) == pytest.approx((1 + 2 + 4) / 3, rel=1e-6)  # held by all three slices
    assert float(w[40, 20, 0, 0]) == pytest.approx((2 + 4) / 2, rel=1e-6)  # only in the 0.5 and 1.0 slices
    assert w[100, 50, 0, 0] == 4.0  # only the full-width client
    widths = [0.25, 0.5]
    for n, _ in zip((1, 2), widths):
        block = leading_slices(tuple(to_tensors(messages[n].content["arrays"])["conv1.weight"].shape))
        assert to_tensors(new)["conv1.weight"][block].min() >= 1.0


def test_heterofl_entries_nobody_held_keep_their_value():
    method = HeteroFL(SPEC)
    strategy = strategy_for(method, [NodeProfile(node_id=1, partition_id=0, budget=0.25, adversarial=False, num_examples=5)])
    state = method.initial_state(seed=0)
    (msg,) = strategy.configure_train(1, to_record(state), None, None)
    new, _ = strategy.aggregate_train(1, [reply(msg, 3.0, 5, drop_adv=True)])
    w = to_tensors(new)
    assert (w["conv3.weight"][:64, :32] == 3.0).all()
    torch.testing.assert_close(w["conv3.weight"][64:], state["conv3.weight"][64:])
    torch.testing.assert_close(w["bn1.adv.weight"], state["bn1.adv.weight"])  # adv BN untouched


@pytest.mark.parametrize(
    "aggregation, beta, expected",
    [
        ("median", 0.1, (2.0, 3.0, 4.0)),  # median of {1, 2, 4}, of {2, 4}, of {4}
        ("trimmed-mean", 0.34, (2.0, 3.0, 4.0)),  # 1 of 3 trimmed from each end; none of 2
        ("trimmed-mean", 0.2, (7 / 3, 3.0, 4.0)),  # nothing trimmed: the unweighted mean
    ],
)
def test_heterofl_robust_aggregation_per_entry_over_the_slices_holding_it(aggregation, beta, expected):
    method = HeteroFL(SPEC)
    profiles = [
        NodeProfile(node_id=1, partition_id=0, budget=0.25, adversarial=True, num_examples=10),
        NodeProfile(node_id=2, partition_id=1, budget=0.5, adversarial=True, num_examples=30),
        NodeProfile(node_id=3, partition_id=2, budget=1.0, adversarial=True, num_examples=60),
    ]
    strategy = strategy_for(method, profiles)
    strategy.aggregation, strategy.trim_fraction = aggregation, beta
    state = method.initial_state(seed=0)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(state), None, None)}
    fills, sizes = {1: 1.0, 2: 2.0, 3: 4.0}, {1: 10, 2: 30, 3: 60}
    new, metrics = strategy.aggregate_train(1, [reply(m, fills[n], sizes[n], False) for n, m in messages.items()])
    assert metrics["valid"] == 3
    w = to_tensors(new)["conv2.weight"]
    # unweighted, unlike the example-weighted mean (3.3 and 3.33 at the first two entries)
    assert float(w[0, 0, 0, 0]) == pytest.approx(expected[0], rel=1e-6)  # held by all three slices
    assert float(w[40, 20, 0, 0]) == pytest.approx(expected[1], rel=1e-6)  # the 0.5 and 1.0 slices
    assert float(w[100, 50, 0, 0]) == expected[2]  # only the full-width client


def test_fedbn_median_keeps_batch_norm_local():
    method = FedBN(SPEC, budgets=[1.0])
    bn_keys = {f"w1/{k}" for k in norm_state_keys(SPEC.build_width(1.0))}
    profiles = [NodeProfile(node_id=i, partition_id=i, budget=1.0, adversarial=False, num_examples=5 + 100 * i) for i in range(3)]
    strategy = strategy_for(method, profiles)
    strategy.aggregation = "median"
    state = method.initial_state(seed=0)
    messages = list(strategy.configure_train(1, to_record(state), None, None))
    fills = (1.0, 2.0, 70.0)
    new, _ = strategy.aggregate_train(1, [reply(m, f, 5 + 100 * i, drop_adv=True) for i, (m, f) in enumerate(zip(messages, fills))])
    after = to_tensors(new)
    assert (after["w1/conv1.weight"] == 2.0).all()  # the median; the weighted mean would be ≈ 48
    for key in bn_keys:
        torch.testing.assert_close(after[key], state[key])


def test_fedbn_never_sends_or_overwrites_batch_norm():
    method = FedBN(SPEC, budgets=[1.0])
    bn_keys = {f"w1/{k}" for k in norm_state_keys(SPEC.build_width(1.0))}
    strategy = strategy_for(method, [NodeProfile(node_id=i, partition_id=i, budget=1.0, adversarial=False, num_examples=5) for i in range(3)])
    state = method.initial_state(seed=0)
    messages = list(strategy.configure_train(1, to_record(state), None, None))
    assert all(not (set(unpack(m.content["arrays"])) & bn_keys) for m in messages)
    new, metrics = strategy.aggregate_train(1, [reply(m, 7.0, 5, drop_adv=True) for m in messages])
    assert metrics["valid"] == 3
    after = to_tensors(new)
    for key in bn_keys:
        torch.testing.assert_close(after[key], state[key])
    assert (after["w1/conv1.weight"] == 7.0).all()


def test_fedbn_clients_keep_their_bn_across_rounds(tmp_path, in_process_grid):
    from server.federation import run_federation
    from splitmix.config import load_config

    grid = in_process_grid(4)
    cfg = load_config(
        overrides="method=fedbn fedavg-clients=all num-clients=4 num-rounds=2 local-epochs=1 adv-fraction=0 "
        f"eval-pgd-steps=0 eval-lambdas='0' out-dir='{tmp_path}'"
    )
    run_federation(grid, cfg)
    kept = [to_tensors(ctx.state.array_records["local-bn-w1"]) for ctx in grid.contexts.values()]  # the width-1 model's
    assert all(set(k) == norm_state_keys(SPEC.build_width(1.0)) for k in kept)
    # each client's BN moved away from its initial value, differently per client
    assert not torch.equal(kept[0]["bn1.clean.running_mean"], torch.zeros(64))
    assert not torch.equal(kept[0]["bn1.clean.running_mean"], kept[1]["bn1.clean.running_mean"])


def test_byte_counts_equal_the_tensors_sent_and_received():
    for method in (SplitMix(SPEC), HeteroFL(SPEC)):
        profiles = [NodeProfile(node_id=i, partition_id=i, budget=b, adversarial=i % 2 == 0, num_examples=5) for i, b in enumerate((0.125, 0.5, 1.0))]
        strategy = strategy_for(method, profiles)
        messages = list(strategy.configure_train(1, to_record(method.initial_state(0)), None, None))
        sent = sum(len(a.data) for m in messages for a in m.content["arrays"].values())
        assert strategy.last_round.bytes_down == sent
        assert all(list(m.content["arrays"].keys()) == ["packed"] for m in messages)  # one Array per message
        tensors = sum(a.nbytes for m in messages for a in unpack(m.content["arrays"]).values())
        assert tensors < sent < tensors + 120 * sum(len(unpack(m.content["arrays"])) for m in messages)  # index + padding
        replies = [reply(m, 1.0, 5, drop_adv=not p.adversarial) for m, p in zip(messages, sorted(profiles, key=lambda p: p.partition_id))]
        received = sum(len(a.data) for r in replies for a in r.content["arrays"].values())
        _, metrics = strategy.aggregate_train(1, replies)
        assert metrics["bytes-up"] == received and metrics["valid"] == 3
