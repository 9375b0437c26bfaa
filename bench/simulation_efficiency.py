"""How much does Flower's simulation engine cost on top of the training it runs?

(a) the default digits workload with 100 clients through ``splitmix simulate``'s engine
    (Flower Simulation Engine, Ray backend), timing the training rounds (configure, send,
    client training, receive, validate, aggregate);
(b) the same local training — same clients, same bases per client, same data, same seeds, same
    recipe — plus the same per-base averaging, as a plain sequential torch loop in one process.

Start-up is printed on its own line and excluded from the ratios: the seconds until the server
is ready to train (imports, Ray, Flower's node registration, the derived profiles) plus what
round 1 takes beyond a steady round (actors start, import torch, load their data). Steady-state
efficiency compares rounds 2.. only. The figures end the output as ``key: number`` lines
(``startup_s``, ``ray_init_s``, ``round1_extra_s``, ``steady_state_efficiency``; ``tools/bench_record.py``
stores them); the last line is ``efficiency: X`` with X = time(b) / time(a) over all rounds.

    python bench/simulation_efficiency.py [--clients 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from clients.recipe import train_bases
from models.splitmix import base_key, init_global_state, is_adversarial_tensor, load_stacked, select_bases, split_stacked_state
from splitmix.config import RunConfig, load_config, parse_overrides
from splitmix.data import client_train_data
from splitmix.profiles import make_profile
from strategies.base import client_seed
from strategies.splitmix import BaseScheduler, cosine_lr


def framework(cfg: RunConfig) -> dict:
    """One ``simulate()`` call; its timings (start-up split into what happens before the server
    is ready and what round 1 costs beyond a steady round: actor start, imports, data)."""
    from server.simulation import simulate

    said: list[tuple[float, str]] = []
    start = time.perf_counter()
    run = simulate(cfg, report=lambda text: said.append((time.perf_counter() - start, text)))
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["train-seconds"] for r in rounds]
    ready = next(t for t, text in said if "clients ready" in text)
    ray_up = next(t for t, text in said if text.startswith("Ray started"))
    steady = float(np.median(train[1:])) if len(train) > 1 else train[0]
    return {
        "wall": wall,
        "ready": ready,
        "ray_up": ray_up,
        "round1_extra": max(train[0] - steady, 0.0),
        "train": train,
        "client_time": [r["client-time"] for r in rounds],
    }


def plain_loop(cfg: RunConfig, threads: int) -> list[float]:
    """Sequential torch: the same assignment rule, data, seeds and recipe, no framework."""
    torch.set_num_threads(threads)
    spec, task = cfg.spec(), cfg.client_task()
    profiles = [
        make_profile(i, cfg.federation.num_clients, cfg.federation.budgets, cfg.federation.adv_fraction, cfg.seed)
        for i in range(cfg.federation.num_clients)
    ]
    for p in profiles:  # data loading belongs to start-up in (a) too
        client_train_data(task.data, p.partition_id)
    scheduler = BaseScheduler(spec.num_bases, np.random.default_rng(cfg.seed))
    state = init_global_state(spec, cfg.seed)
    models = {k: spec.build(k) for k in range(1, spec.num_bases + 1)}
    times = []
    for rnd in range(1, cfg.federation.num_rounds + 1):
        start = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for p in profiles:
            bases = scheduler.assign(spec.bases_for_budget(p.budget), group=p.budget)
            model = load_stacked(models[len(bases)], select_bases(state, bases))
            data = client_train_data(task.data, p.partition_id)
            seed = client_seed(cfg.seed, rnd, p.partition_id)
            train_bases(model, data, task.train, cosine_lr(cfg.training.lr, rnd, cfg.federation.num_rounds), p.adversarial, seed)
            for b, base_state in zip(bases, split_stacked_state(model.state_dict(), len(bases))):
                for name, t in base_state.items():
                    if not p.adversarial and is_adversarial_tensor(name):
                        continue
                    key = base_key(b, name)
                    sums[key] = sums.get(key, 0) + t.double() * len(data)
                    weights[key] = weights.get(key, 0.0) + len(data)
        state = {k: (sums[k] / weights[k]).float() if k in sums else v for k, v in state.items()}
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-config", default="", help='extra overrides, e.g. "client-num-cpus=2"')
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="splitmix-bench-")
    overrides = {
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "eval-pgd-steps": 0,  # evaluation is not part of the compared work
        "out-dir": out,
        "run-name": "bench",
    }
    cfg = load_config(overrides={**overrides, **parse_overrides(args.run_config)})
    # The plain loop runs first, on a quiet machine (no Ray processes yet, none shutting down).
    b1 = plain_loop(cfg, threads=1)
    b2 = plain_loop(cfg, threads=2)
    torch.set_num_threads(cfg.system.torch_threads)
    f = framework(cfg)
    round_times = f["train"]
    a = sum(round_times)
    b_rounds = min(b1, b2, key=sum)
    b = sum(b_rounds)
    steady = sum(b_rounds[1:]) / sum(round_times[1:]) if len(round_times) > 1 else float("nan")
    startup = f["ready"] + f["round1_extra"]
    workers = max(1, int((os.cpu_count() or 1) // max(cfg.system.client_num_cpus, 1)))  # Ray actors on this machine
    in_actor = sum(f["client_time"][1:])
    print(
        f"workload: digits, {cfg.federation.num_clients} clients, {cfg.federation.num_rounds} rounds, budgets {cfg.federation.budgets}, "
        f"adv-fraction {cfg.federation.adv_fraction}, {cfg.training.local_epochs} local epochs"
    )
    print(
        f"startup: {startup:.2f} s = {f['ray_up']:.2f} s until Ray is up (data check, ray.init) "
        f"+ {f['ready'] - f['ray_up']:.2f} s until the server is ready (Flower's node registration, profiles) "
        f"+ {f['round1_extra']:.2f} s that round 1 takes beyond a steady round (actors start, import, load data); "
        f"whole simulate() call {f['wall']:.2f} s"
    )
    print(f"(a) framework training rounds: {a:.2f} s  per round: {', '.join(f'{t:.2f}' for t in round_times)}")
    print(
        f"    rounds 2..: {sum(round_times[1:]):.2f} s wall; training inside the ClientApp {in_actor:.2f} s summed over clients "
        f"= {in_actor / max(workers, 1):.2f} s per actor ({workers} actors); the rest is dispatch, (de)serialisation, "
        "validation, aggregation and waiting for the last client"
    )
    print(
        f"(b) plain sequential torch loop: {b:.2f} s  per round: {', '.join(f'{t:.2f}' for t in b_rounds)}"
        f"  (1 thread {sum(b1):.2f} s, 2 threads {sum(b2):.2f} s)"
    )
    print(f"steady-state efficiency (rounds 2..{len(round_times)}): {steady:.3f}")
    print(f"startup_s: {startup:.2f}")
    print(f"ray_init_s: {f['ray_up']:.2f}")
    print(f"round1_extra_s: {f['round1_extra']:.2f}")
    print(f"steady_state_efficiency: {steady:.3f}")
    print(f"efficiency: {b / a:.3f}")


if __name__ == "__main__":
    main()
