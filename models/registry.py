"""Model registry: ``create_model(name, width=..., **kw)`` builds any registered family.

Kept in the style of timm: families register a constructor under a name, callers never import a
model class directly, so configs and messages can refer to architectures by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from models.blocks import StackedNet

_REGISTRY: dict[str, Callable[..., StackedNet]] = {}  # every registered family builds a StackedNet


BuilderT = TypeVar("BuilderT", bound=Callable[..., StackedNet])


def register_model(name: str) -> Callable[[BuilderT], BuilderT]:
    def decorator(fn: BuilderT) -> BuilderT:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, width: float = 1.0, **kwargs) -> StackedNet:
    """Build model ``name`` at width multiplier ``width``.

    Common keyword arguments: ``num_bases`` (stacked independent bases, default 1),
    ``num_classes``, ``in_channels``, ``image_size``, ``dual_bn``.
    """
    _import_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return _REGISTRY[name](width=width, **kwargs)


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    from models import cnn, digit_model, preresnet, vit  # noqa: F401
