"""``splitmix simulate``: run the federation on Flower's Simulation Engine (Ray backend).

The ServerApp is built in-process around the already validated config (so ``--config`` files
and overrides need no round trip through pyproject), and the ClientApp is the same
``clients.app:app`` that ``flwr run .`` and SuperNodes load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Reporter, run_federation
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
    ``runtime_env`` in ``init_args``: Ray refuses those when connecting, Flower sets the latter)."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.system.ray_address:  # join an existing cluster (`ray start --head` …): Ray then owns the resources
        init_args["address"] = cfg.system.ray_address
    return {
        "client_resources": {"num_cpus": cfg.system.client_num_cpus, "num_gpus": cfg.system.client_num_gpus},
        "init_args": init_args,
    }


def simulate(cfg: RunConfig, report: Reporter | None = None, quiet_flower: bool = True, resume: str | Path | None = None) -> Path:
    """Run one simulation (or, with ``resume``, continue that run folder after its last
    checkpoint); returns the run folder. Raises what the server loop raised, and
    :class:`splitmix.data.DataError` (one line) before the Ray backend starts when the dataset
    is missing or damaged (with ``download = true`` it is fetched here first, once), and
    ``FileNotFoundError`` (one line) when a learned optimizer's artifact is missing."""
    from splitmix.data import check_data

    check_data(cfg.data_config())  # fail fast, before the Ray backend starts
    cfg.client_task()  # the techniques' server-side set-up, e.g. hashing the learned optimizer's artifact (FileNotFoundError)

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

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "run_dir" not in outcome:
        raise RuntimeError("the simulation ended without running the server loop (see Flower's log above)")
    return outcome["run_dir"]  # type: ignore[return-value]
