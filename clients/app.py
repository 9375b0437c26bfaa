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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.data import client_train_data
from clients.profiles import ClientProfile, make_profile
from clients.recipe import train_bases
from clients.task import ClientTask
from models.blocks import StackedNet
from models.splitmix import SplitMixSpec, base_key, is_adversarial_tensor, load_stacked, parse_base_key, split_stacked_state

app = ClientApp()

_MODELS: dict[tuple[SplitMixSpec, int], StackedNet] = {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _profile(task: ClientTask, context: Context) -> ClientProfile:
    node_config = dict(context.node_config)
    if "partition-id" not in node_config:
        raise ValueError("node-config has no 'partition-id'; start the SuperNode with --node-config 'partition-id=<i>'")
    return make_profile(
        int(node_config["partition-id"]),
        task.data.num_partitions,
        task.budgets,
        task.adv_fraction,
        task.seed,
        node_config,
    )


def _cached_model(spec: SplitMixSpec, num_bases: int) -> StackedNet:
    key = (spec, num_bases)
    if key not in _MODELS:
        _MODELS[key] = spec.build(num_bases)
    return _MODELS[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    task = ClientTask.from_json(str(msg.content["config"]["task"]))
    profile = _profile(task, context)
    data = client_train_data(task.data, profile.partition_id)
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
    indices = [int(i) for i in config["bases"]]

    # Decode: per-base states, in the order the server listed the bases.
    received = msg.content["arrays"].to_torch_state_dict()
    per_base: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
    for key, tensor in received.items():
        index, name = parse_base_key(key)
        per_base[index][name] = tensor
    model = load_stacked(_cached_model(task.spec, len(indices)), [per_base[i] for i in indices])

    result = train_bases(
        model,
        client_train_data(task.data, profile.partition_id),
        task.train,
        lr=float(config["lr"]),
        adversarial=profile.adversarial,
        seed=int(config["seed"]),
        device=resolve_device(task.device),
    )

    trained = split_stacked_state(model.state_dict(), len(indices))
    arrays = ArrayRecord(
        {
            base_key(index, name): tensor.cpu()
            for index, state in zip(indices, trained)
            for name, tensor in state.items()
            if profile.adversarial or not is_adversarial_tensor(name)
        }
    )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "loss": result.loss,
            "clean-loss": result.clean_loss,
            "adv-loss": result.adv_loss,
            "steps": result.steps,
            "train-time": result.seconds,
            "partition-id": profile.partition_id,
            "adversarial": int(profile.adversarial),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
