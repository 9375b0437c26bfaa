"""Sparse clients in the federation: masks as Flower Context state across rounds, sparse uploads,
entry-wise aggregation over the clients that hold each entry, the served sparse model."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from models.splitmix import SplitMixSpec
from server.federation import run_federation
from server.store import load_weights
from splitmix.config import load_config
from splitmix.protocol import NodeProfile
from splitmix.protocol.codec import to_record, to_tensors, unpack
from splitmix.protocol.sparse_codec import DENSE_PACK, to_sparse_record
from strategies.base import TensorSpec
from strategies.splitmix import SplitMixStrategy
from techniques.sparse_base import initial_unit_mask
from techniques.sparsity import FlyingBird, RobustBirdSearch, prunable_parameters

FAST = "sparse-updates-per-round=1"  # on top of the shared tiny run (conftest.py)


def _rounds(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_sparse_clients_upload_less_and_the_served_model_is_sparse(tmp_path, in_process_grid, method, tiny_config):
    dense = run_federation(in_process_grid(4), tiny_config(f"{FAST} out-dir='{tmp_path}' run-name=dense"))
    grid = in_process_grid(4)
    cfg = tiny_config(f"{FAST} out-dir='{tmp_path}' run-name={method} sparse-method={method} sparsity=0.9")
    sparse = run_federation(grid, cfg)
    rows, dense_rows = _rounds(sparse), _rounds(dense)
    assert all(r["valid"] == r["sampled"] and r["rejected"] == 0 for r in rows)
    if method == "dynamic":
        assert all(r["sparse-replies"] == r["valid"] for r in rows)  # masks from the first step: upload is a fraction of the dense one
        assert all(r["bytes-up"] * 3 < d["bytes-up"] for r, d in zip(rows, dense_rows))
        assert all(r["train-flops-fraction"] < 0.5 for r in rows)
    else:  # Robust Bird trains (and uploads) dense while it searches: 2 rounds < the window of 5 checks
        assert all(r["sparse-replies"] == 0 and r["train-flops-fraction"] == 1.0 and r["sparse-frozen"] == 0 for r in rows)
    # Client state: one record per base the node trained, kept in its Flower Context.
    checks = 0
    for node, ctx in grid.contexts.items():
        units = [k for k in ctx.state.config_records if k.startswith("sparse.base")]
        assert units, f"node {node} kept no sparse state"
        for unit in units:
            record = ctx.state.config_records[unit]
            technique = FlyingBird.from_config(record) if method == "dynamic" else RobustBirdSearch.from_config(record)
            if method == "static":
                assert technique.mask is None and technique.checks == len(technique.history)  # still searching
                checks += technique.checks
                continue
            masks = technique.masks
            total = sum(m.numel() for m in masks.values())
            assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)  # exactly 90 % sparse
    if method == "static":  # one check per unit per round it was trained, each counted as searching
        assert checks == sum(r["sparse-searching"] for r in rows) > 0
    # The stored (served) model: every base's conv/linear weights exactly 90 % zero.
    weights = load_weights(sparse / "model.safetensors")
    prunable = set(prunable_parameters(cfg.spec().build(1)))
    for base in range(8):
        keys = [f"base{base}.{n}" for n in prunable]
        zeros = sum(int((weights[k] == 0).sum()) for k in keys)
        total = sum(weights[k].numel() for k in keys)
        assert zeros == total - round(0.1 * total)
    summary = json.loads((sparse / "summary.json").read_text())
    assert summary["sparse"]["method"] == method
    if method == "dynamic":
        assert summary["sparse"]["train_flops_fraction"] < 0.5
    else:
        assert summary["sparse"]["train_flops_fraction"] == 1.0
        assert summary["sparse"]["robust_bird"]["frozen"] == 0 and summary["sparse"]["robust_bird"]["freeze_rounds"] == {}
        assert summary["sparse"]["robust_bird"]["searching_last_round"] == rows[-1]["sparse-searching"]


def test_dynamic_masks_start_common_and_the_global_model_starts_sparse():
    spec = SplitMixSpec()
    single = spec.build(1)
    params = {n: p.detach() for n, p in prunable_parameters(single).items()}
    a = initial_unit_mask(params, 0.8, run_seed=3, unit="base2")
    b = initial_unit_mask(params, 0.8, run_seed=3, unit="base2")
    c = initial_unit_mask(params, 0.8, run_seed=3, unit="base5")
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)
    total = sum(m.numel() for m in a.values())
    assert sum(int(m.sum()) for m in a.values()) == round(0.2 * total)


def _reply(msg: Message, tensors: dict, masks: dict, examples: int) -> Message:
    metrics = MetricRecord({"num-examples": examples, "loss": 1.0, "train-time": 0.1, "density": 0.5})
    return Message(RecordDict({"arrays": to_sparse_record(tensors, masks), "metrics": metrics}), reply_to=msg)


def test_sparse_aggregation_through_the_strategy_equals_a_hand_computation():
    """Two clients train base 0 with overlapping masks: each entry is the example-weighted mean
    over the clients that hold it; entries nobody holds keep their value."""
    spec = SplitMixSpec()
    state = {f"base{i}.{k}": v for i in range(8) for k, v in spec.build(1).state_dict().items() if "num_batches" not in k}
    strategy = SplitMixStrategy(spec, "{}", 1.0, 1, 0, lambda r: 0.1)
    arrays = to_record(state)
    strategy._current = arrays
    key = "base0.fc2.weight"
    shape = state[key].shape
    keys = [k for k in state if k.startswith("base0.") and "adv" not in k]
    sent = {k: TensorSpec(tuple(state[k].shape), "float32") for k in keys}
    m1 = torch.zeros(shape, dtype=torch.bool)
    m1[:, :3] = True
    m2 = torch.zeros(shape, dtype=torch.bool)
    m2[:, 2:5] = True
    t1 = {k: torch.full_like(state[k], 1.0) for k in keys}
    t2 = {k: torch.full_like(state[k], 4.0) for k in keys}
    replies = []
    for node, (tensors, mask, n) in {1: (t1, m1, 10), 2: (t2, m2, 30)}.items():
        strategy.profiles[node] = NodeProfile(node_id=node, partition_id=node, budget=0.125, adversarial=False, num_examples=100)
        strategy._sent[node] = dict(sent)
        msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
        reply = _reply(msg, {k: v * (mask if k == key else 1) for k, v in tensors.items()}, {key: mask}, n)
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["valid"] == 2 and metrics["sparse-replies"] == 2
    result = to_tensors(new)[key]
    expected = state[key].clone()
    expected[:, :2] = 1.0  # only client 1
    expected[:, 2] = (1.0 * 10 + 4.0 * 30) / 40  # both
    expected[:, 3:5] = 4.0  # only client 2
    assert torch.allclose(result, expected)  # columns 5.. untouched
    dense_key = "base0.fc2.bias"  # packed dense tensors: plain weighted mean
    assert torch.allclose(to_tensors(new)[dense_key], torch.full_like(state[dense_key], (10 + 120) / 40))


def test_malformed_sparse_reply_is_rejected_and_the_aggregate_unchanged(tmp_path, in_process_grid, tiny_config):
    def truncate_pack(node, reply):
        if node == 1001 and "arrays" in reply.content.array_records:
            entries = unpack(reply.content["arrays"])
            reply.content["arrays"] = to_record({**entries, DENSE_PACK: entries[DENSE_PACK][:-1]})  # one value short
        return reply

    base = f"{FAST} num-rounds=1 sparse-method=dynamic sparsity=0.9 out-dir='{tmp_path}'"
    run = run_federation(in_process_grid(4, tamper=truncate_pack), tiny_config(f"{base} run-name=bad"))
    rows = _rounds(run)
    assert rows[0]["rejected"] == 1 and rows[0]["valid"] == 3
    events = (run / "events.jsonl").read_text()
    assert "partition 1" in events and "::dense" in events


@pytest.mark.slow
def test_heterofl_with_sparse_clients_respects_masks(tmp_path, in_process_grid, tiny_config):
    cfg = tiny_config(f"{FAST} method=heterofl sparse-method=dynamic sparsity=0.8 out-dir='{tmp_path}' run-name=h")
    run = run_federation(in_process_grid(4), cfg)
    rows = _rounds(run)
    assert all(r["sparse-replies"] == r["valid"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["widths"]["1.0"]["client_accuracy"]["n"] == 4 and summary["sparse"]["sparsity"] == 0.8


def test_random_pruning_at_init_keeps_each_layer_at_1_minus_p_and_rescales():
    from techniques.base import ServerContext

    spec = SplitMixSpec()
    state = {f"base{i}.{k}": v for i in range(2) for k, v in spec.build(1).state_dict().items() if "num_batches" not in k}
    prunable = set(prunable_parameters(spec.build(1)))

    def initial(rescale: bool) -> dict:
        run = load_config(overrides=f"sparse-method=random sparsity=0.75 sparse-rescale={str(rescale).lower()}")
        (technique,) = [t for t in run.active_techniques() if t.name == "random"]
        return technique.initial_state(state, ServerContext(run, run.make_method(), prunable))

    out = initial(True)
    for key, value in out.items():
        name = key.split(".", 1)[1]
        if name not in prunable:
            assert torch.equal(value, state[key])  # BN, biases untouched
            continue
        kept = value != 0
        assert int(kept.sum()) == round(0.25 * value.numel())  # uniform: every layer keeps 1 - p
        assert torch.allclose(value[kept], state[key][kept] * 2.0)  # 1/sqrt(1 - 0.75) = 2
    plain = initial(False)
    assert torch.equal(plain["base0.conv2.weight"] != 0, out["base0.conv2.weight"] != 0)  # same mask
    assert torch.equal(plain["base0.conv2.weight"] * 2.0, out["base0.conv2.weight"])


@pytest.mark.slow
def test_structured_clients_prune_whole_channels_round_by_round(tmp_path, in_process_grid, tiny_config):
    grid = in_process_grid(4)
    cfg = tiny_config(f"{FAST} sparse-method=structured sparsity=0.5 out-dir='{tmp_path}' run-name=s")
    run = run_federation(grid, cfg)
    rows = _rounds(run)
    assert all(r["sparse-replies"] == r["valid"] == r["sampled"] for r in rows)
    # round 1: every unit at channel sparsity 0.2; round 2: units a client meets again at 0.36, so
    # no client's share of dense FLOPs grows and the one training all 8 bases prunes every base further
    assert rows[0]["train-flops-fraction"] < 1.0 and rows[1]["train-flops-fraction"] < rows[0]["train-flops-fraction"]
    from techniques.sparse_base import FixedMask

    for ctx in grid.contexts.values():
        for unit, record in ctx.state.config_records.items():
            if not unit.startswith("sparse."):  # other node state (e.g. the resume marker, clients/node_state.py)
                continue
            mask = FixedMask.from_config(record)
            conv2 = mask.masks["conv2.weight"]  # (out, in, 3, 3) of one base
            rows_kept = conv2.flatten(1).any(dim=1)
            alive_in = conv2.any(dim=0).flatten(1).any(dim=1)  # input channels conv1 still produces
            assert bool(conv2[rows_kept][:, alive_in].all()) and not bool(conv2[~rows_kept].any())  # whole channels
            expected = 1.0 - 0.8**mask.steps
            removed = 1.0 - rows_kept.float().mean().item()
            assert abs(removed - min(0.5, expected)) <= 1.0 / conv2.shape[0] + 1e-6


@pytest.mark.slow
def test_flying_bird_plus_adapts_and_the_served_model_carries_the_adapted_sparsity(tmp_path, in_process_grid, tiny_config):
    """Four rounds of adversarial Flying Bird+ clients: the robust gap votes fire (some units end
    away from the 80 % target), each round's row has every unit's mean client density, and the
    stored model has each base pruned to exactly the density its clients last reported."""
    from splitmix.data import client_train_data
    from techniques.flying_bird import holdout_count
    from techniques.sparsity import FlyingBirdPlus, keep_count

    grid = in_process_grid(4)
    cfg = tiny_config(f"{FAST} num-rounds=4 adv-fraction=1.0 sparse-method=dynamic-plus sparsity=0.8 out-dir='{tmp_path}' run-name=fbp")
    run = run_federation(grid, cfg)
    rows = _rounds(run)
    assert all(r["sparse-replies"] == r["valid"] == r["sampled"] for r in rows)
    sizes = [len(client_train_data(cfg.data_config(), i)) for i in range(4)]
    assert all(r["examples"] == sum(n - holdout_count(n, 0.2) for n in sizes) for r in rows)  # the held-out share never trains
    records = [rec for ctx in grid.contexts.values() for key, rec in ctx.state.config_records.items() if key.startswith("sparse.")]
    birds = [FlyingBirdPlus.from_config(rec) for rec in records]
    assert sum(b.prune_updates for b in birds) > 0 and sum(b.grow_updates for b in birds) > 0
    last = {}
    for row in rows:
        last.update({k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("density.")})
    assert sorted(last) == [f"base{i}" for i in range(8)]
    assert max(abs(d - 0.2) for d in last.values()) > 0.005  # the adaptation moved some unit off the target
    weights = load_weights(run / "model.safetensors")
    prunable = set(prunable_parameters(cfg.spec().build(1)))
    for unit, density in last.items():
        keys = [f"{unit}.{n}" for n in prunable]
        total = sum(weights[k].numel() for k in keys)
        assert sum(int((weights[k] != 0).sum()) for k in keys) == keep_count(total, 1.0 - density)


def test_pruned_weights_stay_zero_through_optimizer_steps(technique_round):
    """Random pruning at init: after every step the hooks put the weights back on the mask, so
    momentum cannot revive a pruned weight."""
    model = SplitMixSpec().build(1)
    hooks, rnd, _ = technique_round("sparse-method=random sparsity=0.8", model, ["base0"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        hooks.after_step(optimizer)
    params = dict(model.named_parameters())
    for name, mask in hooks.masks["base0"].mask.items():
        assert bool((params[name].detach()[~mask] == 0).all()) and bool((params[name].detach()[mask] != 0).any())


def test_structured_run_serves_whole_channel_sparse_bases():
    """The server hook of ``structured``: the served model is each base pruned to whole
    channels at the target sparsity (what the clients end at), not the dense aggregate."""
    from splitmix.config import load_config
    from techniques.base import ServerContext

    run = load_config(overrides="sparse-method=structured sparsity=0.5")
    (technique,) = [t for t in run.active_techniques() if t.name == "structured"]
    method = run.make_method()
    state = method.initial_state(0)
    served = technique.served_state(state, ServerContext(run, method, set(prunable_parameters(method.single_unit_model()))))
    for base in range(8):
        conv2 = served[f"base{base}.conv2.weight"]
        rows = conv2.flatten(1).any(dim=1)
        assert abs((1.0 - rows.float().mean().item()) - 0.5) <= 1.0 / conv2.shape[0] + 1e-6  # half the channels gone
        assert bool(conv2[rows].flatten(1).any(dim=1).all())  # and the kept ones are not emptied
