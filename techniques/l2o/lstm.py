"""Coordinate-wise learned optimizers: the RNNProp LSTM, its meta-training and its traces.

One small network is shared by every scalar parameter; the coordinates form the batch. The
policy sees scale-invariant features (RNNProp, Lv et al. 2017, as in Symbolic L2O's ``RP``):

    m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²,  m̂ = m/(1−β1^t),  v̂ = v/(1−β2^t)
    s = sqrt(v̂) + 1e-12,  m̃ = m̂/s,  g̃ = g/s                      (β1 = β2 = 0.95)

and outputs a unit step ``out ∈ [−1, 1]`` (``Linear(2,P)+ELU → LSTMCell(P,H) → Linear(H,1) →
tanh``); the parameter moves by ``θ ← θ + α·out`` (α = 0.01 in meta-training; as a client
optimizer α is the ``lr``). The sign is learned.

Meta-training (Symbolic L2O, stage 1): fresh optimizee per meta-iteration, trajectories cut into
truncated unrolls; meta-loss = mean of the minibatch log-losses along the window plus the one
after it (SL2O sums plain losses; on digits the loss falls by 10³ within a trajectory and plain
losses left the late steps untrained: held-out loss 3.8e-2 vs 1.4e-3 with logs); Adam on the
policy's weights with adaptive gradient clipping; gradients entering the policy are detached.

``record_traces`` runs a trained policy and keeps, for a few tracked coordinates per tensor, its
inputs (m̃, g̃) and its output, which ``techniques/l2o/symbolic.py`` distils into a formula.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

import torch
from torch import nn
from torch.nn import functional as F

from techniques.l2o.tasks import FlatModel, MLPTask, loss_and_grad

State = dict[str, torch.Tensor]
Reporter = Callable[[str], None]


class PolicyStep(NamedTuple):
    out: torch.Tensor  # unit step per coordinate: θ ← θ + α·out
    state: State
    features: dict[str, torch.Tensor]  # the inputs the policy saw (for trace recording)


def rnnprop_features(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, t: int, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """New moments and the scale-invariant inputs (m̃, g̃); why: a loss scaled by c>0 gives the
    same inputs, so one policy serves clients with very different gradient scales."""
    m = beta1 * exp_avg + (1.0 - beta1) * grad
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    s = (v / (1.0 - beta2**t)).sqrt() + 1e-12
    return m, v, (m / (1.0 - beta1**t)) / s, grad / s


class CoordinatePolicy(nn.Module):
    """A coordinate-wise update rule ``(grad, state, t) -> PolicyStep``; ``t`` counts from 1.

    ``state_keys`` are its per-coordinate tensors; ``persistent_keys`` the ones worth keeping
    across federated rounds (moments yes, LSTM memory no: it is stale after aggregation)."""

    state_keys: tuple[str, ...] = ()
    persistent_keys: tuple[str, ...] = ()

    def init_state(self, n: int, like: torch.Tensor) -> State:
        raise NotImplementedError

    def forward(self, grad: torch.Tensor, state: State, t: int) -> PolicyStep:  # pragma: no cover - interface
        raise NotImplementedError


class RNNPropPolicy(CoordinatePolicy):
    """RNNProp: (m̃, g̃) → Linear+ELU → LSTMCell → Linear → tanh (SL2O ``RP_#2__[[6],[7]]``)."""

    state_keys = ("exp_avg", "exp_avg_sq", "h", "c")
    persistent_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, pre: int = 6, hidden: int = 7, beta1: float = 0.95, beta2: float = 0.95) -> None:
        super().__init__()
        self.pre_dim, self.hidden_dim, self.beta1, self.beta2 = pre, hidden, beta1, beta2
        self.pre = nn.Linear(2, pre)
        self.cell = nn.LSTMCell(pre, hidden)
        self.head = nn.Linear(hidden, 1)

    def config(self) -> dict[str, float | int]:
        return {"pre": self.pre_dim, "hidden": self.hidden_dim, "beta1": self.beta1, "beta2": self.beta2}

    def init_state(self, n: int, like: torch.Tensor) -> State:
        z = torch.zeros(n, dtype=torch.float32, device=like.device)
        zh = torch.zeros(n, self.hidden_dim, dtype=torch.float32, device=like.device)
        return {"exp_avg": z, "exp_avg_sq": z.clone(), "h": zh, "c": zh.clone()}

    def forward(self, grad: torch.Tensor, state: State, t: int) -> PolicyStep:
        m, v, mt, gt = rnnprop_features(grad, state["exp_avg"], state["exp_avg_sq"], t, self.beta1, self.beta2)
        h, c = self.cell(F.elu(self.pre(torch.stack([mt, gt], 1))), (state["h"], state["c"]))
        out = torch.tanh(self.head(h)).squeeze(1)
        return PolicyStep(out, {"exp_avg": m, "exp_avg_sq": v, "h": h, "c": c}, {"m": mt, "g": gt})


# --------------------------------------------------------------------------- meta-training
@dataclass(frozen=True)
class MetaTrainConfig:
    """Truncated-unroll meta-training (SL2O stage 1, scaled to digits: l2o.md A4)."""

    iterations: int = 150  # meta-iterations, each a fresh optimizee trajectory
    trajectory: int = 100  # inner steps per trajectory
    unroll: int = 20  # truncation length
    meta_lr: float = 1e-3
    alpha: float = 0.01  # θ ← θ + α·out
    task_hidden: int = 32
    batch_size: int = 64
    pre: int = 6
    hidden: int = 7
    clip: float = 0.1  # adaptive gradient clipping ratio (0 = off)
    log_objective: bool = True  # mean log-loss over the window (SL2O: plain sum)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.iterations, self.trajectory, self.unroll) < 1 or self.trajectory % self.unroll:
            raise ValueError("iterations, trajectory and unroll must be >= 1 and unroll must divide trajectory")


def detach_state(state: State) -> State:
    return {k: v.detach() for k, v in state.items()}


def adaptive_clip_(params: Sequence[torch.Tensor], ratio: float, eps: float = 1e-3) -> None:
    """AGC (Brock et al. 2021), per tensor: g ← g·ratio·max(‖W‖,ε)/‖g‖ when ‖g‖ > ratio·max(‖W‖,ε).
    Why: unrolled meta-gradients occasionally explode; clipping relative to the weight keeps
    small tensors (biases) from being wiped out."""
    if ratio <= 0:
        return
    for p in params:
        if p.grad is None:
            continue
        limit = ratio * max(float(p.detach().norm()), eps)
        norm = float(p.grad.norm())
        if norm > limit:
            p.grad.mul_(limit / norm)


def unroll_window(
    policy: nn.Module,
    flat: FlatModel,
    theta: torch.Tensor,
    state: State,
    t0: int,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    log: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """One truncated window: returns (meta-loss, θ after, policy state after), all in the graph.

    The last batch is only evaluated (the loss after the window's updates). ``log``: average
    log-losses instead of losses (why: late, small losses still carry meta-gradient)."""
    total = torch.zeros(())
    transform = (lambda v: torch.log(v + 1e-10)) if log else (lambda v: v)
    for k, (x, y) in enumerate(batches[:-1]):
        loss, grad = loss_and_grad(flat, theta, x, y)
        total = total + transform(loss)
        step = policy(grad, state, t0 + k + 1)
        state = step.state
        theta = theta + alpha * step.out
    total = total + transform(flat.loss(theta, *batches[-1]))
    return total / len(batches), theta, state


def meta_train(
    policy: CoordinatePolicy, task: MLPTask, cfg: MetaTrainConfig, meta_optimizer: torch.optim.Optimizer | None = None, report: Reporter | None = None
) -> dict[str, float | list[float]]:
    """Meta-train ``policy`` in place on fresh optimizees of ``task``; returns a training log."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = meta_optimizer or torch.optim.Adam(params, lr=cfg.meta_lr)
    policy.train()
    start, losses, skipped = time.perf_counter(), [], 0
    for it in range(cfg.iterations):
        seed = cfg.seed * 1_000_003 + it
        flat = FlatModel(task.model(seed))
        theta, state, stream = flat.flat(), policy.init_state(flat.numel, torch.zeros(())), task.batches(seed)
        traj_loss = 0.0
        for w in range(cfg.trajectory // cfg.unroll):
            batches = [next(stream) for _ in range(cfg.unroll + 1)]
            loss, theta, state = unroll_window(
                policy, flat, theta.detach(), detach_state(state), w * cfg.unroll, batches, cfg.alpha, cfg.log_objective
            )
            if not torch.isfinite(loss):
                skipped += 1
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            adaptive_clip_(params, cfg.clip)
            opt.step()
            traj_loss = float(loss.detach())
        losses.append(traj_loss)
        if report and (it + 1) % max(1, cfg.iterations // 10) == 0:
            report(f"meta-iteration {it + 1}/{cfg.iterations}: last-window meta-loss {traj_loss:.4f}")
    policy.eval()
    return {"seconds": time.perf_counter() - start, "final_window_loss": losses, "skipped": skipped}


@torch.no_grad()
class Rollout(TypedDict):
    """What :func:`rollout` returns: the final full-partition loss and the loss curve."""

    final: float
    curve: list[float]


def rollout(
    policy: Callable[[torch.Tensor, State, int], PolicyStep],
    init_state: Callable[[int], State],
    task: MLPTask,
    seed: int,
    steps: int,
    alpha: float,
    every: int = 0,
) -> Rollout:
    """Run a policy on a fresh optimizee (no meta-graph); full-partition loss every ``every`` steps.

    Why a flat functional run: validation of a policy while meta-training or meta-tuning."""
    flat = FlatModel(task.model(seed))
    theta, state, stream = flat.flat(), init_state(flat.numel), task.batches(seed)
    x_all, y_all = task.data()
    curve = [float(flat.loss(theta, x_all, y_all))] if every else []
    for t in range(1, steps + 1):
        x, y = next(stream)
        with torch.enable_grad():
            _, grad = loss_and_grad(flat, theta, x, y)
        step = policy(grad, state, t)
        state = step.state
        theta = theta + alpha * step.out
        if every and t % every == 0:
            curve.append(float(flat.loss(theta, x_all, y_all)))
    final = float(flat.loss(theta, x_all, y_all))
    return {"final": final if math.isfinite(final) else float("inf"), "curve": curve}


# --------------------------------------------------------------------------- traces
@dataclass
class Traces:
    """Per tracked coordinate and step: the policy's inputs and its unit output.

    ``m``, ``g``, ``out``, ``grad`` have shape ``(runs, steps, coords)``."""

    m: torch.Tensor
    g: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor

    def windows(self, lags: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows X = [m̃_t, m̃_{t−1}, …, g̃_t, g̃_{t−1}, …] (zero before the first step), y = out_t.

        Rows whose raw gradient is exactly zero (dead ReLU units) are dropped, as in SL2O."""

        def lagged(a: torch.Tensor) -> list[torch.Tensor]:
            return [F.pad(a, (0, 0, k, 0))[:, : a.shape[1]] for k in range(lags)]

        x = torch.stack(lagged(self.m) + lagged(self.g), -1).reshape(-1, 2 * lags)
        y, keep = self.out.reshape(-1), self.grad.reshape(-1) != 0
        return x[keep], y[keep]


def lag_names(lags: int) -> list[str]:
    """Column names of ``Traces.windows``: ``m0`` is m̃ at the current step, ``g1`` g̃ one step back."""
    return [f"m{k}" for k in range(lags)] + [f"g{k}" for k in range(lags)]


@torch.no_grad()
def record_traces(
    policy: CoordinatePolicy, task: MLPTask, seeds: list[int], steps: int, alpha: float, coords_per_tensor: int = 10, select_seed: int = 0
) -> Traces:
    """Run ``policy`` in evaluation mode and record its inputs/outputs on tracked coordinates."""
    policy.eval()
    runs: dict[str, list[torch.Tensor]] = {"m": [], "g": [], "out": [], "grad": []}
    for seed in seeds:
        flat = FlatModel(task.model(seed))
        gen = torch.Generator().manual_seed(select_seed * 7919 + seed)
        offsets = torch.cumsum(torch.tensor([0] + flat.sizes[:-1]), 0)
        tracked = torch.cat([o + torch.randperm(n, generator=gen)[: min(coords_per_tensor, n)] for o, n in zip(offsets.tolist(), flat.sizes)])
        theta, state, stream = flat.flat(), policy.init_state(flat.numel, torch.zeros(())), task.batches(seed)
        rec: dict[str, list[torch.Tensor]] = {k: [] for k in runs}
        for t in range(1, steps + 1):
            with torch.enable_grad():
                _, grad = loss_and_grad(flat, theta, *next(stream))
            step = policy(grad, state, t)
            state = step.state
            theta = theta + alpha * step.out
            for key, value in (("m", step.features["m"]), ("g", step.features["g"]), ("out", step.out), ("grad", grad)):
                rec[key].append(value[tracked])
        for key in runs:
            runs[key].append(torch.stack(rec[key]))
    return Traces(**{k: torch.stack(v) for k, v in runs.items()})


# --------------------------------------------------------------------------- as a torch optimizer
class LearnedOptimizer(torch.optim.Optimizer):
    """Any coordinate-wise policy as a ``torch.optim.Optimizer``: ``p ← p + lr·out(grad + wd·p)``.

    Per-parameter state: ``step`` plus the policy's ``state_keys`` (flat, one row per scalar).
    The policy is a frozen private copy; ``lr`` is the step bound α it was meta-trained with."""

    def __init__(self, params, policy: CoordinatePolicy, lr: float = 0.01, weight_decay: float = 0.0) -> None:
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.policy = copy.deepcopy(policy).eval().requires_grad_(False)

    @property
    def persistent_keys(self) -> tuple[str, ...]:
        return ("step",) + tuple(self.policy.persistent_keys)

    def _policy_on(self, device: torch.device) -> CoordinatePolicy:
        first = next(self.policy.parameters(), None)
        if first is not None and first.device != device:
            self.policy = self.policy.to(device)
        return self.policy

    @torch.no_grad()
    # torch's stub overloads type a closure as returning float; like torch's optimizers this returns the closure's loss
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("learned optimizers do not support sparse gradients")
                policy = self._policy_on(p.device)
                grad = p.grad.reshape(-1).float()
                if group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p.detach().reshape(-1).float()
                st = self.state[p]
                if any(k not in st for k in policy.state_keys):  # fresh, or imported without e.g. LSTM memory
                    for key, value in policy.init_state(p.numel(), p).items():
                        st.setdefault(key, value)
                st.setdefault("step", torch.zeros((), dtype=torch.float32))
                st["step"] = st["step"] + 1  # not in place: a loaded state_dict may share the tensor
                out = policy(grad, {k: st[k] for k in policy.state_keys}, int(st["step"]))
                st.update(out.state)
                p.add_(out.out.view_as(p).to(p.dtype), alpha=group["lr"])
        return loss
