"""Python API: ``import splitmix; run = splitmix.load_run(RUN); model = run.model(width=0.5, robustness=0.3)``.

``splitmix`` is also the home of what the server and the clients share (protocol, config, data,
profiles); the query API is imported lazily so importing those does not pull in the server.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QueryError", "Run", "load_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from server import query

        return getattr(query, name)
    raise AttributeError(f"module 'splitmix' has no attribute {name!r}")
