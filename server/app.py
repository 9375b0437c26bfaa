"""The ServerApp for ``flwr run .``: read the run config, validate it, run the federation."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from splitmix.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logger = logging.getLogger("splitmix")
    if not logger.handlers:  # progress lines appear in `flwr run --stream` / `flwr log`
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s splitmix: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    cfg = RunConfig.from_mapping(dict(context.run_config))
    run_dir = run_federation(grid, cfg)
    print(f"run folder: {run_dir}", flush=True)
