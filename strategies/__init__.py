"""Federated methods as plugins (``strategies/registry.py``) and the aggregation kernel
(``strategies/aggregation.py``). Importing this package registers every method; a new method is
a module here plus its line below."""

# Registration order is the order methods are listed in the registry, so these are not sorted.
# isort: off
from strategies import splitmix, heterofl, sheterofl, fedavg, fedbn  # noqa: F401

# isort: on
from strategies.registry import METHODS, Method, make_method, register_method

__all__ = ["METHODS", "Method", "make_method", "register_method"]
