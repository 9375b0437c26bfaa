"""HeteroFL and SHeteroFL: one network, nested width slices.

A client of width w gets the leading w-fraction of the channels of every layer (the leading block
of every tensor, ``models/slicing.py``), trains it, and sends it back; each entry of the global
model is averaged, example-weighted, over exactly the clients whose slice holds it, and entries no
client held keep their value. SHeteroFL is the same with static batch norm (no running
statistics in training; the server re-estimates them on data before evaluating). FedAvg and FedBN
(``strategies/fedavg.py``) are the full-width special cases.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from splitmix.protocol.codec import encode, to_tensors
from models.slicing import leading_slices, slice_state
from models.splitmix import SplitMixSpec, is_adversarial_tensor
from strategies.base import FederatedStrategy, NodeProfile, RoundStats, TensorSpec

WidthOf = Callable[[NodeProfile], "float | None"]


def budget_width(profile: NodeProfile) -> float:
    """HeteroFL: a client trains the widest slice its budget affords."""
    return profile.budget


class WidthSliceStrategy(FederatedStrategy):
    def __init__(
        self,
        spec: SplitMixSpec,
        task_json: str,
        fraction_train: float,
        min_train_clients: int,
        seed: int,
        lr_at_round: Callable[[int], float],
        width_of: WidthOf = budget_width,
        local_keys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(task_json, fraction_train, min_train_clients, seed, lr_at_round)
        self.spec = spec
        self.width_of = width_of
        self.local_keys = local_keys  # never sent, never overwritten (FedBN's BN entries)
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}
        self._state: dict[str, torch.Tensor] = {}
        self.widths_sent: dict[int, float] = {}

    def shapes(self, width: float) -> dict[str, tuple[int, ...]]:
        """Shapes of the width-w sub-network's federated tensors (cached per width)."""
        if width not in self._shapes:
            state = self.spec.build_width(width).state_dict()
            self._shapes[width] = {
                k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked") and k not in self.local_keys
            }
        return self._shapes[width]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current, self._sent, self.widths_sent = arrays, {}, {}
        self._state = to_tensors(arrays)
        stats = RoundStats()
        payloads: dict[float, dict[str, Array]] = {}  # one encoding per width per round
        messages = []
        for profile in self.sample(lambda p: self.width_of(p) is not None):
            width = float(self.width_of(profile))
            if width not in payloads:
                payloads[width] = {k: encode(t) for k, t in slice_state(self._state, self.shapes(width)).items()}
            payload = ArrayRecord()
            expected: dict[str, TensorSpec] = {}
            for key, array in payloads[width].items():
                payload[key] = array
                stats.bytes_down += len(array.data)
                if profile.adversarial or not is_adversarial_tensor(key):
                    expected[key] = TensorSpec(tuple(array.shape), str(array.dtype))
            self._sent[profile.node_id] = expected
            self.widths_sent[profile.node_id] = width
            extra = {"method": "width", "width": width, "local-bn": bool(self.local_keys)}
            messages.append(self.train_message(profile, payload, server_round, extra))
        stats.sampled = len(messages)
        self.last_round = stats
        return messages

    def combine(self, contributions: list[tuple[dict[str, torch.Tensor], float]]) -> ArrayRecord:
        return sliced_weighted_average(contributions, self._state, self._current)


def sliced_weighted_average(
    contributions: list[tuple[dict[str, torch.Tensor], float]],
    state: dict[str, torch.Tensor],
    previous: ArrayRecord,
) -> ArrayRecord:
    """Each entry: the example-weighted mean over the contributions whose (leading) slice holds
    it — and, for a sparse client's ``(mask, values)`` entry, whose mask keeps it; entries nobody
    held keep their previous value."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for tensors, weight in contributions:
        for key, entry in tensors.items():
            mask, tensor = entry if isinstance(entry, tuple) else (None, entry)
            if key not in sums:
                sums[key] = torch.zeros(state[key].shape, dtype=torch.float64)
                counts[key] = torch.zeros(state[key].shape, dtype=torch.float64)
            block = leading_slices(tuple(tensor.shape))
            held = torch.ones(tensor.shape, dtype=torch.float64) if mask is None else mask.to(torch.float64)
            sums[key][block] += weight * held * tensor.to(torch.float64)
            counts[key][block] += weight * held
    out = ArrayRecord()
    for key, array in previous.items():
        if key not in sums:
            out[key] = array
            continue
        held = counts[key] > 0
        mean = torch.where(held, sums[key] / counts[key].clamp_min(1e-12), state[key].to(torch.float64))
        out[key] = encode(mean.to(state[key].dtype))
    return out
