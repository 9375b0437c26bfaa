"""Evaluation: the paper's metric, on the clients' own splits.

Every client evaluates the served model at every width and λ on its own validation and test
splits (Flower ``evaluate`` messages; ``clients/app.py``) and reports correct-prediction counts.
The server turns them into, per width and λ:

- ``client_accuracy``: mean and std over clients of each client's local test accuracy (the
  Split-Mix paper's "avg test acc": an unweighted mean over clients) and ``n`` clients;
- ``val_client_accuracy``: the same on the validation splits (what picks the best round and the
  learning rate);
- ``accuracy``: pooled test accuracy (all clients' test examples together);
- ``robust``: pooled PGD accuracy against the served model itself (when asked).

Methods with static BN first gather BN statistics from the clients' *training* splits
(:func:`gather_bn_stats`; ``models/bn_moments.py``); no statistic is ever estimated on
validation or test data. FedBN's clients evaluate with their own norms.

:class:`Evaluator` evaluates centrally on data the server holds (the robust generalisation gap
on a training sample; tools).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message
from torch.nn import functional as F

from models.bn_moments import add_moments, moments_to_stats
from splitmix import protocol
from splitmix.adversarial import PGDConfig, pgd_linf
from splitmix.data import ArrayData
from splitmix.protocol import NodeProfile
from splitmix.protocol.codec import to_record, to_tensors
from strategies.registry import Method, State

log = logging.getLogger("splitmix")


@dataclass(frozen=True)
class ClientStat:
    """Mean and std (ddof 0) over ``n`` clients of their local accuracy."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: list[float]) -> ClientStat:
        if not values:
            return ClientStat(float("nan"), float("nan"), 0)
        arr = np.asarray(values, dtype=float)
        return ClientStat(float(arr.mean()), float(arr.std()), len(values))

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class WidthScores:
    """Per λ, one entry per ``widths[i]``: pooled ``accuracy`` and ``robust`` (empty when not
    evaluated), and per-client statistics ``client`` / ``val_client`` / ``robust_client``."""

    widths: list[float]
    accuracy: dict[float, list[float]]
    robust: dict[float, list[float]]
    client: dict[float, list[ClientStat]] = field(default_factory=dict)
    val_client: dict[float, list[ClientStat]] = field(default_factory=dict)
    robust_client: dict[float, list[ClientStat]] = field(default_factory=dict)
    clients: int = 0  # clients that replied

    def validation_score(self) -> float:
        """Mean over widths of the validation client accuracy at λ = 0: what the best round and
        the learning rate are chosen by (NaN when no client has a validation split)."""
        values = [s.mean for s in self.val_client.get(0.0, []) if s.n > 0]
        return float(np.mean(values)) if values else float("nan")


# (messages, timeout) -> replies: the round loop's sender (``Federation.send``), which polls
# replies every 10-50 ms where Flower's Grid.send_and_receive sleeps 3 s between pulls
Send = Callable[[list[Message], float], Iterable[Message]]


def gather_bn_stats(send: Send, nodes: list[NodeProfile], method: Method, state: State, task_json: str, timeout: float) -> dict[str, State]:
    """Static BN: every node's BN-input moments on its training split, summed, as running
    statistics per statistics-model tag (``{tag: {bn path.running_mean: …}}``)."""
    record = to_record(state)
    messages = [protocol.bn_stats_message(record, task_json, method.name, p.node_id) for p in nodes]
    totals: dict[str, dict[str, torch.Tensor]] = {}
    for reply in send(messages, timeout) if messages else []:
        if reply.has_error():
            log.warning("bn-stats: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        try:
            moments = to_tensors(reply.content.array_records[protocol.ARRAYS])
        except (KeyError, ValueError) as err:
            log.warning("bn-stats: node %s sent malformed tensors: %s", reply.metadata.src_node_id, err)
            continue
        for key, value in moments.items():
            tag, _, rest = key.partition("/")
            add_moments(totals.setdefault(tag, {}), {rest: value})
    if not totals:
        raise RuntimeError("static BN: no client returned BN statistics; the model cannot be evaluated")
    return {tag: moments_to_stats(moments) for tag, moments in totals.items()}


def evaluate_on_clients(
    send: Send,
    nodes: list[NodeProfile],
    method: Method,
    state: State,
    task_json: str,
    lambdas: list[float],
    robust: bool,
    timeout: float,
) -> WidthScores:
    """Every node evaluates ``state`` on its own splits; the counts become :class:`WidthScores`."""
    widths = method.widths()
    record = to_record(state)
    messages = [protocol.evaluate_message(record, task_json, method.name, widths, lambdas, robust, p.node_id) for p in nodes]
    replies = []
    for reply in send(messages, timeout) if messages else []:
        if reply.has_error():
            log.warning("evaluate: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        replies.append(reply.content.metric_records[protocol.METRICS])
    scores = WidthScores(widths, {}, {}, clients=len(replies))
    for lam in lambdas:
        for kind, pooled, per_client, split in (
            ("correct", scores.accuracy, scores.client, "test"),
            ("correct", None, scores.val_client, "val"),
            ("robust", scores.robust if robust else None, scores.robust_client if robust else None, "test"),
        ):
            if per_client is None:
                continue
            pooled_row, client_row = [], []
            for width in widths:
                key, size = protocol.eval_key(split, kind, width, lam), protocol.split_size_key(split)
                held = [(protocol.as_float(m[key]), protocol.as_float(m[size])) for m in replies if key in m and protocol.as_float(m[size]) > 0]
                correct, total = sum(c for c, _ in held), sum(n for _, n in held)
                pooled_row.append(correct / total if total else float("nan"))
                client_row.append(ClientStat.of([c / n for c, n in held]))
            per_client[lam] = client_row
            if pooled is not None:
                pooled[lam] = pooled_row
    return scores


class Evaluator:
    """Central evaluation on data the server holds (``calibration``: training inputs for FedBN,
    whose server has no BN of its own)."""

    def __init__(
        self,
        method: Method,
        test: ArrayData,
        lambdas: list[float],
        pgd: PGDConfig,
        device: torch.device | str = "cpu",
        batch_size: int = 1024,
        calibration: torch.Tensor | None = None,
    ) -> None:
        self.method, self.test, self.lambdas, self.pgd = method, test, lambdas, pgd
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.calibration = calibration

    def _batches(self):
        for i in range(0, len(self.test), self.batch_size):
            yield self.test.x[i : i + self.batch_size].to(self.device), self.test.y[i : i + self.batch_size].to(self.device)

    def _model(self, state: dict[str, torch.Tensor], width: float, lam: float):
        model = self.method.eval_model(state, width, lam, self.calibration).to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _robust_accuracy(self, model, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        correct = 0
        for x, y in self._batches():
            # B023: pgd_linf calls the loss right away, within this iteration
            x_adv = pgd_linf(lambda z: F.cross_entropy(model(z), y), x, self.pgd, gen)  # noqa: B023
            with torch.no_grad():
                correct += int((model(x_adv).argmax(-1) == y).sum())
        return correct / len(self.test)

    def evaluate(self, state: dict[str, torch.Tensor], robust: bool) -> WidthScores:
        widths = self.method.widths()
        x, y = self.test.x.to(self.device), self.test.y.to(self.device)
        state = {k: v.to(self.device) for k, v in state.items()}
        accuracy = {lam: self.method.clean_accuracy(state, x, y, lam, self.calibration) for lam in self.lambdas}
        robust_acc: dict[float, list[float]] = {}
        if robust:
            for lam in self.lambdas:
                robust_acc[lam] = [self._robust_accuracy(self._model(state, w, lam), seed=i + 1) for i, w in enumerate(widths)]
        return WidthScores(widths, accuracy, robust_acc)
