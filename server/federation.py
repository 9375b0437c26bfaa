"""The server's round loop: discover clients, train, aggregate, evaluate, store.

This is what both entry points run: the ServerApp of ``flwr run .`` (``server/app.py``) and
``splitmix simulate`` (``server/simulation.py``). The strategy decides who trains what and how
replies are aggregated; this loop only sequences the rounds and records the results.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Callable

import flwr
import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from clients.app import resolve_device
from splitmix.protocol.codec import to_record, to_tensors
from splitmix.data import test_data, train_sample
from techniques.sparse_training import prune_state, sparse_initial_state, structured_state
from techniques.sparsity import prunable_parameters
from models.cost import count_macs, count_params
from splitmix.config import SimulationConfig
from server.evaluate import Evaluator, WidthScores
from server.oversmoothing import oversmoothing_profile
from server.plots import plot_accuracy_per_width, plot_robustness
from server.store import RunStore
from strategies.methods import Method
from strategies.splitmix import cosine_lr

log = logging.getLogger("splitmix")

Reporter = Callable[[str], None]


def width_key(width: float) -> str:
    """Summary/metrics key of a width: ``0.125``, ``0.25``, …, ``1.0``."""
    return str(round(width, 6))


def _score_columns(scores: WidthScores) -> dict[str, float]:
    row: dict[str, float] = {}
    for kind, table in (("acc", scores.accuracy), ("racc", scores.robust)):
        for lam, values in table.items():
            for width, value in zip(scores.widths, values):
                row[f"{kind}-w{width_key(width)}-l{lam}"] = value
    return row


def build_summary(cfg: SimulationConfig, method: Method, scores: WidthScores, extra: dict) -> dict:
    """``{"widths": {"0.125": {"accuracy", "robust_accuracy", "params", "macs", "by_lambda"}}, ...}``.

    ``accuracy`` is the standard model (λ = 0); ``robust_accuracy`` is PGD accuracy of the most
    robust λ evaluated (the largest λ when some clients train adversarially, else λ = 0).
    """
    spec = method.spec
    robust_lambda = max(cfg.lambdas) if cfg.adv_fraction > 0 else 0.0
    train_scores: WidthScores | None = extra.pop("train_scores", None)
    widths = {}
    for i, width in enumerate(scores.widths):
        model = method.cost_model(width)
        by_lambda = {}
        for lam in cfg.lambdas:
            entry = {"accuracy": scores.accuracy[lam][i]}
            entry["robust_accuracy"] = scores.robust[lam][i] if scores.robust else None
            by_lambda[str(lam)] = entry
        widths[width_key(width)] = {
            "bases": model.num_bases,
            "accuracy": scores.accuracy[0.0][i],
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
    return {
        "method": method.name,
        "widths": widths,
        "robust_lambda": robust_lambda,
        "atom_width": spec.atom_width,
        "num_bases": spec.num_bases,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "rounds": cfg.num_rounds,
        **extra,
    }


def _wait_for_nodes(grid: Grid, cfg: SimulationConfig, say: Reporter) -> None:
    """In a deployment SuperNodes connect over time: wait up to ``client-wait`` seconds for
    ``num-clients`` of them, then go on with whoever is connected (simulation: no wait)."""
    if type(grid).__name__ == "InMemoryGrid":  # simulation: every virtual node exists from the start
        return
    deadline = time.monotonic() + cfg.client_wait
    count = len(list(grid.get_node_ids()))
    if count < cfg.num_clients and cfg.client_wait > 0:
        say(f"{count}/{cfg.num_clients} nodes connected; waiting up to {cfg.client_wait:g}s for the rest")
    while count < cfg.num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
        count = len(list(grid.get_node_ids()))


CLIENT_STATE = "client-state"  # run-folder subfolder of the nodes' saved Context state (simulation)
DEPLOYMENT_GRIDS = ("HttpGrid", "GrpcGrid")  # grids of a SuperLink deployment (nodes on other machines)


def stateful_clients(cfg: SimulationConfig) -> str | None:
    """Why this run's clients keep state across rounds (in their Flower Context), or None.

    Such state lives in the client processes, not in the server's checkpoint: in simulation the
    nodes save it per round under ``client-state/`` (``clients/node_state.py``) so a resume gets
    it back; a run without that folder (a deployment) cannot be resumed exactly.
    """
    if cfg.sparse_method != "none" and cfg.sparse_fraction > 0:
        return f"sparse-method = '{cfg.sparse_method}' keeps each client's sparse masks in its node state"
    if cfg.optimizer != "sgd":
        return f"optimizer = '{cfg.optimizer}' keeps each client's optimizer state in its node state"
    if cfg.method == "fedbn":
        return "method = 'fedbn' keeps each client's batch-norm entries in its node state"
    return None


def resume_blocker(cfg: SimulationConfig, run: str | Path) -> str | None:
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


def run_federation(grid: Grid, cfg: SimulationConfig, report: Reporter | None = None, resume: str | Path | None = None) -> Path:
    """Run ``cfg.num_rounds`` Split-Mix rounds on ``grid``; returns the run folder.

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
        store = RunStore.create(cfg.out_dir, cfg.run_name)
    method = cfg.make_method()
    spec = method.spec
    task = cfg.client_task(spec)
    if stateful_clients(cfg) and type(grid).__name__ not in DEPLOYMENT_GRIDS:  # simulation: nodes save their state
        task = dataclasses.replace(task, state_dir=str(store.root / CLIENT_STATE))
    if cfg.fault_fraction > 0:  # a "timeout" fault sleeps past the round's deadline (bounded)
        task = dataclasses.replace(task, fault_delay=cfg.round_timeout + 1.0)
    if checkpoint is None:
        store.write_json(
            "config.json",
            {"run_config": cfg.to_run_config(), "method": method.name, "spec": spec.to_dict(), "versions": {"flwr": flwr.__version__, "torch": torch.__version__}},
        )
    if hasattr(grid, "pull_interval"):  # simulation's in-memory grid polls replies every 0.1 s
        grid.pull_interval = min(grid.pull_interval, 0.01)
    device = resolve_device(cfg.device)
    evaluator = Evaluator(method, test_data(cfg.data_config()), cfg.lambdas, cfg.pgd(max(cfg.eval_pgd_steps, 1)), device)
    lr_at = (lambda r: cosine_lr(cfg.lr, r, cfg.num_rounds)) if cfg.lr_schedule == "cosine" else (lambda r: cfg.lr)
    task_json = task.to_json()
    strategy = method.strategy(task_json, cfg.fraction_train, cfg.min_train_clients, cfg.seed, lr_at)
    strategy.aggregation, strategy.trim_fraction = cfg.aggregation, cfg.trim_fraction

    start = time.perf_counter()
    _wait_for_nodes(grid, cfg, say)
    discovery = strategy.discover(grid, task_json, cfg.round_timeout)
    store.append_events(0, discovery.problems)
    startup = time.perf_counter() - start
    if len(strategy.profiles) < cfg.min_train_clients:
        raise RuntimeError(
            f"only {len(strategy.profiles)} client(s) reported a profile (min-train-clients = {cfg.min_train_clients}); "
            + "; ".join(discovery.problems[:3])
        )
    if len(strategy.profiles) != cfg.num_clients:
        log.warning(
            "num-clients = %d but %d node(s) reported a profile: only their partitions take part "
            "(with `flwr run`, pass --federation-config \"num-supernodes=%d\")",
            cfg.num_clients, len(strategy.profiles), cfg.num_clients,
        )
    say(f"{len(strategy.profiles)} clients ready in {startup:.1f}s; run folder {store.root}")

    initial = method.initial_state(cfg.seed)
    prunable = set(prunable_parameters(spec.build(1)))
    if cfg.sparse_method in ("dynamic", "dynamic-plus", "random") and cfg.sparse_fraction == 1.0 and method.name not in ("heterofl", "sheterofl"):
        # every client starts on the same sparse sub-network of each unit: zero the rest
        initial = sparse_initial_state(initial, prunable, cfg.client_task(spec).sparse, cfg.seed)
    # With every client sparse, the model evaluated (and finally stored) is the sparse one.
    served = lambda st: st  # noqa: E731
    if cfg.sparse_method == "structured" and cfg.sparse_fraction == 1.0:
        single = spec.build(1) if method.name == "splitmix" else spec.build_width(1.0)
        served = lambda st: structured_state(st, prunable, cfg.sparsity, single)  # noqa: E731
    elif cfg.sparse_method not in ("none", "uvc") and cfg.sparse_fraction == 1.0:  # uvc masks differ per client
        served = lambda st: prune_state(st, prunable, cfg.sparsity)  # noqa: E731
    arrays = to_record(initial)
    totals = {"bytes_down": 0, "bytes_up": 0, "failures": 0, "rejected": 0, "train_s": 0.0, "eval_s": 0.0}
    scores: WidthScores | None = None
    first = 1
    if checkpoint is not None:  # continue after the last completed round
        weights, extra_tensors, saved = checkpoint
        arrays = to_record(weights)
        state = weights
        strategy.load_state_dict(saved["strategy"])
        totals.update(saved["totals"])
        first = int(saved["round"]) + 1
        store.truncate(first - 1)
        _set_rng_states(extra_tensors, saved["rng"])
        say(f"resuming {store.root} after round {first - 1}/{cfg.num_rounds}")
    for rnd in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        joined = strategy.discover(grid, task_json, cfg.round_timeout)  # new/restarted nodes; who is online
        store.append_events(rnd, joined.problems)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
        new_arrays, metrics = strategy.aggregate_train(rnd, replies)
        train_s = time.perf_counter() - t0
        if new_arrays is not None:
            arrays = new_arrays
        state = to_tensors(arrays)
        store.save_weights(state, {"round": str(rnd)})

        t1 = time.perf_counter()
        final = rnd == cfg.num_rounds
        row = {"round": rnd, "lr": lr_at(rnd), "train-seconds": train_s, **dict(metrics or {})}
        if final or rnd % cfg.eval_every == 0:
            robust = cfg.eval_pgd_steps > 0 and (final or (cfg.eval_robust_every > 0 and rnd % cfg.eval_robust_every == 0))
            scores = evaluator.evaluate(served(state), robust)
            row.update(_score_columns(scores))
        eval_s = time.perf_counter() - t1
        row["eval-seconds"] = eval_s
        store.append_round(row)
        store.append_events(rnd, strategy.last_round.problems)
        for key in ("bytes_down", "bytes_up", "failures", "rejected"):
            totals[key] += int(row.get(key.replace("_", "-"), 0))
        totals["train_s"] += train_s
        totals["eval_s"] += eval_s
        rng_tensors, rng_state = _rng_states()
        store.save_checkpoint(
            state, rng_tensors, {"round": rnd, "strategy": strategy.state_dict(), "totals": totals, "rng": rng_state}
        )
        accuracy = (
            f"acc@{scores.widths[-1]:g} {scores.accuracy[0.0][-1]:.3f}  acc@{scores.widths[0]:g} {scores.accuracy[0.0][0]:.3f}"
            if scores is not None and f"acc-w{width_key(scores.widths[0])}-l0.0" in row
            else "(not evaluated)"
        )
        say(
            f"round {rnd:>3}/{cfg.num_rounds}  {method.name}  loss {row.get('train-loss', float('nan')):.3f}  {accuracy}  "
            f"valid {row.get('valid', 0)}/{row.get('sampled', 0)}  {train_s:.1f}s+{eval_s:.1f}s"
        )

    if scores is None:  # resumed after the last round's checkpoint: evaluate the final model again
        scores = evaluator.evaluate(served(state), cfg.eval_pgd_steps > 0)
    state = served(state)
    store.save_weights(state, {"round": str(cfg.num_rounds), "sparsity": str(cfg.sparsity if cfg.sparse_method != "none" else 0.0)})
    if hasattr(method, "base_accuracy"):  # Split-Mix: lets queries pick the best k bases
        test = evaluator.test
        totals["base_accuracy"] = method.base_accuracy({k: v.to(device) for k, v in state.items()}, test.x.to(device), test.y.to(device))
    extra_summary: dict = {}
    if cfg.eval_train_examples > 0:  # robust generalisation gap: the same evaluation on training data
        sample = train_sample(cfg.data_config(), cfg.eval_train_examples, cfg.seed)
        train_scores = Evaluator(method, sample, cfg.lambdas, cfg.pgd(max(cfg.eval_pgd_steps, 1)), device).evaluate(state, cfg.eval_pgd_steps > 0)
        extra_summary["train_scores"] = train_scores
    if cfg.is_vit:  # patch-token similarity per block of the widest model (AttnScale/FeatScale study)
        test = evaluator.test
        extra_summary["oversmoothing"] = oversmoothing_profile(method, {k: v.to(device) for k, v in state.items()}, test.x[:256], test.x)
    rows = store.rounds()
    if cfg.sparse_method != "none":
        flops = [float(r.get("train-flops-fraction", 1.0)) for r in rows]
        extra_summary["sparse"] = {
            "method": cfg.sparse_method,
            "sparsity": cfg.sparsity,
            "fraction": cfg.sparse_fraction,
            "train_flops_fraction": sum(flops) / len(flops),
            "train_flops_saved": 1.0 - sum(flops) / len(flops),
        }
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
