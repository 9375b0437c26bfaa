"""Issue 15: the baselines' defining mechanisms and the paper's metric, each checked against a hand
computation — HeteroFL's static-BN statistics from training data only, the Scaler, masked
cross-entropy, SHeteroFL's slimmable training, FedAvg's model per width, FedBN's own-norm
evaluation, and client accuracy as the mean over clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from torch.nn import functional as F

from clients import app as client_app
from clients.recipe import per_base_loss, present_classes
from models.blocks import expand_to_bases
from models.slicing import slice_state
from server.evaluate import evaluate_on_clients, gather_bn_stats
from server.store import load_weights
from splitmix.config import load_config
from splitmix.data import ArrayData, ClientSplits, client_splits, client_train_data
from splitmix.protocol import NodeProfile, eval_key, split_size_key
from splitmix.protocol.codec import to_record, to_tensors, unpack
from strategies.heterofl import cached_slice_model
from strategies.sheterofl import SlimmableTraining

TINY = "num-clients=3 num-rounds=1 local-epochs=1 adv-fraction=0 eval-pgd-steps=0 eval-lambdas='0' batch-size=16"


def sender(grid):
    """The (messages, timeout) -> replies callable the evaluation functions send with."""
    return lambda messages, timeout: grid.send_and_receive(messages, timeout=timeout)


def _setup(method: str, extra: str = ""):
    cfg = load_config(overrides=f"{TINY} method={method} {extra}")
    method_obj = cfg.make_method()
    nodes = [NodeProfile(partition_id=i, budget=1.0, adversarial=False, node_id=1000 + i) for i in range(3)]
    return cfg, method_obj, nodes, cfg.client_task(method_obj.spec).to_json()


def test_heterofl_bn_statistics_are_pooled_moments_of_the_clients_training_splits(in_process_grid, monkeypatch):
    cfg, method, nodes, task_json = _setup("heterofl")
    state = method.initial_state(seed=0)
    grid = in_process_grid(3)
    stats = gather_bn_stats(sender(grid), nodes, method, state, task_json, timeout=600)

    # By hand: BN1 of the width-0.5 model sees conv1's output; batches of 16 in data order,
    # a lone leftover example skipped (as in training); pooled over the three clients.
    model = method.stats_models(state)["w0.5"]
    outs = []
    for p in range(3):
        x = client_train_data(cfg.data_config(), p).x
        for i in range(0, len(x), 16):
            if len(x[i : i + 16]) >= 2:
                with torch.no_grad():
                    outs.append(model.conv1(expand_to_bases(x[i : i + 16], 1)))
    z = torch.cat(outs).double()
    expected_mean = z.mean(dim=(0, 2, 3))
    expected_var = z.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(stats["w0.5"]["bn1.clean.running_mean"].double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["w0.5"]["bn1.clean.running_var"].double(), expected_var, rtol=1e-4, atol=1e-6)

    # Changing the test (and validation) inputs' distribution leaves the statistics unchanged …
    def inverted_eval(data, pid):
        s = client_splits(data, pid)
        return ClientSplits(s.train, ArrayData(1 - s.val.x, s.val.y), ArrayData(1 - s.test.x, s.test.y))

    monkeypatch.setattr(client_app, "client_splits", inverted_eval)
    again = gather_bn_stats(sender(grid), nodes, method, state, task_json, timeout=600)
    for key, value in stats["w0.5"].items():
        torch.testing.assert_close(again["w0.5"][key], value)
    # … while changing the training inputs changes them.
    monkeypatch.setattr(client_app, "client_train_data", lambda data, pid: (lambda d: ArrayData(1 - d.x, d.y))(client_train_data(data, pid)))
    moved = gather_bn_stats(sender(grid), nodes, method, state, task_json, timeout=600)
    assert not torch.allclose(moved["w0.5"]["bn1.clean.running_mean"], stats["w0.5"]["bn1.clean.running_mean"])


def test_bn_statistics_skip_a_malformed_reply():
    """Node 1000 sends moments (sum 2, 4; sum of squares 6, 20; count 2), node 1001 a truncated
    packed buffer: the statistics are node 1000's alone — mean (1, 2), unbiased variance
    ((6 − 2·1²)/1, (20 − 2·2²)/1) = (4, 12) — and the run is not stopped."""
    from flwr.app import Array, ArrayRecord

    _, method, nodes, task_json = _setup("heterofl")
    moments = {"w1/bn.sum": torch.tensor([2.0, 4.0], dtype=torch.float64), "w1/bn.sumsq": torch.tensor([6.0, 20.0], dtype=torch.float64)}
    good = to_record({**moments, "w1/bn.count": torch.tensor(2.0, dtype=torch.float64)})
    data = good["packed"].data[:-3]
    bad = ArrayRecord({"packed": Array(dtype="uint8", shape=(len(data),), stype=good["packed"].stype, data=data)})

    def send(messages, timeout):
        assert [m.metadata.dst_node_id for m in messages] == [1000, 1001] and timeout == 5
        return [Message(RecordDict({"arrays": arrays}), reply_to=m) for m, arrays in zip(messages, (good, bad))]

    stats = gather_bn_stats(send, nodes[:2], method, {}, task_json, timeout=5)
    assert {k: v.tolist() for k, v in stats["w1"].items()} == {"bn.running_mean": [1.0, 2.0], "bn.running_var": [4.0, 12.0]}


def test_heterofl_evaluates_with_the_gathered_statistics():
    cfg, method, _, _ = _setup("heterofl")
    state = method.initial_state(seed=0)
    fake = {"w0.25": {"bn1.clean.running_mean": torch.full((16,), 3.0), "bn1.clean.running_var": torch.full((16,), 4.0)}}
    model = method.eval_model(method.with_bn_stats(state, fake), 0.25, 0.0)
    assert torch.equal(model.bn1.clean.running_mean, torch.full((16,), 3.0))
    assert torch.equal(model.bn1.clean.running_var, torch.full((16,), 4.0))
    with pytest.raises(KeyError, match="no BN statistics"):
        method.eval_model(state, 0.25, 0.0)  # static BN without gathered statistics: an error, never test data


def test_scaler_divides_hidden_outputs_by_the_width_in_training_only():
    cfg, method, _, _ = _setup("heterofl")
    plain, scaled = method.spec.build_width(0.5), cached_slice_model(method.spec, 0.5, True)
    scaled.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 8, 8)
    for model in (plain, scaled):
        model.train()
    torch.testing.assert_close(scaled.conv1(x), plain.conv1(x) / 0.5)
    h = torch.rand(4, plain.fc2.in_features) if hasattr(plain.fc2, "in_features") else None
    if h is not None:
        torch.testing.assert_close(scaled.fc2(h), plain.fc2(h))  # the classifier is not scaled
    scaled.eval()
    torch.testing.assert_close(scaled.conv1(x), plain.conv1(x))


def test_masked_cross_entropy_gives_absent_classes_no_gradient():
    logits = torch.randn(6, 1, 10, requires_grad=True)
    y = torch.tensor([0, 1, 1, 3, 3, 3])
    present = present_classes(y, 10)
    assert present.tolist() == [True, True, False, True] + [False] * 6
    per_base_loss(logits, y, present).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, :, ~present] == 0)
    assert torch.all(logits.grad[:, :, present].abs().sum(dim=(0, 1)) > 0)


def test_sheterofl_adds_the_loss_of_every_narrower_width_on_the_shared_slices():
    cfg, method, _, _ = _setup("sheterofl")
    model = cached_slice_model(method.spec, 0.5, True)
    model.train()
    narrow = cached_slice_model(method.spec, 0.25, True)
    hook = SlimmableTraining([(0.25, narrow)])
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = hook.extra_loss(model, x, y)
    # By hand: the width-0.25 network holding the leading slices of the width-0.5 parameters.
    by_hand = method.spec.build_width(0.25)
    by_hand.load_state_dict(slice_state(model.state_dict(), {k: tuple(v.shape) for k, v in by_hand.state_dict().items()}), strict=False)
    from models.scaler import attach_scaler

    attach_scaler(by_hand, 0.25)
    by_hand.train()
    torch.testing.assert_close(loss, F.cross_entropy(by_hand(x), y))
    model.zero_grad()
    loss.backward()
    grad = model.conv1.weight.grad
    assert grad is not None and grad[:16].abs().sum() > 0 and grad[16:].abs().sum() == 0  # only the 0.25 slice


def test_sheterofl_client_trains_every_affordable_width_on_every_batch(in_process_grid, monkeypatch):
    from strategies import sheterofl

    calls = []
    real = sheterofl.functional_call
    monkeypatch.setattr(sheterofl, "functional_call", lambda m, p, args: calls.append(p["conv1.weight"].shape[0]) or real(m, p, args))
    cfg, method, nodes, task_json = _setup("sheterofl")
    strategy = method.strategy(task_json, 1.0, 1, 0, lambda r: 0.05)
    strategy.profiles = {1000: NodeProfile(partition_id=0, budget=0.5, adversarial=False, node_id=1000, num_examples=20)}
    (msg,) = strategy.configure_train(1, to_record(method.initial_state(0)), None, None)
    assert list(msg.content["config"]["slim-widths"]) == [0.125, 0.25, 0.5]
    reply = in_process_grid(3).send_and_receive([msg])[0]
    steps = int(reply.content["metrics"]["steps"])
    assert steps > 0 and sorted(calls) == sorted([8] * steps + [16] * steps)  # widths 0.125 and 0.25, each batch


def test_fedavg_trains_one_model_per_width_with_the_clients_that_afford_it():
    cfg, method, _, task_json = _setup("fedavg", "budgets=4-2-1")
    assert method.widths() == [0.25, 0.5, 1.0]
    profiles = [NodeProfile(partition_id=i, budget=b, adversarial=False, node_id=1000 + i, num_examples=5) for i, b in enumerate((0.25, 0.5, 1.0))]
    strategy = method.strategy(task_json, 1.0, 1, 0, lambda r: 0.05)
    strategy.profiles = {p.node_id: p for p in profiles}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(method.initial_state(0)), None, None)}
    prefixes = {n: sorted({k.split("/")[0] for k in unpack(m.content["arrays"])}) for n, m in messages.items()}
    assert prefixes == {1000: ["w0.25"], 1001: ["w0.25", "w0.5"], 1002: ["w0.25", "w0.5", "w1"]}
    assert all(method.respects_budgets(w) for w in method.widths())
    _, everyone, _, _ = _setup("fedavg", "budgets=4-2-1 fedavg-clients=all")
    assert [everyone.respects_budgets(w) for w in everyone.widths()] == [True, False, False]


class CannedGrid:
    """Replies with prepared evaluate metrics (no ClientApp)."""

    def __init__(self, metrics: list[dict]) -> None:
        self.metrics = metrics

    def send_and_receive(self, messages, timeout=None):
        return [Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=msg) for msg, m in zip(messages, self.metrics)]


def test_client_accuracy_is_the_mean_over_clients_and_accuracy_is_pooled():
    cfg, method, nodes, task_json = _setup("fedbn", "budgets=2-1")
    assert method.widths() == [0.5, 1.0]
    a = {split_size_key("test"): 10, split_size_key("val"): 4, eval_key("test", "correct", 0.5, 0): 9, eval_key("val", "correct", 0.5, 0): 4}
    b = {split_size_key("test"): 2, split_size_key("val"): 2, eval_key("test", "correct", 0.5, 0): 1, eval_key("val", "correct", 0.5, 0): 1}
    b |= {eval_key("test", "correct", 1.0, 0): 2, eval_key("val", "correct", 1.0, 0): 0}  # only b has a width-1 model
    scores = evaluate_on_clients(sender(CannedGrid([a, b])), nodes[:2], method, {}, task_json, [0.0], False, timeout=1)
    half, full = scores.client[0.0]
    assert (half.mean, half.std, half.n) == (pytest.approx(0.7), pytest.approx(0.2), 2)  # (0.9 + 0.5) / 2
    assert (full.mean, full.n) == (1.0, 1)
    assert scores.accuracy[0.0][0] == pytest.approx(10 / 12)  # pooled: (9 + 1) / (10 + 2)
    assert scores.val_client[0.0][0].mean == pytest.approx(0.75)  # (4/4 + 1/2) / 2
    assert scores.validation_score() == pytest.approx(np.mean([0.75, 0.0]))


def test_fedbn_clients_evaluate_with_their_own_norms(tmp_path, in_process_grid):
    from server.federation import run_federation

    grid = in_process_grid(3)
    cfg = load_config(overrides=f"{TINY} method=fedbn budgets=1 out-dir='{tmp_path}'")
    run = run_federation(grid, cfg)
    method = cfg.make_method()
    state = load_weights(run / "model.safetensors")
    task_json = cfg.client_task(method.spec).to_json()
    node = NodeProfile(partition_id=1, budget=1.0, adversarial=False, node_id=1001)
    scores = evaluate_on_clients(sender(grid), [node], method, state, task_json, [0.0], False, timeout=600)
    # By hand: the global weights with node 1's own BN entries, on node 1's test split.
    own = method.client_eval_state(state, 1.0, grid.contexts[1001])
    assert own is not None
    test = client_splits(cfg.data_config(), 1).test
    with torch.no_grad():
        by_hand = float((method.eval_model(own, 1.0, 0.0)(test.x).argmax(-1) == test.y).float().mean())
    assert scores.client[0.0][0].mean == pytest.approx(by_hand)
    local = to_tensors(grid.contexts[1001].state.array_records["local-bn-w1"])
    assert torch.equal(own["w1/bn1.clean.running_mean"], local["bn1.clean.running_mean"])
    assert not torch.equal(local["bn1.clean.running_mean"], torch.zeros_like(local["bn1.clean.running_mean"]))
