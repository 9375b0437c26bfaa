"""Fault injection (simulation config ``fault-fraction`` / ``fault-kind``): a sampled client that
misbehaves on purpose, so the server's handling of bad clients can be tested and measured.

Which clients misbehave is decided on the client, deterministically from (run seed, round,
partition id): each train instruction is faulty with probability ``fault-fraction``, and with
``fault-kind = "mixed"`` the kind is drawn from :data:`KINDS` by the same seeded generator. The
server needs to know nothing; it must cope from what it receives:

- ``crash``: the ClientApp raises (Flower returns an error reply; counted as a failure);
- ``timeout``: the client sleeps ``fault-delay`` seconds (the server sets it to max(round-timeout, client-wait) + 1)
  before training, so its reply misses the round (a failure: no reply in time). Use it with a
  small ``round-timeout``: with the default 600 s each such client sleeps 601 s (and holds a
  simulation actor meanwhile);
- ``missing-key`` / ``extra-key`` / ``wrong-shape`` / ``wrong-dtype`` / ``nan`` / ``inf``: a
  malformed update (rejected by validation);
- ``scaled``: every floating tensor × 1e6, an absurd magnitude (rejected by the server's magnitude
  bound, ``strategies/base.py: check_magnitudes``);
- ``sign-flip``: ``w − (trained − w)``, the update reversed. It is well formed and of normal
  magnitude, so validation cannot tell it from an honest update: it is *accepted* — it is the
  attack robust aggregation (``aggregation = median | trimmed-mean``) is for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from splitmix.sections import Section, option
from techniques.base import ClientRound, RoundHooks, State, Technique, register_technique

if TYPE_CHECKING:
    from splitmix.config import RunConfig

KINDS = ("crash", "timeout", "missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan", "inf", "scaled", "sign-flip")
MALFORMED = ("missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan", "inf", "scaled")
SCALE = 1e6


class InjectedCrash(RuntimeError):
    """The ``crash`` fault."""


def fault_for(run_seed: int, server_round: int, partition_id: int, fraction: float, kind: str) -> str | None:
    """The fault this client commits in this round, or None (deterministic in its arguments)."""
    if fraction <= 0.0:
        return None
    rng = np.random.default_rng([int(run_seed), int(server_round), int(partition_id), 0xFA17])
    if rng.random() >= fraction:
        return None
    if kind == "mixed":
        return KINDS[int(rng.integers(len(KINDS)))]
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}")
    return kind


def before_training(fault: str | None, delay: float, partition_id: int) -> None:
    """``crash`` raises, ``timeout`` sleeps ``delay`` seconds; other kinds act on the reply."""
    if fault == "crash":
        raise InjectedCrash(f"injected fault: partition {partition_id} crashed")
    if fault == "timeout":
        time.sleep(max(float(delay), 0.0))


def _first(tensors: dict[str, torch.Tensor], floating: bool = True) -> str:
    keys = sorted(k for k, v in tensors.items() if (v.is_floating_point() or not floating) and v.numel() > 0)
    if not keys:
        raise ValueError("no tensor to corrupt")
    return keys[0]


def corrupt(fault: str | None, tensors: dict[str, torch.Tensor], received: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reply's tensors after the fault (a new dict; ``tensors`` itself is not modified).

    ``received`` returns what the server sent (only called for ``sign-flip``).
    """
    if fault is None or fault in ("crash", "timeout"):
        return tensors
    out = dict(tensors)
    if fault == "missing-key":
        del out[sorted(out)[0]]
    elif fault == "extra-key":
        key = sorted(out)[0]
        out[key.rsplit(".", 1)[0] + ".injected_extra"] = torch.zeros(3)
    elif fault == "wrong-shape":
        key = _first(out, floating=False)
        out[key] = torch.cat([out[key].reshape(-1), out[key].reshape(-1)[:1]])
    elif fault == "wrong-dtype":
        key = _first(out)
        out[key] = out[key].double() if out[key].dtype != torch.float64 else out[key].float()
    elif fault in ("nan", "inf"):
        key = _first(out)
        bad = out[key].clone()
        bad.reshape(-1)[0] = float("nan") if fault == "nan" else float("inf")
        out[key] = bad
    elif fault == "scaled":
        out = {k: v * SCALE if v.is_floating_point() else v for k, v in out.items()}
    elif fault == "sign-flip":
        sent = received()
        out = {k: (2 * sent[k].to(v.dtype) - v if v.is_floating_point() and k in sent else v) for k, v in out.items()}
    else:
        raise ValueError(f"unknown fault kind {fault!r}")
    return out


# --------------------------------------------------------------------------- the technique plugin
@dataclass(frozen=True)
class FaultsConfig(Section):
    fault_fraction: float = option(0.0, "share of train instructions a client answers wrongly on purpose (testing)", lo=0, hi=1)
    fault_kind: str = option("mixed", "what a faulty client does (`mixed` draws one kind per fault)", choices=("mixed", *KINDS))


class _FaultHooks(RoundHooks):
    def __init__(self, fault: str, delay: float) -> None:
        self.fault, self.delay = fault, delay

    def before_training(self, rnd: ClientRound) -> None:
        before_training(self.fault, self.delay, rnd.profile.partition_id)

    def before_upload(self, tensors: State, received: Callable[[], State]) -> State:
        return corrupt(self.fault, tensors, received)


@register_technique
class Faults(Technique[FaultsConfig]):
    name = "faults"
    Config = FaultsConfig

    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        return run.techniques[cls.name].fault_fraction > 0  # type: ignore[attr-defined]

    def prepare_task(self, task: Any, run: RunConfig) -> Any:
        """A ``timeout`` fault sleeps past the round's deadline (bounded)."""
        # longer than any round waits (the first waits max(round-timeout, client-wait): nodes may be starting)
        return dataclasses.replace(task, fault_delay=max(run.federation.round_timeout, run.federation.client_wait) + 1.0)

    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        cfg = self.config
        fault = fault_for(rnd.task.seed, rnd.server_round, rnd.profile.partition_id, cfg.fault_fraction, cfg.fault_kind)
        return None if fault is None else _FaultHooks(fault, rnd.task.fault_delay)
