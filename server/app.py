"""The ServerApp for ``flwr run .``: read the run config, validate it, run the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import SimulationConfig
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = SimulationConfig.from_mapping(dict(context.run_config))
    run_dir = run_federation(grid, cfg)
    print(f"run folder: {run_dir}", flush=True)
