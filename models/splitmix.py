"""Split-Mix: N = 1/r independent base networks at atom width r, mixed by averaging logits.

The global model is a flat dict ``{"base{i}.<module path>": tensor}`` holding every base; this
is also the naming used in Flower messages, so a reply can be checked key by key against what
was sent. A model of width k·r is built on demand by stacking k bases into one
:class:`~models.blocks.StackedNet` whose ``forward`` is the mean of the bases' logits; the k bases
run as one batched computation (grouped convolutions), not a loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from models.blocks import StackedNet, make_static_bn_, set_route
from models.registry import create_model

_BASE_KEY = re.compile(r"^base(\d+)\.(.+)$")
_SKIPPED_BUFFERS = ("num_batches_tracked",)  # unused with a BN momentum; not federated


@dataclass(frozen=True)
class SplitMixSpec:
    """Everything needed to rebuild any base or mixture of a run."""

    arch: str = "cnn"
    atom_width: float = 0.125
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    dual_bn: bool = True
    track_stats: bool = True  # False: static BN (batch statistics only), as in SHeteroFL
    # Extra constructor keywords of the model family as canonical JSON (hashable, so a spec stays
    # a cache key), e.g. a ViT's topology: '{"depth": 12, "embed_dim": 256, "num_heads": 32}'.
    model_options: str = ""

    def __post_init__(self) -> None:
        n = 1.0 / self.atom_width
        if self.atom_width <= 0 or self.atom_width > 1 or abs(n - round(n)) > 1e-6:
            raise ValueError(f"atom width must be 1/N for an integer N >= 1, got {self.atom_width}")

    def options(self) -> dict:
        """``model_options`` parsed (empty when unset)."""
        return json.loads(self.model_options) if self.model_options else {}

    @property
    def num_bases(self) -> int:
        return int(round(1.0 / self.atom_width))

    def widths(self) -> list[float]:
        """Every mixable width k·r, k = 1..N."""
        return [k * self.atom_width for k in range(1, self.num_bases + 1)]

    def bases_for_width(self, width: float) -> int:
        """k such that k·r == width; rejects widths that are not a multiple of r."""
        k = width / self.atom_width
        if abs(k - round(k)) > 1e-6 or not 1 <= round(k) <= self.num_bases:
            allowed = ", ".join(f"{w:g}" for w in self.widths())
            raise ValueError(f"width {width:g} is not a multiple of the atom width {self.atom_width:g}; allowed: {allowed}")
        return int(round(k))

    def bases_for_budget(self, budget: float) -> int:
        """How many bases a client with compute budget ``budget`` (a width) trains: floor(budget/r)."""
        return min(self.num_bases, int(budget / self.atom_width + 1e-9))

    def build(self, num_bases: int) -> StackedNet:
        """A fresh stack of ``num_bases`` bases (randomly initialised, each independently)."""
        return self.build_width(self.atom_width, num_bases)

    def build_width(self, width: float, num_bases: int = 1, track_stats: bool | None = None) -> StackedNet:
        """A fresh network at any width (HeteroFL-style nested widths use ``num_bases=1``)."""
        model = create_model(
            self.arch,
            width=width,
            num_bases=num_bases,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            dual_bn=self.dual_bn,
            **self.options(),
        )
        keep_stats = self.track_stats if track_stats is None else track_stats
        return model if keep_stats else make_static_bn_(model)

    def to_dict(self) -> dict:
        return asdict(self)


def base_key(index: int, name: str) -> str:
    return f"base{index}.{name}"


def parse_base_key(key: str) -> tuple[int, str]:
    match = _BASE_KEY.match(key)
    if not match:
        raise KeyError(f"'{key}' is not a base tensor name (expected 'base<i>.<module path>')")
    return int(match.group(1)), match.group(2)


def _federated_items(state: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    return ((n, t) for n, t in state.items() if not n.endswith(_SKIPPED_BUFFERS))


def split_stacked_state(state: dict[str, torch.Tensor], num_bases: int) -> list[dict[str, torch.Tensor]]:
    """State of a k-stack → k per-base states (chunks along dim 0)."""
    bases: list[dict[str, torch.Tensor]] = [{} for _ in range(num_bases)]
    for name, tensor in _federated_items(state):
        for i, chunk in enumerate(tensor.chunk(num_bases, dim=0)):
            bases[i][name] = chunk.clone()
    return bases


def stack_base_states(bases: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """k per-base states → the state of a k-stack (inverse of :func:`split_stacked_state`)."""
    return {name: torch.cat([b[name] for b in bases], dim=0) for name in bases[0]}


def load_stacked(model: StackedNet, bases: Sequence[dict[str, torch.Tensor]], allow_missing_stats: bool = False) -> StackedNet:
    """Load k per-base states into a k-stack (checks every federated tensor is present).

    ``allow_missing_stats``: the states come from static-BN training (no running statistics) and
    the model will have its statistics re-estimated.
    """
    if len(bases) != model.num_bases:
        raise ValueError(f"model stacks {model.num_bases} bases, got {len(bases)} base states")
    missing, unexpected = model.load_state_dict(stack_base_states(bases), strict=False)
    skipped = _SKIPPED_BUFFERS + (("running_mean", "running_var") if allow_missing_stats else ())
    missing = [m for m in missing if not m.endswith(skipped)]
    if missing or unexpected:
        raise KeyError(f"base state mismatch: missing {missing}, unexpected {unexpected}")
    return model


def init_global_state(spec: SplitMixSpec, seed: int) -> dict[str, torch.Tensor]:
    """All N bases, independently initialised, as ``base{i}.<path>`` tensors."""
    torch.manual_seed(seed)
    stack = spec.build(spec.num_bases)
    return {base_key(i, name): t for i, base in enumerate(split_stacked_state(stack.state_dict(), spec.num_bases)) for name, t in base.items()}


def select_bases(global_state: dict[str, torch.Tensor], indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Per-base states of the bases ``indices`` (in that order) from the global dict."""
    per_base: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
    for key, tensor in global_state.items():
        i, name = parse_base_key(key)
        if i in per_base:
            per_base[i][name] = tensor
    return [per_base[i] for i in indices]


def build_mixture(
    spec: SplitMixSpec,
    global_state: dict[str, torch.Tensor],
    indices: Sequence[int],
    robustness: float = 0.0,
    allow_missing_stats: bool = False,
) -> StackedNet:
    """The width-``len(indices)·r`` model: the chosen bases stacked, in eval mode, λ set
    (``allow_missing_stats``: a BN path without statistics keeps mean 0, variance 1)."""
    model = load_stacked(spec.build(len(indices)), select_bases(global_state, indices), allow_missing_stats)
    if spec.dual_bn:
        set_route(model, float(robustness))
    elif robustness != 0.0:
        raise ValueError("this run has no dual batch norm; robustness must be 0")
    return model.eval()


def is_adversarial_tensor(name: str) -> bool:
    """Tensors of the adversarial BN path (trained only by adversarial clients)."""
    return ".adv." in f".{name}"
