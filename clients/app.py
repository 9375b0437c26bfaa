"""The ClientApp: thin glue between Flower messages and the local recipe.

- ``query``: report this node's profile (partition, budget, robustness need, data size) so the
  server can assign work by budget; it also warms the actor up (imports, data, partitions).
- ``train``: the instruction's method turns the received tensors into the model to train
  (``Method.client_model``: stacked Split-Mix bases, or a width slice); the run's techniques
  hook into the round (``techniques/``); the recipe trains (``clients/recipe.py``); the method
  picks what goes back (``Method.client_tensors``), sparse techniques' masks make the upload sparse.

Models, data and parsed tasks are cached in module globals: a Ray actor imports this module
once and then serves many virtual clients from the same process.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import node_state
from clients.recipe import per_base_loss, train_bases
from models.blocks import frozen_bn_stats, per_base_inputs, routed
from models.bn_moments import collect_moments
from models.splitmix import SplitMixSpec
from splitmix import protocol
from splitmix.adversarial import pgd_linf
from splitmix.data import client_splits, client_train_data
from splitmix.node_config import validate_node_config
from splitmix.profiles import profile_of_node
from splitmix.protocol import ARRAYS, CONFIG, Instruction, NodeProfile
from splitmix.protocol.codec import to_record, to_tensors
from splitmix.protocol.sparse_codec import to_sparse_record
from splitmix.protocol.task import ClientTask
from strategies.registry import Method, method_class
from techniques.base import ClientRound

app = ClientApp()

_WARM: set[tuple[SplitMixSpec, int, bool]] = set()
_CHECKED: set[str] = set()  # task JSONs whose node checks passed in this process


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def node_profile(task: ClientTask, context: Context) -> NodeProfile:
    """This node's profile; an invalid node config raises ``NodeConfigError`` naming the key,
    which Flower returns to the server as this node's error reply."""
    node = validate_node_config(dict(context.node_config), task.data.num_partitions)
    return profile_of_node(node, task.data.num_partitions, task.budgets, task.adv_fraction, task.seed, task.sparse_fraction)


def _warm_up(task: ClientTask, profile: NodeProfile, data) -> None:
    """Run this budget's stacked model forward/backward once on a real batch (both BN routes for
    an adversarial client), without touching weights or BN statistics: once per actor and budget,
    so one-off costs (allocations, kernel selection, autograd set-up) land in start-up instead of
    in the first training round."""
    from strategies.splitmix import cached_stack

    k = task.spec.bases_for_budget(profile.budget)
    if k < 1 or (task.spec, k, profile.adversarial) in _WARM or len(data) < 2:
        return
    _WARM.add((task.spec, k, profile.adversarial))
    model = cached_stack(task.spec, k).train()
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


def check_node_once(task_json: str, task: ClientTask) -> None:
    """The techniques' node checks (e.g. the learned optimizer's artifact is the server's), once
    per process and task: a simulation asks no profile, so its first train message runs them."""
    if task_json in _CHECKED:
        return
    for technique in task.techniques_on():
        technique.check_node(task)
    _CHECKED.add(task_json)


@app.query()
def query(msg: Message, context: Context) -> Message:
    task = ClientTask.from_json(protocol.task_of(msg))
    torch.set_num_threads(task.torch_threads)
    check_node_once(protocol.task_of(msg), task)
    profile = node_profile(task, context)
    data = client_train_data(task.data, profile.partition_id)
    _warm_up(task, profile, data)
    return protocol.profile_reply(msg, NodeProfile(profile.partition_id, profile.budget, profile.adversarial, profile.sparse, len(data)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = Instruction.from_record(msg.content.config_records[CONFIG])
    task = ClientTask.from_json(instruction.task)
    torch.set_num_threads(task.torch_threads)
    check_node_once(instruction.task, task)
    profile = node_profile(task, context)
    node_state.restore_once(context.state, task.state_dir, profile.partition_id, instruction.server_round)  # a resumed run
    reply = train_round(msg, context, task, profile, instruction)
    if task.state_dir:  # keep this node's state (masks, optimizer moments, local BN) resumable
        node_state.save_node_state(task.state_dir, profile.partition_id, instruction.server_round, context.state)
    return reply


def train_round(msg: Message, context: Context, task: ClientTask, profile: NodeProfile, instruction: Instruction) -> Message:
    """One round of local training: every model the method gives this client (one, or FedAvg's
    one per width), each trained by the method's client step + technique hooks + the recipe."""
    method: Method = method_class(instruction.method)(task.spec)
    received = to_tensors(msg.content.array_records[ARRAYS])
    tensors: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    metrics: dict[str, float | int] = {}
    totals = {"loss": 0.0, "clean-loss": 0.0, "adv-loss": 0.0, "diversity-loss": 0.0, "steps": 0, "seconds": 0.0}
    jobs = method.client_jobs(received, instruction)
    num_examples = 0
    for prefix, state, job in jobs:
        trained, rnd, result = _train_one(method, state, job, context, task, profile, lambda p=prefix: _strip(received, p))
        tensors.update({prefix + k: v for k, v in trained.items()})
        masks.update({prefix + k: v for k, v in rnd.masks.items()})
        metrics.update(rnd.metrics)
        num_examples = result.num_examples
        for key, value in (
            ("loss", result.loss),
            ("clean-loss", result.clean_loss),
            ("adv-loss", result.adv_loss),
            ("diversity-loss", result.diversity_loss),
        ):
            totals[key] += value / len(jobs)
        totals["steps"] += result.steps
        totals["seconds"] += result.seconds
    arrays = to_sparse_record(tensors, masks) if masks else to_record(tensors)
    reply = {
        protocol.NUM_EXAMPLES: num_examples,
        protocol.LOSS: totals["loss"],
        "clean-loss": totals["clean-loss"],
        "adv-loss": totals["adv-loss"],
        "diversity-loss": totals["diversity-loss"],
        "steps": int(totals["steps"]),
        protocol.TRAIN_TIME: totals["seconds"],
        "partition-id": profile.partition_id,
        "adversarial": int(profile.adversarial),
        **metrics,
    }
    return protocol.reply_message(msg, arrays, reply)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _train_one(method: Method, received, instruction: Instruction, context: Context, task: ClientTask, profile: NodeProfile, sent):
    """One model: the method's client step, the techniques' hooks and the recipe."""
    model, units = method.client_model(received, instruction, context)
    device = resolve_device(task.device)
    rnd = ClientRound(
        model=model,
        units=units,
        task=task,
        profile=profile,
        context=context,
        data=client_train_data(task.data, profile.partition_id),
        device=device,
        seed=instruction.seed,
        server_round=instruction.server_round,
        single_unit=method.client_unit_builder(instruction),
    )
    hooks = method.client_hooks(rnd, instruction)
    hooks += [h for h in (t.client_round(rnd) for t in task.techniques_on()) if h is not None]
    for hook in hooks:
        hook.before_training(rnd)
    result = train_bases(
        model,
        rnd.data,
        task.train,
        lr=instruction.lr,
        adversarial=profile.adversarial,
        seed=instruction.seed,
        device=device,
        hooks=hooks,
        optimizer_state=rnd.optimizer_state,
    )
    for hook in hooks:
        hook.after_training(rnd, result)
    tensors = method.client_tensors(model, instruction, profile, context)
    for hook in hooks:
        tensors = hook.before_upload(tensors, sent)
    return tensors, rnd, result


# --------------------------------------------------------------------------- evaluation
def _request(msg: Message, context: Context) -> tuple[ConfigRecord, ClientTask, NodeProfile, Method, dict[str, torch.Tensor]]:
    """What a bn-stats or evaluate message carries: its config, the task, this node's profile,
    the method and the served state."""
    config = msg.content.config_records[CONFIG]
    task = ClientTask.from_json(str(config[protocol.TASK]))
    torch.set_num_threads(task.torch_threads)
    method: Method = method_class(str(config[protocol.METHOD]))(task.spec)
    return config, task, node_profile(task, context), method, to_tensors(msg.content.array_records[ARRAYS])


@app.query("bn_stats")
def bn_stats(msg: Message, context: Context) -> Message:
    """Static BN: the moments of every BN's inputs over this node's training split, for each of
    the method's statistics models (``models/bn_moments.py``)."""
    config, task, profile, method, state = _request(msg, context)
    data = client_train_data(task.data, profile.partition_id)
    device = resolve_device(task.device)
    adv = _adversarial_inputs(task) if profile.adversarial else None
    out: dict[str, torch.Tensor] = {}
    for tag, model in method.stats_models(state).items():
        moments = collect_moments(model.to(device), data.x.to(device), data.y.to(device), adv, task.train.batch_size)
        out.update({f"{tag}/{k}": v for k, v in moments.items()})
    return protocol.reply_message(msg, to_record(out), {protocol.NUM_EXAMPLES: len(data)})


def _adversarial_inputs(task: ClientTask):
    """PGD examples for the adversarial BN path's statistics (an adversarially training node)."""
    gen = torch.Generator().manual_seed(task.seed)

    def make(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), frozen_bn_stats(model):
            return pgd_linf(lambda z: torch.nn.functional.cross_entropy(model(z), y), x, task.train.pgd, gen)

    return make


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the served model at each width and λ on this node's own validation and test
    splits (with robust accuracy when asked), as correct-prediction counts."""
    config, task, profile, method, state = _request(msg, context)
    splits = client_splits(task.data, profile.partition_id)
    device = resolve_device(task.device)
    robust = bool(config[protocol.ROBUST])
    metrics: dict[str, int | float | list[int] | list[float]] = {protocol.split_size_key(s): len(getattr(splits, s)) for s in protocol.SPLITS}
    gen = torch.Generator().manual_seed(task.seed + profile.partition_id)
    widths = [float(w) for w in config[protocol.WIDTHS]]  # type: ignore[union-attr]
    lambdas = [float(v) for v in config[protocol.LAMBDAS]]  # type: ignore[union-attr]
    owns = {w: method.client_eval_state(state, w, context) for w in widths}
    if all(own is state for own in owns.values()) and widths == method.widths():  # one pass for every width
        for lam in lambdas:
            for split in protocol.SPLITS:
                data = getattr(splits, split)
                if len(data) > 0:
                    accuracy = method.clean_accuracy({k: v.to(device) for k, v in state.items()}, data.x.to(device), data.y.to(device), lam)
                    for width, acc in zip(widths, accuracy):
                        metrics[protocol.eval_key(split, "correct", width, lam)] = round(acc * len(data))
    for width, own in owns.items():
        if own is None:  # no model of this width on this node (FedBN: it never trained one)
            continue
        for lam in lambdas:
            if protocol.eval_key("test", "correct", width, lam) in metrics and not robust:
                continue  # done in the one pass above
            model = method.eval_model(own, width, lam).to(device)
            for p in model.parameters():
                p.requires_grad_(False)
            for split in protocol.SPLITS:
                data = getattr(splits, split)
                if len(data) == 0:
                    continue
                x, y = data.x.to(device), data.y.to(device)
                clean = protocol.eval_key(split, "correct", width, lam)
                if clean not in metrics:  # not counted by the one pass above
                    with torch.no_grad():
                        metrics[clean] = int((model(x).argmax(-1) == y).sum())
                if robust and split == "test":
                    x_adv = pgd_linf(lambda z: torch.nn.functional.cross_entropy(model(z), y), x, task.eval_pgd, gen)  # noqa: B023
                    with torch.no_grad():
                        metrics[protocol.eval_key(split, "robust", width, lam)] = int((model(x_adv).argmax(-1) == y).sum())
    return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)
