"""The ClientApp: thin glue between Flower messages and the local recipe.

- ``query``: report this node's profile (partition, budget, robustness need, data size) so the
  server can assign bases by budget; it also warms the actor up (imports, data, partitions).
- ``train``: decode the bases it was sent (``base{i}.<path>``), train them with the recipe,
  reply with the trained tensors (a client that does not train adversarially leaves out the
  adversarial-BN tensors it never touched) and its metrics.

Models, data and parsed tasks are cached in module globals: a Ray actor imports this module
once and then serves many virtual clients from the same process.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import node_state
from techniques import faults
from splitmix.adversarial import pgd_linf
from splitmix.protocol.codec import to_record, to_tensors
from splitmix.protocol.sparse_codec import to_sparse_record
from techniques.sparse_training import SparseRound, steps_per_epoch
from splitmix.data import client_train_data
from splitmix.node_config import validate_node_config
from splitmix.profiles import ClientProfile, profile_of_node
from clients.recipe import TrainResult, per_base_loss, train_bases
from splitmix.protocol.task import ClientTask
from models.blocks import StackedNet, frozen_bn_stats, norm_state_keys, per_base_inputs, routed
from models.splitmix import SplitMixSpec, base_key, is_adversarial_tensor, load_stacked, select_bases, split_stacked_state

app = ClientApp()

_MODELS: dict[tuple[SplitMixSpec, int], StackedNet] = {}
_WARM: set[tuple[SplitMixSpec, int, bool]] = set()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _profile(task: ClientTask, context: Context) -> ClientProfile:
    """This node's profile; an invalid node config raises ``NodeConfigError`` naming the key,
    which Flower returns to the server as this node's error reply."""
    node_config = dict(context.node_config)
    node = validate_node_config(node_config, task.data.num_partitions)
    return profile_of_node(
        node,
        task.data.num_partitions,
        task.budgets,
        task.adv_fraction,
        task.seed,
        sparse_fraction=task.sparse.fraction if task.sparse.enabled else 0.0,
    )


def _cached_model(spec: SplitMixSpec, num_bases: int) -> StackedNet:
    key = (spec, num_bases)
    if key not in _MODELS:
        _MODELS[key] = spec.build(num_bases)
    return _MODELS[key]


def _warm_up(task: ClientTask, profile: ClientProfile, data) -> None:
    """Run this budget's stacked model forward/backward once on a real batch (both BN routes for
    an adversarial client), without touching weights or BN statistics: once per actor and budget,
    so one-off costs (allocations, kernel selection, autograd set-up) land in start-up instead of
    in the first training round."""
    k = task.spec.bases_for_budget(profile.budget)
    if k < 1 or (task.spec, k, profile.adversarial) in _WARM or len(data) < 2:
        return
    _WARM.add((task.spec, k, profile.adversarial))
    model = _cached_model(task.spec, k).train()
    xb, yb = data.x[: task.train.batch_size], data.y[: task.train.batch_size]
    with frozen_bn_stats(model):
        with routed(model, "clean"):
            per_base_loss(model.forward_bases(xb), yb).backward()
        if profile.adversarial:
            with routed(model, "adv"):
                z = per_base_inputs(xb, k).clone().requires_grad_(True)
                per_base_loss(model.forward_bases(z), yb).backward()
    model.zero_grad(set_to_none=True)
    if len(_WARM) == 1:  # once per actor: torch.optim's first step imports and sets up lazily
        dummy = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([dummy], lr=0.1, momentum=0.9, weight_decay=5e-4)
        (dummy * 2).sum().backward()
        optimizer.step()


@app.query()
def query(msg: Message, context: Context) -> Message:
    task = ClientTask.from_json(str(msg.content["config"]["task"]))
    torch.set_num_threads(task.torch_threads)
    profile = _profile(task, context)
    data = client_train_data(task.data, profile.partition_id)
    _warm_up(task, profile, data)
    reply = ConfigRecord(
        {
            "partition-id": profile.partition_id,
            "budget": profile.budget,
            "adversarial": profile.adversarial,
            "num-examples": len(data),
        }
    )
    return Message(RecordDict({"profile": reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    task = ClientTask.from_json(str(config["task"]))
    torch.set_num_threads(task.torch_threads)
    profile = _profile(task, context)
    # Fault injection (simulation config fault-fraction/fault-kind): decided here, from the run
    # seed, round and partition, so the server needs to know nothing (techniques/faults.py).
    server_round = int(config["round"])
    fault = faults.fault_for(task.seed, server_round, profile.partition_id, task.fault_fraction, task.fault_kind)
    faults.before_training(fault, task.fault_delay, profile.partition_id)
    node_state.restore_once(context.state, task.state_dir, profile.partition_id, server_round)  # a resumed run
    reply = _train(msg, context, task, profile, fault, config)
    if task.state_dir:  # keep this node's state (masks, optimizer moments, local BN) resumable
        node_state.save_node_state(task.state_dir, profile.partition_id, server_round, context.state)
    return reply


def _train(msg: Message, context: Context, task: ClientTask, profile: ClientProfile, fault: str | None, config) -> Message:
    if str(config.get("method", "splitmix")) == "width":
        return _train_width_slice(msg, context, task, profile, fault)
    indices = [int(i) for i in config["bases"]]

    # Decode: per-base states, in the order the server listed the bases.
    received = to_tensors(msg.content["arrays"])
    model = load_stacked(_cached_model(task.spec, len(indices)), select_bases(received, indices))

    units = [f"base{i}" for i in indices]
    result, masks, extra = _local_training(model, task, profile, config, context, units)

    trained = split_stacked_state(model.state_dict(), len(indices))
    tensors = {
        base_key(index, name): tensor.cpu()
        for index, state in zip(indices, trained)
        for name, tensor in state.items()
        if profile.adversarial or not is_adversarial_tensor(name)
    }
    return _reply(msg, tensors, masks, result, profile, extra, fault)


def _reply(
    msg: Message, tensors: dict, masks: dict, result: TrainResult, profile: ClientProfile, extra: dict, fault: str | None = None
) -> Message:
    """Dense tensors, or (sparse clients) only the kept entries of masked weights."""
    tensors = faults.corrupt(fault, tensors, lambda: to_tensors(msg.content["arrays"]))
    arrays = to_sparse_record(tensors, masks) if masks else to_record(tensors)
    metrics = _metrics(result, profile)
    for key, value in extra.items():
        metrics[key] = value
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _local_training(
    model: StackedNet, task: ClientTask, profile: ClientProfile, config, context: Context, units: list[str]
) -> tuple[TrainResult, dict[str, torch.Tensor], dict[str, float]]:
    """The recipe on this client's data, with the round's lr and seed from the server; a sparse
    client trains under its masks (kept in ``context.state``) and returns them for the upload."""
    data = client_train_data(task.data, profile.partition_id)
    device = resolve_device(task.device)
    seed = int(config["seed"])
    sparse, held_out = None, None
    if profile.sparse and task.sparse.enabled:
        single = (lambda: task.spec.build(1)) if units[0].startswith("base") else (lambda: task.spec.build_width(float(config["width"])))
        if task.sparse.method == "dynamic-plus":
            data, held_out = _hold_out(data, task.sparse.holdout, task.seed + profile.partition_id)
        spec = task.spec
        sparse = SparseRound(
            model.to(device),
            units,
            task.sparse,
            context.state,
            server_round=int(config["round"]),
            num_rounds=task.num_rounds,
            round_steps=task.train.epochs * steps_per_epoch(len(data), task.train.batch_size),
            seed=seed,
            input_shape=(spec.in_channels, spec.image_size, spec.image_size),
            run_seed=task.seed,
            single_base=single,
            data=(data.x, data.y) if task.sparse.method == "uvc" else None,
        )
    state_key = "optim." + "+".join(units)  # a learned optimizer's moments, for the same units next time
    kept = context.state.array_records.get(state_key) if task.train.optimizer != "sgd" else None
    result = train_bases(
        model, data, task.train, lr=float(config["lr"]), adversarial=profile.adversarial, seed=seed, device=device,
        hooks=sparse, optimizer_state=to_tensors(kept) if kept is not None else None,
    )
    if result.optimizer_state:
        context.state[state_key] = to_record({k: v.cpu() for k, v in result.optimizer_state.items()})
    if sparse is None:
        return result, {}, {}
    if held_out is not None:
        _observe(sparse, model, data, held_out, task, profile, seed, device)
    prefix = units[0].startswith("base")
    masks, extra = sparse.finish(lambda unit, name: f"{unit}.{name}" if prefix else name)
    return result, masks, extra


def _hold_out(data, share: float, seed: int):
    """Split a client's data into (train, held-out) — Flying Bird+ watches robust overfitting."""
    count = max(2, int(round(share * len(data))))
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(order[count:]), data.subset(order[:count])


def _observe(sparse: SparseRound, model: StackedNet, data, held_out, task: ClientTask, profile: ClientProfile, seed: int, device) -> None:
    """Robust (adversarial clients) or clean accuracy on training vs held-out data, per base."""
    gen = torch.Generator().manual_seed(seed)
    k = model.num_bases

    def attack(m, x, y):
        if not profile.adversarial:
            return x
        with frozen_bn_stats(m):
            return pgd_linf(lambda z: per_base_loss(m.forward_bases(z), y), per_base_inputs(x, k), task.train.pgd, gen)

    n = len(held_out)
    batches = [(d.x[:n].to(device), d.y[:n].to(device)) for d in (data, held_out)]
    with routed(model, "adv" if profile.adversarial else "clean"):
        sparse.observe(batches[0], batches[1], attack)


def _metrics(result: TrainResult, profile: ClientProfile) -> MetricRecord:
    return MetricRecord(
        {
            "num-examples": result.num_examples,
            "loss": result.loss,
            "clean-loss": result.clean_loss,
            "adv-loss": result.adv_loss,
            "diversity-loss": result.diversity_loss,
            "steps": result.steps,
            "train-time": result.seconds,
            "partition-id": profile.partition_id,
            "adversarial": int(profile.adversarial),
        }
    )


_LOCAL_BN = "local-bn"


def _train_width_slice(msg: Message, context: Context, task: ClientTask, profile: ClientProfile, fault: str | None = None) -> Message:
    """HeteroFL/SHeteroFL/FedAvg/FedBN: train the width-w network the server sliced for us.

    With ``local-bn`` (FedBN) the batch-norm entries never come from or go to the server: they
    live in this node's Context state across rounds (initial values on a node's first round).
    """
    config = msg.content["config"]
    width = float(config["width"])
    model = _cached_model_width(task.spec, width)
    state = to_tensors(msg.content["arrays"])
    local_bn = bool(config.get("local-bn", False))
    if local_bn:
        kept = context.state.array_records.get(_LOCAL_BN)
        state.update(to_tensors(kept) if kept is not None else _initial_norm_state(task.spec, width))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"width-{width} state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")

    result, masks, extra = _local_training(model, task, profile, config, context, ["width"])
    trained = {k: v.cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    norm_keys = norm_state_keys(model)
    if local_bn:
        context.state[_LOCAL_BN] = to_record({k: v for k, v in trained.items() if k in norm_keys})
    tensors = {
        k: v for k, v in trained.items() if not (local_bn and k in norm_keys) and (profile.adversarial or not is_adversarial_tensor(k))
    }
    return _reply(msg, tensors, masks, result, profile, extra, fault)


_WIDTH_MODELS: dict[tuple[SplitMixSpec, float], StackedNet] = {}
_NORM_INIT: dict[tuple[SplitMixSpec, float], dict[str, torch.Tensor]] = {}


def _cached_model_width(spec: SplitMixSpec, width: float) -> StackedNet:
    key = (spec, width)
    if key not in _WIDTH_MODELS:
        _WIDTH_MODELS[key] = spec.build_width(width)
    return _WIDTH_MODELS[key]


def _initial_norm_state(spec: SplitMixSpec, width: float) -> dict[str, torch.Tensor]:
    """Freshly initialised BN entries (weight 1, bias 0, mean 0, var 1) for a node's first round."""
    key = (spec, width)
    if key not in _NORM_INIT:
        fresh = spec.build_width(width)
        keys = norm_state_keys(fresh)
        _NORM_INIT[key] = {k: v.clone() for k, v in fresh.state_dict().items() if k in keys}
    return _NORM_INIT[key]
