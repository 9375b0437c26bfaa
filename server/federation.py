"""The server's round loop: discover clients, train, aggregate, evaluate, store.

This is what both entry points run: the ServerApp of ``flwr run .`` (``server/app.py``) and
``splitmix simulate`` (``server/simulation.py``). The strategy decides who trains what and how
replies are aggregated; this loop only sequences the rounds and records the results.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from clients.app import resolve_device
from models.cost import count_macs, count_params
from server.evaluate import Evaluator, WidthScores, evaluate_on_clients, gather_bn_stats
from server.oversmoothing import oversmoothing_profile
from server.plots import plot_accuracy_per_width, plot_robustness
from server.store import RunStore
from server.waiting import PROGRESS_EVERY, send_and_wait
from splitmix.config import RunConfig
from splitmix.data import ArrayData, client_splits, test_data, train_sample
from splitmix.protocol.codec import to_record, to_tensors
from strategies.node_profiles import derive_profiles
from strategies.registry import Method
from strategies.splitmix import cosine_lr
from techniques.base import ServerContext, Technique
from techniques.sparsity import prunable_parameters

log = logging.getLogger("splitmix")

Reporter = Callable[[str], None]


def width_key(width: float) -> str:
    """Summary/metrics key of a width: ``0.125``, ``0.25``, …, ``1.0``."""
    return str(round(width, 6))


def _score_columns(scores: WidthScores) -> dict[str, float]:
    """Metrics-row columns: pooled ``acc``/``racc``, client means ``cacc`` (test) and ``vacc``
    (validation), per width and λ."""
    row: dict[str, float] = {}
    for kind, table in (("acc", scores.accuracy), ("racc", scores.robust)):
        for lam, values in table.items():
            for width, value in zip(scores.widths, values):
                row[f"{kind}-w{width_key(width)}-l{lam}"] = value
    for kind, stats in (("cacc", scores.client), ("vacc", scores.val_client)):
        for lam, entries in stats.items():
            for width, stat in zip(scores.widths, entries):
                row[f"{kind}-w{width_key(width)}-l{lam}"] = stat.mean
    if scores.val_client:
        row["val-score"] = scores.validation_score()
    return row


def _width_numbers(scores: WidthScores, i: int) -> dict[str, Any]:
    """The λ = 0 numbers of ``scores.widths[i]``: pooled and per-client accuracy."""
    out: dict[str, Any] = {"accuracy": scores.accuracy[0.0][i]}
    if scores.client:
        out["client_accuracy"] = scores.client[0.0][i].as_dict()
        out["val_client_accuracy"] = scores.val_client[0.0][i].as_dict()
    return out


def build_summary(cfg: RunConfig, method: Method, scores: WidthScores, extra: dict) -> dict:
    """``{"widths": {"0.125": {"accuracy", "robust_accuracy", "params", "macs", "by_lambda"}}, ...}``.

    ``accuracy`` is the standard model (λ = 0); ``robust_accuracy`` is PGD accuracy of the most
    robust λ evaluated (the largest λ when some clients train adversarially, else λ = 0).
    """
    spec = method.spec
    robust_lambda = max(cfg.lambdas) if cfg.federation.adv_fraction > 0 else 0.0
    train_scores: WidthScores | None = extra.pop("train_scores", None)
    widths: dict[str, dict[str, Any]] = {}
    for i, width in enumerate(scores.widths):
        model = method.cost_model(width)
        by_lambda = {}
        for lam in cfg.lambdas:
            entry: dict[str, Any] = {"accuracy": scores.accuracy[lam][i]}
            entry["robust_accuracy"] = scores.robust[lam][i] if scores.robust else None
            if scores.client:
                entry["client_accuracy"] = scores.client[lam][i].as_dict()
            if scores.robust_client:
                entry["robust_client_accuracy"] = scores.robust_client[lam][i].as_dict()
            by_lambda[str(lam)] = entry
        widths[width_key(width)] = {
            "bases": model.num_bases,
            **_width_numbers(scores, i),
            "robust_accuracy": scores.robust[robust_lambda][i] if scores.robust else None,
            "params": count_params(model),
            "macs": count_macs(model, (spec.in_channels, spec.image_size, spec.image_size)),
            "by_lambda": by_lambda,
        }
        if train_scores is not None:  # accuracy on training data and the generalisation gaps
            row = widths[width_key(width)]
            row["train_accuracy"] = train_scores.accuracy[0.0][i]
            row["train_robust_accuracy"] = train_scores.robust[robust_lambda][i] if train_scores.robust else None
            if row["train_robust_accuracy"] is not None and row["robust_accuracy"] is not None:
                row["robust_gap"] = row["train_robust_accuracy"] - row["robust_accuracy"]
    best: dict | None = extra.pop("best", None)
    return {
        "method": method.name,
        "widths": widths,
        "best": best,
        "budget_respecting_widths": [width_key(w) for w in scores.widths if method.respects_budgets(w)],
        "lr": cfg.training.lr,
        "robust_lambda": robust_lambda,
        "atom_width": spec.atom_width,
        "num_bases": spec.num_bases,
        "dataset": cfg.data.dataset,
        "model": cfg.model.model,
        "seed": cfg.seed,
        "rounds": cfg.federation.num_rounds,
        **extra,
    }


def _stop_on_node_check(problems: list[str]) -> None:
    """A node that failed a technique's start-up check (``techniques.base.NodeCheckError``) stops
    the run with one line, before any client trains: a federation whose nodes would train
    differently (e.g. with different learned optimizers) is not the run that was asked for."""
    from techniques.base import NODE_CHECK_FAILED

    failed = [p for p in problems if NODE_CHECK_FAILED in p]
    if failed:
        first = failed[0]
        detail = first[first.index(NODE_CHECK_FAILED) :].split("'>")[0].strip()
        # "node 7" (a profile query) or "round 1: node 7 (partition 2)" (a first train message)
        node = first[: first.index(NODE_CHECK_FAILED)].split(": profile query failed")[0].split(" failed:")[0]
        more = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
        raise RuntimeError(f"{node}: {detail}{more}")


def _wait_for_nodes(grid: Grid, cfg: RunConfig, say: Reporter) -> list[int]:
    """In a deployment SuperNodes connect over time: wait up to ``client-wait`` seconds for
    ``num-clients`` of them (a line every ``PROGRESS_EVERY`` s says how many are in), then go on
    with whoever is connected; fewer than ``min-train-clients`` by then is an error."""
    wait, wanted = cfg.federation.client_wait, cfg.federation.num_clients
    nodes = _poll_until_count(
        lambda: list(grid.get_node_ids()),
        wanted,
        wait,
        1.0,
        lambda n, left: say(f"{n}/{wanted} nodes connected; waiting up to {left:.0f}s more (client-wait)"),
    )
    if len(nodes) < cfg.federation.min_train_clients:
        raise RuntimeError(
            f"only {len(nodes)} node(s) connected within client-wait = {wait:g}s (min-train-clients = {cfg.federation.min_train_clients})"
        )
    return nodes


def _poll_until_count(read: Callable[[], list[int]], wanted: int, wait: float, every: float, report: Callable[[int, float], None]) -> list[int]:
    """Call ``read`` every ``every`` s until it lists ``wanted`` nodes or ``wait`` s passed; while
    waiting, ``report(count, seconds left)`` every ``PROGRESS_EVERY`` s. Returns the last list."""
    start = time.monotonic()
    next_report = start
    nodes = read()
    while len(nodes) < wanted and time.monotonic() - start < wait:
        if time.monotonic() >= next_report:
            report(len(nodes), wait - (time.monotonic() - start))
            next_report = time.monotonic() + PROGRESS_EVERY
        time.sleep(every)
        nodes = read()
    return nodes


def simulation_node_ids(grid: Grid) -> list[int] | None:
    """A simulation's node ids in partition order, or None when ``grid`` is not Flower's
    in-memory simulation grid. Flower's Simulation Engine registers partition ``i`` as the
    ``i``-th node (``vce_api._register_nodes``), and the in-memory link state keeps nodes in
    registration order; every reply's ``partition-id`` is checked against this map. A grid of
    our own that knows its nodes' partitions (``server/local_grid.py``) says so itself."""
    if hasattr(grid, "partition_node_ids"):
        return list(grid.partition_node_ids())
    if type(grid).__name__ != "InMemoryGrid":
        return None
    return [info.node_id for info in grid.state.get_node_info()]  # type: ignore[attr-defined]


EVAL_STREAM = 4242  # seed stream of the eval-clients sample
CLIENT_STATE = "client-state"  # run-folder subfolder of the nodes' saved Context state (simulation)
DEPLOYMENT_GRIDS = ("HttpGrid", "GrpcGrid")  # grids of a SuperLink deployment (nodes on other machines)


def pooled_validation(cfg: RunConfig, partitions: list[int] | None = None) -> ArrayData:
    """The validation splits of ``partitions`` (default: every client) together (a simulation's
    server can read them; what ranks Split-Mix bases for ``query --select best``)."""
    data = cfg.data_config()
    parts = [client_splits(data, p).val for p in (range(data.num_partitions) if partitions is None else partitions)]
    return ArrayData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def stateful_clients(cfg: RunConfig) -> str | None:
    """Why this run's clients keep state across rounds (in their Flower Context), or None.

    Such state lives in the client processes, not in the server's checkpoint: in simulation the
    nodes save it per round under ``client-state/`` (``clients/node_state.py``) so a resume gets
    it back; a run without that folder (a deployment) cannot be resumed exactly.
    """
    for technique in cfg.active_techniques():
        reason = technique.stateful_reason(cfg)
        if reason is not None:
            return reason
    return cfg.make_method().stateful_reason()


def resume_blocker(cfg: RunConfig, run: str | Path) -> str | None:
    """Why ``run`` cannot be resumed exactly (None: it can): stateful clients without saved state."""
    reason = stateful_clients(cfg)
    if reason is None or (Path(run) / CLIENT_STATE).is_dir():
        return None
    return f"{reason} and no {CLIENT_STATE}/ was saved"


def _rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    """The server process's global RNG states (torch, numpy, random) as tensors + JSON."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch-rng": torch.get_rng_state(), "numpy-rng": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))}
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "random": [version, list(internal), gauss_next]}


def _set_rng_states(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["torch-rng"])
    name, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, tensors["numpy-rng"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class Totals:
    """Run-wide counters, checkpointed with each round."""

    values: dict = field(default_factory=lambda: {"bytes_down": 0, "bytes_up": 0, "failures": 0, "rejected": 0, "train_s": 0.0, "eval_s": 0.0})

    def add_round(self, row: dict, train_s: float, eval_s: float) -> None:
        for key in ("bytes_down", "bytes_up", "failures", "rejected"):
            self.values[key] += int(row.get(key.replace("_", "-"), 0))
        self.values["train_s"] += train_s
        self.values["eval_s"] += eval_s


class Federation:
    """One run: its config, method, techniques, strategy, evaluator and run folder."""

    def __init__(self, grid: Grid, cfg: RunConfig, say: Reporter, store: RunStore) -> None:
        self.grid, self.cfg, self.say, self.store = grid, cfg, say, store
        self.method: Method = cfg.make_method()
        self.techniques: list[Technique] = cfg.active_techniques()
        spec = self.method.spec
        self.context = ServerContext(run=cfg, method=self.method)
        task = cfg.client_task(spec)
        if stateful_clients(cfg) and type(grid).__name__ not in DEPLOYMENT_GRIDS:  # simulation: nodes save their state
            task = task.with_state_dir(str(store.root / CLIENT_STATE))
        self.task_json = task.to_json()
        self.device = resolve_device(cfg.system.device)
        self.best: dict | None = None  # the evaluated round with the best validation score
        self._contacted = False  # whether this process has sent the nodes work yet
        self._eval_rows: np.ndarray | None = None  # simulation: the partitions that evaluate (fixed per run)
        self._served: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None  # (state, served)
        fed = cfg.federation
        self.lr_at = (
            (lambda r: cosine_lr(cfg.training.lr, r, fed.num_rounds)) if cfg.training.lr_schedule == "cosine" else (lambda r: cfg.training.lr)
        )
        self.strategy = self.method.strategy(self.task_json, fed.fraction_train, fed.min_train_clients, fed.seed, self.lr_at)
        self.strategy.aggregation, self.strategy.trim_fraction = fed.aggregation, fed.trim_fraction

    def initial_state(self) -> dict[str, torch.Tensor]:
        state = self.method.initial_state(self.cfg.seed)
        self.context.prunable = set(prunable_parameters(self.method.single_unit_model()))  # after: it draws from the RNG
        for technique in self.techniques:
            state = technique.initial_state(state, self.context)
        return state

    def served(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model evaluated and finally stored: the techniques' served model (e.g. the sparse
        one when every client is sparse) and, for static BN, the statistics gathered from the
        clients' training data (asked once per state)."""
        if self._served is not None and self._served[0] is state:
            return self._served[1]
        served = state
        for technique in self.techniques:
            served = technique.served_state(served, self.context)
        if self.method.needs_bn_stats:
            stats = gather_bn_stats(
                lambda m, t: self.send(m, t, "BN statistics"), self.nodes(), self.method, served, self.task_json, self.cfg.federation.round_timeout
            )
            served = self.method.with_bn_stats(served, stats)
        self._served = (state, served)
        return served

    def nodes(self) -> list:
        """The nodes that evaluate (and give static BN statistics): every connected node with
        data, or an ``eval-clients`` sample of them drawn once per run (seeded)."""
        strategy = self.strategy
        if strategy.table is not None:
            if self._eval_rows is None:  # drawn once: O(population) numpy work, not per evaluation
                self._eval_rows = self._eval_sample(np.flatnonzero(strategy.table.num_examples > 0))
            return [strategy.table.profile(int(r)) for r in self._eval_rows]
        connected = sorted(strategy.online if strategy.online is not None else strategy.profiles)
        online = self._eval_sample(np.array(connected, dtype=np.uint64))  # Flower node ids use all 64 bits
        profiles, stats = strategy.known_profiles(online.tolist())
        self._record_queries(stats.problems)
        return sorted(profiles, key=lambda p: p.partition_id)

    def _eval_sample(self, candidates: np.ndarray) -> np.ndarray:
        """``candidates`` (sorted), or a seeded sample of ``eval-clients`` of them (sorted)."""
        cap = self.cfg.evaluation.eval_clients
        if not 0 < cap < len(candidates):
            return candidates
        return np.sort(np.random.default_rng([self.cfg.seed, EVAL_STREAM]).choice(candidates, size=cap, replace=False))

    def evaluate(self, state: dict[str, torch.Tensor], robust: bool) -> WidthScores:
        """The served model on every client's own validation and test splits."""
        return evaluate_on_clients(
            lambda messages, timeout: self.send(messages, timeout, "evaluation"),
            self.nodes(),
            self.method,
            self.served(state),
            self.task_json,
            self.cfg.lambdas,
            robust,
            self.cfg.federation.round_timeout,
        )

    def discover(self) -> float:
        """Who takes part, without a message per node; returns the start-up seconds.

        Simulation: every partition's profile is derived from the run (``strategies/node_profiles.py``).
        Deployment: wait for the nodes to connect; each is asked for its profile when first
        sampled or evaluated, through :meth:`send` (which waits for slow nodes)."""
        cfg, strategy = self.cfg, self.strategy
        start = time.perf_counter()
        ids = simulation_node_ids(self.grid)
        if ids is not None:
            ids = self._all_registered(ids)
            from splitmix.data import partition_sizes

            table = derive_profiles(cfg.client_task(self.method.spec), ids, partition_sizes(cfg.data_config()).train)
            strategy.use_table(table)
            empty = int((table.num_examples == 0).sum())
            if empty:
                self.say(f"{empty} of {len(table)} clients hold no training examples: they are never sampled")
            known = len(table) - empty
        else:
            known = len(_wait_for_nodes(self.grid, cfg, self.say))
            strategy.attach(lambda messages: self.send(messages, cfg.federation.client_wait, "profile query"), cfg.federation.client_wait)
            if known != cfg.federation.num_clients:
                log.warning(
                    "num-clients = %d but %d node(s) are connected: only their partitions take part "
                    '(with `flwr run`, pass --federation-config "num-supernodes=%d")',
                    cfg.federation.num_clients,
                    known,
                    cfg.federation.num_clients,
                )
        startup = time.perf_counter() - start
        self.say(f"{known} clients ready in {startup:.1f}s; run folder {self.store.root}")
        return startup

    def _all_registered(self, ids: list[int]) -> list[int]:
        """A simulation's ServerApp starts while Flower is still registering the virtual nodes
        (seconds at 10⁵ nodes): wait, up to ``client-wait``, until all ``num-clients`` are in."""
        wanted, wait = self.cfg.federation.num_clients, self.cfg.federation.client_wait
        if not hasattr(self.grid, "partition_node_ids"):  # an in-process grid has every node from the start
            ids = _poll_until_count(
                lambda: simulation_node_ids(self.grid) or [],
                wanted,
                wait,
                0.1,
                lambda n, left: self.say(f"{n}/{wanted} virtual nodes registered; waiting up to {left:.0f}s more"),
            )
        if len(ids) != wanted:
            raise RuntimeError(f"{len(ids)} of num-clients = {wanted} virtual nodes registered within client-wait = {wait:g}s")
        return ids

    def send(self, messages: list, timeout: float, what: str) -> list:
        """Send and wait for the replies (up to ``timeout`` s), saying whom it still waits for."""

        def name_of(node: int) -> str:
            profile = self.strategy.profile_of(node)
            return f"node {node}" + (f" (partition {profile.partition_id})" if profile is not None else "")

        if not type(self.grid).__module__.startswith("flwr."):  # an in-process grid answers at once (tests, studies)
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        return send_and_wait(self.grid, messages, timeout, self.say, what, name_of)

    def _record_queries(self, problems: list[str], rnd: int = 0) -> None:
        """Profile-query problems go to the run's events; a failed node check stops the run."""
        self.store.append_events(rnd, problems)
        _stop_on_node_check(problems)

    def train_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict, float]:
        """Send work, wait for replies, aggregate; returns (new arrays, metrics row, seconds)."""
        t0 = time.perf_counter()
        fed = self.cfg.federation
        self.strategy.refresh(self.grid)  # a deployment's nodes come and go
        messages = list(self.strategy.configure_train(rnd, arrays, ConfigRecord(), self.grid))
        for stats in self.strategy.query_stats:  # profiles asked for the nodes just sampled
            self._record_queries(stats.problems, rnd)
        self.strategy.query_stats.clear()
        # The first messages of a process meet nodes that may still be starting (importing torch,
        # loading data): they get the start-up deadline too.
        timeout = max(fed.round_timeout, fed.client_wait) if not self._contacted else fed.round_timeout
        self._contacted = True
        replies = self.send(messages, timeout, f"train round {rnd}")
        new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
        _stop_on_node_check(self.strategy.last_round.problems)  # a node whose first train message failed its checks
        train_s = time.perf_counter() - t0
        row = {"round": rnd, "lr": self.lr_at(rnd), "train-seconds": train_s, **dict(metrics or {})}
        self.context.rows.append(row)  # server hooks see the round (e.g. Flying Bird+'s unit densities)
        return (arrays if new_arrays is None else new_arrays), row, train_s

    def evaluate_round(self, rnd: int, state: dict[str, torch.Tensor], row: dict) -> WidthScores | None:
        ev, final = self.cfg.evaluation, rnd == self.cfg.federation.num_rounds
        if not (final or rnd % ev.eval_every == 0):
            return None
        robust = ev.eval_pgd_steps > 0 and (final or (ev.eval_robust_every > 0 and rnd % ev.eval_robust_every == 0))
        scores = self.evaluate(state, robust)
        row.update(_score_columns(scores))
        score = scores.validation_score()
        if self.best is None or (score == score and score > self.best["score"]):  # NaN never wins
            self.best = {
                "round": rnd,
                "score": score,
                "criterion": "mean over widths of validation client accuracy (λ = 0)",
                "widths": {width_key(w): _width_numbers(scores, i) for i, w in enumerate(scores.widths)},
            }
        return scores

    def finish(self, state: dict[str, torch.Tensor], scores: WidthScores | None, totals: dict, startup: float) -> Path:
        """Final model, summary, CSV and plots."""
        cfg, store, method, device = self.cfg, self.store, self.method, self.device
        if scores is None:  # resumed after the last round's checkpoint: evaluate the final model again
            scores = self.evaluate(state, cfg.evaluation.eval_pgd_steps > 0)
        state = self.served(state)
        sparse = cfg.techniques["sparse"]
        sparsity = sparse.sparsity if sparse.method != "none" else 0.0  # type: ignore[attr-defined]
        store.save_weights(state, {"round": str(cfg.federation.num_rounds), "sparsity": str(sparsity)})
        if hasattr(method, "base_accuracy"):  # Split-Mix: lets queries pick the best k bases (by validation data)
            val = pooled_validation(cfg, [p.partition_id for p in self.nodes()] if self.strategy.table is not None else None)
            totals["base_accuracy"] = method.base_accuracy({k: v.to(device) for k, v in state.items()}, val.x.to(device), val.y.to(device))
        extra_summary: dict = {"best": self.best}
        calibration = train_sample(cfg.data_config(), 2048, cfg.seed).x if method.local_norms else None
        if cfg.evaluation.eval_train_examples > 0:  # robust generalisation gap: the same evaluation on training data
            sample = train_sample(cfg.data_config(), cfg.evaluation.eval_train_examples, cfg.seed)
            evaluator = Evaluator(method, sample, cfg.lambdas, cfg.pgd(max(cfg.evaluation.eval_pgd_steps, 1)), device, calibration=calibration)
            extra_summary["train_scores"] = evaluator.evaluate(state, cfg.evaluation.eval_pgd_steps > 0)
        if cfg.model.is_vit:  # patch-token similarity per block of the widest model (AttnScale/FeatScale study)
            test = test_data(cfg.data_config())
            extra_summary["oversmoothing"] = oversmoothing_profile(method, {k: v.to(device) for k, v in state.items()}, test.x[:256], calibration)
        rows = store.rounds()
        for technique in self.techniques:
            extra_summary.update(technique.summary(rows, cfg))
        summary = build_summary(
            cfg,
            method,
            scores,
            {
                "communication": {"bytes_down": totals["bytes_down"], "bytes_up": totals["bytes_up"]},
                "failures": totals["failures"],
                "rejected": totals["rejected"],
                "timing": {"startup_s": startup, "train_s": totals["train_s"], "eval_s": totals["eval_s"]},
                **({"base_accuracy": totals["base_accuracy"]} if "base_accuracy" in totals else {}),
                **extra_summary,
            },
        )
        store.write_json("summary.json", summary)
        store.write_csv()
        plot_accuracy_per_width(store.rounds(), list(summary["widths"]), store.root / "accuracy_per_width.png")
        plot_robustness(summary, store.root / "robustness.png")
        return store.root


def run_federation(grid: Grid, cfg: RunConfig, report: Reporter | None = None, resume: str | Path | None = None) -> Path:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid``; returns the run folder.

    Each completed round writes ``checkpoint.safetensors`` (atomically). With ``resume`` (a run
    folder) the run continues after that folder's last checkpoint and ends with the same weights
    as an uninterrupted run.
    """
    say = report or (lambda text: log.info(text))
    checkpoint = None
    if resume is not None:
        reason = resume_blocker(cfg, resume)
        if reason is not None:
            raise RuntimeError(f"cannot resume run '{resume}' exactly: {reason}, which the server does not checkpoint")
        store = RunStore(Path(resume).resolve())
        checkpoint = store.load_checkpoint()
    else:
        store = RunStore.create(cfg.system.out_dir, cfg.system.run_name)
    fed = Federation(grid, cfg, say, store)
    method, strategy = fed.method, fed.strategy
    if checkpoint is None:
        store.write_json(
            "config.json",
            {
                "run_config": cfg.to_run_config(),
                "method": method.name,
                "spec": method.spec.to_dict(),
                "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
            },
        )
    if hasattr(grid, "pull_interval"):  # simulation's in-memory grid polls replies every 0.1 s
        grid.pull_interval = min(grid.pull_interval, 0.01)
    startup = fed.discover()

    state = fed.initial_state()
    arrays = to_record(state)
    totals = Totals()
    scores: WidthScores | None = None
    first = 1
    if checkpoint is not None:  # continue after the last completed round
        weights, extra_tensors, saved = checkpoint
        arrays, state = to_record(weights), weights
        strategy.load_state_dict(saved["strategy"])
        totals.values.update(saved["totals"])
        fed.best = saved.get("best")
        first = int(saved["round"]) + 1
        store.truncate(first - 1)
        fed.context.rows = store.rounds()
        _set_rng_states(extra_tensors, saved["rng"])
        say(f"resuming {store.root} after round {first - 1}/{cfg.federation.num_rounds}")
    for rnd in range(first, cfg.federation.num_rounds + 1):
        arrays, row, train_s = fed.train_round(rnd, arrays)
        state = to_tensors(arrays)
        store.save_weights(state, {"round": str(rnd)})
        t1 = time.perf_counter()
        scores = fed.evaluate_round(rnd, state, row) or scores
        eval_s = time.perf_counter() - t1
        if rnd == cfg.federation.rewind_round:  # IMP's rewinding point for `splitmix prune`
            store.save_rewind(fed.served(state), rnd)
        row["eval-seconds"] = eval_s
        store.append_round(row)
        store.append_events(rnd, strategy.last_round.problems)
        totals.add_round(row, train_s, eval_s)
        rng_tensors, rng_state = _rng_states()
        saved = {"round": rnd, "strategy": strategy.state_dict(), "totals": totals.values, "rng": rng_state, "best": fed.best}
        store.save_checkpoint(state, rng_tensors, saved)
        accuracy = (
            f"client acc@{scores.widths[-1]:g} {scores.client[0.0][-1].mean:.3f}  @{scores.widths[0]:g} {scores.client[0.0][0].mean:.3f}"
            if scores is not None and scores.client and f"cacc-w{width_key(scores.widths[0])}-l0.0" in row
            else "(not evaluated)"
        )
        say(
            f"round {rnd:>3}/{cfg.federation.num_rounds}  {method.name}  loss {row.get('train-loss', float('nan')):.3f}  {accuracy}  "
            f"valid {row.get('valid', 0)}/{row.get('sampled', 0)}  {train_s:.1f}s+{eval_s:.1f}s"
        )
    return fed.finish(state, scores, totals.values, startup)
