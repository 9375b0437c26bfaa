"""``splitmix simulate``: run the federation on Flower's Simulation Engine (Ray backend).

The ServerApp is built in-process around the already validated config (so ``--config`` files
and overrides need no round trip through pyproject), and the ClientApp is the same
``clients.app:app`` that ``flwr run .`` and SuperNodes load.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Reporter, run_federation
from server.raylet_lookup import prompt_raylet_lookup
from server.shutdown import reap_orphaned_ray_processes, stop_on_signals
from splitmix.config import RunConfig


def resume_config(run: str | Path) -> RunConfig:
    """The validated run config of an existing run folder (its ``config.json``)."""
    import json

    from splitmix.config import ConfigError

    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{run}' is not a run folder (no config.json)")
    return RunConfig.from_mapping(json.loads(path.read_text())["run_config"])


def backend_config(cfg: RunConfig) -> dict:
    """Ray resources per virtual client: one CPU (and one torch thread) per actor by default,
    so a 2-core machine runs two actors without oversubscribing the cores. ``ray-address``
    connects to a running Ray cluster instead of starting one (never with ``num_cpus`` or
    ``runtime_env`` in ``init_args``: Ray refuses those when connecting; :func:`start_ray` sets the latter)."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.system.ray_address:  # join an existing cluster (`ray start --head` …): Ray then owns the resources
        init_args["address"] = cfg.system.ray_address
    return {
        "client_resources": {"num_cpus": cfg.system.client_num_cpus, "num_gpus": cfg.system.client_num_gpus},
        "init_args": init_args,
    }


def start_ray(init_args: dict) -> None:
    """``ray.init`` as Flower's Ray backend would call it (the project's ``sys.path`` exported as
    PYTHONPATH for the actors, no dashboard), but here, so that :func:`simulate` can take SIGTERM
    back from Ray right after it (``server/shutdown.py``); Flower then finds Ray running and uses it.

    A Ray instance started here inherits this process's environment, PYTHONPATH included, so the
    actors need no runtime environment, and Flower's actors take the worker processes Ray
    prestarts during ``ray.init`` (a job-level ``runtime_env`` would make Ray start new ones:
    ~1 s more before round 1 can train). Joining a cluster (``ray-address``), the workers were
    started elsewhere: there the path goes in the job's ``runtime_env``. Starting Ray here, its
    lookup of the raylet it started polls every 20 ms instead of every second
    (``server/raylet_lookup.py``)."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    if "address" in init_args:
        ray.init(**{"include_dashboard": False, "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, **init_args})
        return
    with prompt_raylet_lookup():  # Ray's own lookup of the new raylet sleeps in 1 s steps
        ray.init(**{"include_dashboard": False, **init_args})


def simulate(cfg: RunConfig, report: Reporter | None = None, quiet_flower: bool = True, resume: str | Path | None = None) -> Path:
    """Run one simulation (or, with ``resume``, continue that run folder after its last
    checkpoint); returns the run folder. Raises what the server loop raised, and
    :class:`splitmix.data.DataError` (one line) before the Ray backend starts when the dataset
    is missing or damaged (with ``download = true`` it is fetched here first, once), and
    ``FileNotFoundError`` (one line) when a learned optimizer's artifact is missing.

    SIGTERM and SIGINT end the run within seconds, also while Ray starts, with every Ray process
    it started and exit code 128 + the signal; the last completed round's checkpoint stays
    (``server/shutdown.py``). Ray processes that a killed earlier run left behind are ended first."""
    from splitmix.data import check_data

    check_data(cfg.data_config())  # fail fast, before the Ray backend starts
    cfg.client_task()  # the techniques' server-side set-up, e.g. hashing the learned optimizer's artifact (FileNotFoundError)

    import ray
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server import simulation_engine

    simulation_engine.install()  # dispatch and node contexts that scale with the sampled clients

    if quiet_flower:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["run_dir"] = run_federation(grid, cfg, report, resume=resume)
        except BaseException as err:  # surfaced to the caller below
            outcome["error"] = err
            raise

    backend = backend_config(cfg)
    with stop_on_signals() as guard:
        stale = reap_orphaned_ray_processes()
        if stale and report is not None:
            pids = ", ".join(map(str, stale))
            report(f"ended {len(stale)} Ray process(es) whose Ray session had ended (a killed earlier run's, or one still exiting): pids {pids}")
        started = time.perf_counter()
        try:
            start_ray(backend["init_args"])
        except SystemExit as exc:  # Ray's own SIGTERM handler during ray.init: sys.exit(SIGTERM)
            if exc.code == signal.SIGTERM:
                guard.stop(signal.SIGTERM)
            raise
        guard.install()  # ray.init took SIGTERM (a sys.exit, then a C++ abort): ours again
        if report is not None:
            report(f"Ray started in {time.perf_counter() - started:.1f}s")
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients, backend_config=backend)
        finally:
            if ray.is_initialized():  # Flower shuts Ray down when its backend ran; not when it failed before
                ray.shutdown()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "run_dir" not in outcome:
        raise RuntimeError("the simulation ended without running the server loop (see Flower's log above)")
    return outcome["run_dir"]  # type: ignore[return-value]
