"""Python API: ``import splitmix; run = splitmix.load_run(RUN); model = run.model(width=0.5, robustness=0.3)``."""

from server.query import QueryError, Run, load_run

__all__ = ["QueryError", "Run", "load_run"]
