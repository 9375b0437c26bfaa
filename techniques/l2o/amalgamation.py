"""Optimizer Amalgamation (arXiv 2203.06474): one student L2O from a pool of analytic teachers.

Facts from the authors' code (l2o.md B1), scaled to the digits MLP (B4):

- **Teachers** (OA's closed forms; m, v with β1 = 0.9, β2 = 0.999): SGD ``lr·g``; Momentum
  ``lr·m``; RMSProp ``lr·g/sqrt(ms+ε)``; Adam ``lr·m̂/sqrt(v̂+ε)`` with the *constant* scaling
  m̂ = m/(1−β1), v̂ = v/(1−β2) (no step-dependent bias correction); PowerSign
  ``lr·exp(tanh(g/sqrt(v+ε))·tanh(m/sqrt(v+ε)))·g``; AddSign ``lr·(1 + tanh(·)·tanh(·))·g``.
  Every teacher descends (the step is minus the formula). Learning rates are tuned on the
  meta-training task by a grid around OA's presets (×⅓, ×1, ×3), widened by ×3 past
  an edge best.
- **Lock-step trajectories**: per meta-iteration, one initialisation is shared by the student and
  every teacher; each advances its own copy on the same minibatch sequence (teachers are never
  reset to the student), so the imitation target is a teacher's trajectory.
- **Losses**: ``L_meta = mean_t [log f(θˢ_{t−1}; B_t) − log f(θˢ_0; B_t)]`` and the distance
  ``D_k(t) = log(Σ_i ½(θˢ_{t,i} − θᵏ_{t,i})² + ε) − log N``; amalgamation targets
  ``mean`` (mean over teachers), ``minmax`` (max over teachers, OA's default) and ``choice`` (a
  choice policy — an LSTM weighting the pool's proposals, trained on the meta-loss only — is
  distilled as the single teacher). Total ``L_meta + p·L_imit``; OA anneals p 0.2 → 0.02 over a
  long curriculum, the default here is a constant p = 1 (measured better in a 2-minute budget).
- **Perturbations** of the student's own weights while meta-training (variance reduction):
  ``gaussian`` (σ = 1e-3), ``gaussian_rel`` (σ = 5e-4·RMS(W), fresh at every use; OA's best),
  adversarial ``fgsm`` (δ = s·sign ∇δL), ``pgd`` (one step, clipped to ±ρ; OA's NameError fixed)
  and ``cgd`` (δ += clip_by_norm(∇δL, m·‖W‖)); the meta-gradient is taken at W + δ, applied
  to W, and δ is discarded.
- **Student**: RNNProp (``l2o_lstm.RNNPropPolicy``, one LSTM of 20 units) with SL2O's
  bias-corrected β = 0.95 inputs and step bound α = 0.01 (OA: β 0.9/0.999 constant-scaled, two
  LSTM layers, α = 0.1 for MNIST-CNN) — the same policy class, so the client optimizer and the
  symbolic distillation serve both learned optimizers; meta-optimizer Adam 1e-3 with AGC 0.1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from techniques.l2o.lstm import (
    CoordinatePolicy,
    PolicyStep,
    RNNPropPolicy,
    State,
    adaptive_clip_,
    detach_state,
    rollout,
)
from techniques.l2o.tasks import FlatModel, MLPTask, loss_and_grad

TEACHERS = ("sgd", "momentum", "rmsprop", "adam", "addsign", "powersign")
PRESET_LRS = {"sgd": 0.2, "momentum": 0.5, "rmsprop": 0.005, "adam": 0.005, "addsign": 0.1, "powersign": 0.1}
SCHEMES = ("mean", "minmax", "choice")
PERTURBATIONS = ("none", "gaussian", "gaussian_rel", "fgsm", "pgd", "cgd")
EPS = 1e-10
Reporter = Callable[[str], None]


# --------------------------------------------------------------------------- teachers
class Teacher(CoordinatePolicy):
    """An analytic optimizer in OA's form; its step ``out`` is the absolute parameter delta (run
    it with α = 1, e.g. ``LearnedOptimizer(params, Teacher("adam", 0.015), lr=1.0)``)."""

    state_keys = ("m", "v")
    persistent_keys = ("m", "v")

    def __init__(self, name: str, lr: float, beta1: float = 0.9, beta2: float = 0.999, rho: float = 0.9, eps: float = EPS) -> None:
        super().__init__()
        if name not in TEACHERS:
            raise ValueError(f"unknown teacher '{name}'; allowed: {', '.join(TEACHERS)}")
        self.name, self.lr, self.beta1, self.beta2, self.rho, self.eps = name, lr, beta1, beta2, rho, eps

    def extra_repr(self) -> str:
        return f"{self.name}, lr={self.lr:g}"

    def init_state(self, n: int, like: torch.Tensor | None = None) -> State:
        device = like.device if like is not None else None
        return {"m": torch.zeros(n, device=device), "v": torch.zeros(n, device=device)}

    def direction(self, grad: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The descent direction u (the step is −lr·u) and the new state."""
        b1, b2 = self.beta1, self.beta2
        if self.name == "rmsprop":  # its mean square lives in "v" with decay ρ
            v = self.rho * state["v"] + (1 - self.rho) * grad * grad
            return grad / (v + self.eps).sqrt(), {"m": state["m"], "v": v}
        if self.name == "sgd":
            return grad, state
        m = b1 * state["m"] + (1 - b1) * grad
        v = b2 * state["v"] + (1 - b2) * grad * grad
        new = {"m": m, "v": v}
        if self.name == "momentum":
            return m, new
        if self.name == "adam":
            return (m / (1 - b1)) / (v / (1 - b2) + self.eps).sqrt(), new
        agree = torch.tanh(grad / (v + self.eps).sqrt()) * torch.tanh(m / (v + self.eps).sqrt())
        return (torch.exp(agree) if self.name == "powersign" else 1 + agree) * grad, new

    def forward(self, grad: torch.Tensor, state: State, t: int) -> PolicyStep:
        u, new = self.direction(grad, state)
        return PolicyStep(-self.lr * u, new, {})


def teacher_pool(lrs: dict[str, float], names: Sequence[str] = TEACHERS) -> list[Teacher]:
    return [Teacher(n, lrs[n]) for n in names]


def _final_log_loss(policy: Callable, init: Callable[[int], State], task: MLPTask, seeds: Sequence[int], steps: int, alpha: float) -> float:
    finals = [rollout(policy, init, task, s, steps, alpha)["final"] for s in seeds]
    return float(np.mean([math.log(f + EPS) if math.isfinite(f) else 50.0 for f in finals]))


@dataclass(frozen=True)
class LRSearch:
    """A learning-rate grid search: the chosen rate, every score, and whether it sits at an edge."""

    lr: float
    scores: dict[float, float]  # lr → validation score (lower is better)
    at_edge: bool  # the best rate is the smallest or largest tried, even after widening
    widened: int  # how many times the grid was extended past an edge


def search_lr(score: Callable[[float], float], grid: Sequence[float], factor: float = 3.0, max_widen: int = 4) -> LRSearch:
    """The rate of ``grid`` with the lowest ``score``; a best rate at an edge extends the grid by
    ``factor`` on that side (up to ``max_widen`` times). Why: a best value at the edge of a
    grid means the grid, not the optimizer, decided the comparison."""
    if len(grid) < 3:
        raise ValueError(f"a learning-rate grid needs at least 3 values, got {list(grid)}")
    scores = {float(f"{lr:.4g}"): score(float(f"{lr:.4g}")) for lr in sorted(grid)}
    widened = 0
    while True:
        ordered = sorted(scores)
        best = min(ordered, key=lambda lr: (scores[lr], lr))
        edge = best in (ordered[0], ordered[-1])
        if not edge or widened >= max_widen:
            return LRSearch(best, scores, edge, widened)
        new = float(f"{(best / factor if best == ordered[0] else best * factor):.4g}")
        scores[new] = score(new)
        widened += 1


def tune_teachers(
    task: MLPTask,
    names: Sequence[str] = TEACHERS,
    steps: int = 100,
    seeds: Sequence[int] = (0, 1),
    factors: Sequence[float] = (1 / 3, 1.0, 3.0),
    max_widen: int = 4,
) -> dict[str, float]:
    """Per teacher, the lr (OA preset × factor, the grid widened past an edge best) with the
    lowest mean log final loss on the meta-training task."""
    best: dict[str, float] = {}
    for name in names:

        def score(lr: float, name: str = name) -> float:
            teacher = Teacher(name, lr)
            return _final_log_loss(teacher, teacher.init_state, task, [80_000 + s for s in seeds], steps, 1.0)

        best[name] = search_lr(score, [PRESET_LRS[name] * f for f in factors], max_widen=max_widen).lr
    return best


# --------------------------------------------------------------------------- choice policy
class ChoicePolicy(CoordinatePolicy):
    """OA's choice amalgamation: an LSTM weights the pool's proposals per coordinate.

    Input ``[u_1/α … u_K/α, min(t/2000, 1), 1[rank=1], 1[rank=2], 1[rank≥3]]`` (the time feature is
    clipped as OA's docstring says; its code does not clip). Output ``Σ_k w_k·u_k`` with u_k the
    proposals (absolute deltas, so this policy runs with α = 1). Training: softmax weights, or
    Gumbel-softmax at temperature 1/hardness when ``hardness > 0``; evaluation: softmax, or the
    hard argmax when ``hardness > 0``."""

    def __init__(self, teachers: Sequence[Teacher], hidden: int = 20, hardness: float = 0.0, scale: float = 0.01) -> None:
        super().__init__()
        self.teachers, self.hardness, self.scale = list(teachers), hardness, scale
        k = len(self.teachers)
        self.cell = nn.LSTMCell(k + 4, hidden)
        self.head = nn.Linear(hidden, k)
        self.hidden_dim = hidden
        self.state_keys = tuple(f"t{i}.{key}" for i in range(k) for key in ("m", "v")) + ("h", "c", "rank")

    def init_state(self, n: int, like: torch.Tensor | None = None, ndims: torch.Tensor | None = None) -> State:
        state: State = {}
        for i, teacher in enumerate(self.teachers):
            state |= {f"t{i}.{key}": value for key, value in teacher.init_state(n).items()}
        rank = torch.full((n,), 2, dtype=torch.long) if ndims is None else ndims.clamp(1, 3)
        state |= {"h": torch.zeros(n, self.hidden_dim), "c": torch.zeros(n, self.hidden_dim), "rank": F.one_hot(rank - 1, 3).float()}
        return state

    def proposals(self, grad: torch.Tensor, state: State, t: int) -> tuple[torch.Tensor, State]:
        """``(n, K)`` absolute deltas of the pool on the same gradient, and their new states."""
        outs: list[torch.Tensor] = []
        new: State = {}
        for i, teacher in enumerate(self.teachers):
            step = teacher(grad, {"m": state[f"t{i}.m"], "v": state[f"t{i}.v"]}, t)
            outs.append(step.out)
            new |= {f"t{i}.{key}": value for key, value in step.state.items()}
        return torch.stack(outs, 1), new

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.hardness > 0:
                gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-20, 1.0)) + 1e-20)
                return torch.softmax((logits + gumbel) * self.hardness, 1)
            return torch.softmax(logits, 1)
        if self.hardness > 0:
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        return torch.softmax(logits, 1)

    def forward(self, grad: torch.Tensor, state: State, t: int) -> PolicyStep:
        u, new = self.proposals(grad, state, t)
        time_feature = torch.full((len(grad), 1), min(t / 2000.0, 1.0))
        h, c = self.cell(torch.cat([u / self.scale, time_feature, state["rank"]], 1), (state["h"], state["c"]))
        w = self.weights(self.head(h))
        new |= {"h": h, "c": c, "rank": state["rank"]}
        return PolicyStep((w * u).sum(1), new, {"weights": w})


# --------------------------------------------------------------------------- losses
def imitation_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``D = log(Σ ½(θˢ − θᵗ)² + ε) − log N``: why log and /N: scale-free across model sizes."""
    return torch.log(0.5 * ((student - teacher) ** 2).sum() + EPS) - math.log(student.numel())


def imitation_loss(distances: torch.Tensor, scheme: str) -> torch.Tensor:
    """``distances`` is ``(U, K)`` (steps × teachers): mean over steps of the mean / max over teachers."""
    if scheme == "minmax":
        return distances.max(1).values.mean()
    if scheme in ("mean", "choice"):
        return distances.mean(1).mean()
    raise ValueError(f"unknown scheme '{scheme}'; allowed: {', '.join(SCHEMES)}")


def meta_loss(losses: torch.Tensor, start_losses: torch.Tensor) -> torch.Tensor:
    """OA's ``L_meta``: mean over the window of log f(θ_{t−1}; B_t) − log f(θ_0; B_t)."""
    return (torch.log(losses + EPS) - torch.log(start_losses + EPS)).mean()


# --------------------------------------------------------------------------- perturbations
@dataclass(frozen=True)
class Perturbation:
    """Noise on the student's own weights during meta-training (never in evaluation).

    ``scale``: σ for ``gaussian``, the relative σ for ``gaussian_rel``, s for ``fgsm``, ρ for
    ``pgd`` (step size ``pgd_step``), m for ``cgd``; 0 = the kind's OA default."""

    kind: str = "gaussian_rel"
    scale: float = 0.0
    pgd_step: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation '{self.kind}'; allowed: {', '.join(PERTURBATIONS)}")

    @property
    def size(self) -> float:
        defaults = {"none": 0.0, "gaussian": 1e-3, "gaussian_rel": 5e-4, "fgsm": 1e-3, "pgd": 1e-4, "cgd": 1e-3}
        return self.scale or defaults[self.kind]

    @property
    def adversarial(self) -> bool:
        return self.kind in ("fgsm", "pgd", "cgd")

    def noise(self, weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random δ for one use of ``weight`` (zeros for the other kinds)."""
        if self.kind not in ("gaussian", "gaussian_rel"):
            return torch.zeros_like(weight)
        sigma = self.size if self.kind == "gaussian" else self.size * float((weight.detach() ** 2 + 1e-8).mean().sqrt())
        return sigma * torch.randn(weight.shape, generator=generator, dtype=weight.dtype)

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One adversarial update of δ from the gradient of the unrolled loss."""
        if self.kind == "fgsm":
            return delta + self.size * grad.sign()
        if self.kind == "pgd":
            return (delta + self.pgd_step * grad).clamp(-self.size, self.size)
        if self.kind == "cgd":
            limit = self.size * float(weight.detach().norm())
            norm = float(grad.norm())
            return delta + (grad * (limit / norm) if norm > limit else grad)
        return delta


def perturbed_call(
    policy: nn.Module, weights: dict[str, torch.Tensor], perturbation: Perturbation, generator: torch.Generator | None
) -> Callable[[torch.Tensor, State, int], PolicyStep]:
    """The policy at ``weights`` (+ fresh random noise per use for the random kinds)."""
    if perturbation.kind in ("gaussian", "gaussian_rel") and policy.training:
        return lambda g, s, t: functional_call(policy, {n: w + perturbation.noise(w, generator) for n, w in weights.items()}, (g, s, t))
    return lambda g, s, t: functional_call(policy, weights, (g, s, t))


# --------------------------------------------------------------------------- lock-step unrolls
class Runner:
    """A teacher's own optimizee copy and state, advanced on the shared minibatch sequence."""

    def __init__(self, policy: Callable, flat: FlatModel, theta: torch.Tensor, state: State, alpha: float) -> None:
        self.policy, self.flat, self.theta, self.state, self.alpha, self.t = policy, flat, theta.clone(), state, alpha, 0

    @torch.no_grad()
    def advance(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Step through ``batches``; returns the ``(len, N)`` parameters after each step."""
        path = []
        for x, y in batches:
            with torch.enable_grad():
                _, grad = loss_and_grad(self.flat, self.theta, x, y)
            self.t += 1
            step = self.policy(grad, self.state, self.t)
            self.state = step.state
            self.theta = self.theta + self.alpha * step.out
            path.append(self.theta)
        return torch.stack(path)


def student_window(
    call: Callable[[torch.Tensor, State, int], PolicyStep],
    flat: FlatModel,
    theta: torch.Tensor,
    state: State,
    t0: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    paths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, State]:
    """One truncated window of the student: ``(L_meta, D (U, K) or None, θ after, state after)``.

    ``batches`` holds U+1 batches: U steps, then the loss after the last step."""
    theta0 = theta.detach()
    losses, starts, dists = [], [], []
    for k, (x, y) in enumerate(batches):
        if k == len(batches) - 1:
            losses.append(flat.loss(theta, x, y))
        else:
            loss, grad = loss_and_grad(flat, theta, x, y)
            losses.append(loss)
            step = call(grad, state, t0 + k + 1)
            state, theta = step.state, theta + alpha * step.out
            if paths is not None:
                dists.append(torch.stack([imitation_distance(theta, paths[j, k]) for j in range(paths.shape[0])]))
        with torch.no_grad():
            starts.append(flat.loss(theta0, x, y))
    return meta_loss(torch.stack(losses), torch.stack(starts)), (torch.stack(dists) if dists else None), theta, state


@dataclass(frozen=True)
class AmalgamationConfig:
    """Student meta-training (l2o.md B4 scaled to the 10-minute budget)."""

    scheme: str = "choice"  # OA's flagship; its default loss is minmax, which measured worst here (issue note)
    teachers: tuple[str, ...] = TEACHERS
    iterations: int = 120
    trajectory: int = 100
    unroll: int = 20
    meta_lr: float = 1e-3
    clip: float = 0.1
    alpha: float = 0.01
    pre: int = 8
    hidden: int = 20
    # p per curriculum stage (equal shares). OA anneals (0.2, 0.1, 0.05, 0.02) over a long curriculum;
    # in a 2-minute budget that leaves the student under-trained, a constant p = 1 does not (issue note)
    imitation: tuple[float, ...] = (1.0,)
    perturbation: str = "gaussian_rel"
    perturbation_scale: float = 0.0
    tune_steps: int = 100
    choice_iterations: int = 60  # meta-loss-only training of the choice policy (scheme "choice")
    choice_hardness: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme '{self.scheme}'; allowed: {', '.join(SCHEMES)}")
        Perturbation(self.perturbation)
        if min(self.iterations, self.trajectory, self.unroll) < 1 or self.trajectory % self.unroll:
            raise ValueError("iterations, trajectory and unroll must be >= 1 and unroll must divide trajectory")
        if not self.teachers or any(t not in TEACHERS for t in self.teachers):
            raise ValueError(f"teachers must be a non-empty subset of {', '.join(TEACHERS)}")


def _meta_step(
    policy: nn.Module,
    opt: torch.optim.Optimizer,
    perturbation: Perturbation,
    clip: float,
    window: Callable[[Callable], tuple[torch.Tensor, tuple]],
    generator: torch.Generator,
) -> tuple[float, tuple]:
    """Meta-gradient at W (+ δ) applied to W; δ is never written into W.

    ``window(call)`` runs the unroll with a policy callable and returns ``(loss, extra)``."""
    weights: dict[str, torch.Tensor] = {n: p for n, p in policy.named_parameters()}
    if perturbation.adversarial:
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}
        loss, _ = window(perturbed_call(policy, {n: w.detach() + deltas[n] for n, w in weights.items()}, perturbation, generator))
        grads = torch.autograd.grad(loss, list(deltas.values()), allow_unused=True)
        shifted = {
            n: w + perturbation.ascend(torch.zeros_like(w), torch.zeros_like(w) if g is None else g, w).detach()
            for (n, w), g in zip(weights.items(), grads)
        }
    else:
        shifted = weights
    loss, extra = window(perturbed_call(policy, shifted, perturbation, generator))
    opt.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        adaptive_clip_(list(weights.values()), clip)
        opt.step()
    return float(loss.detach()), extra


def train_choice(teachers: Sequence[Teacher], task: MLPTask, cfg: AmalgamationConfig, report: Reporter | None = None) -> ChoicePolicy:
    """OA step 1 of choice amalgamation: the choice policy on the meta-loss alone."""
    torch.manual_seed(cfg.seed + 3)
    choice = ChoicePolicy(teachers, hidden=cfg.hidden, hardness=cfg.choice_hardness, scale=cfg.alpha)
    opt = torch.optim.Adam(choice.parameters(), lr=cfg.meta_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    choice.train()
    for it in range(cfg.choice_iterations):
        seed = 3_000_000 + cfg.seed * 10_007 + it
        flat = FlatModel(task.model(seed))
        theta, stream = flat.flat(), task.batches(seed)
        state = choice.init_state(flat.numel, theta, flat.ndims())
        for w in range(cfg.trajectory // cfg.unroll):
            batches = [next(stream) for _ in range(cfg.unroll + 1)]
            start_theta, start_state, t0 = theta.detach(), detach_state(state), w * cfg.unroll

            def window(
                call: Callable, *, flat=flat, start_theta=start_theta, start_state=start_state, t0=t0, batches=batches
            ) -> tuple[torch.Tensor, tuple]:
                lm, _, th, st = student_window(call, flat, start_theta, start_state, t0, batches, 1.0, None)
                return lm, (th, st)

            loss, (theta, state) = _meta_step(choice, opt, Perturbation("none"), cfg.clip, window, gen)
        if report and (it + 1) % max(1, cfg.choice_iterations // 5) == 0:
            report(f"choice iteration {it + 1}/{cfg.choice_iterations}: last-window L_meta {loss:.4f}")
    return choice.eval()


def train_student(
    task: MLPTask, cfg: AmalgamationConfig, teacher_lrs: dict[str, float] | None = None, report: Reporter | None = None
) -> tuple[RNNPropPolicy, dict]:
    """Amalgamate the teacher pool into an RNNProp student; returns it and a training log."""
    say = report or (lambda _text: None)
    start = time.perf_counter()
    lrs = teacher_lrs or tune_teachers(task, cfg.teachers, cfg.tune_steps)
    say(f"teacher learning rates: {lrs}")
    teachers = teacher_pool(lrs, cfg.teachers)
    if cfg.scheme == "choice":
        choice = train_choice(teachers, task, cfg, say)
        pool: list[tuple[Callable, Callable[[FlatModel, torch.Tensor], State], float]] = [
            (choice, lambda flat, th: choice.init_state(flat.numel, th, flat.ndims()), 1.0)
        ]
    else:
        # mypy cannot infer a lambda whose extra parameter binds a loop variable by default
        pool = [(t, lambda flat, th, t=t: t.init_state(flat.numel, th), 1.0) for t in teachers]  # type: ignore[misc]
    torch.manual_seed(cfg.seed)
    student = RNNPropPolicy(pre=cfg.pre, hidden=cfg.hidden)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.meta_lr)
    perturbation = Perturbation(cfg.perturbation, cfg.perturbation_scale)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    student.train()
    log: list[float] = []
    for it in range(cfg.iterations):
        p_teacher = cfg.imitation[min(it * len(cfg.imitation) // cfg.iterations, len(cfg.imitation) - 1)]
        seed = 2_000_000 + cfg.seed * 10_007 + it
        flat = FlatModel(task.model(seed))
        theta, stream = flat.flat(), task.batches(seed)
        state = student.init_state(flat.numel, theta)
        runners = [Runner(p, flat, theta, init(flat, theta), a) for p, init, a in pool]
        for w in range(cfg.trajectory // cfg.unroll):
            batches = [next(stream) for _ in range(cfg.unroll + 1)]
            paths = torch.stack([r.advance(batches[:-1]) for r in runners])  # (K, U, N), independent of the student
            start_theta, start_state, t0 = theta.detach(), detach_state(state), w * cfg.unroll

            def window(
                call: Callable,
                *,
                flat=flat,
                start_theta=start_theta,
                start_state=start_state,
                t0=t0,
                batches=batches,
                paths=paths,
                p_teacher=p_teacher,
            ) -> tuple[torch.Tensor, tuple]:
                lm, dist, th, st = student_window(call, flat, start_theta, start_state, t0, batches, cfg.alpha, paths)
                assert dist is not None  # student_window returns distances when given teacher paths
                return lm + p_teacher * imitation_loss(dist, cfg.scheme), (th, st)

            loss, (theta, state) = _meta_step(student, opt, perturbation, cfg.clip, window, gen)
        log.append(loss)
        if (it + 1) % max(1, cfg.iterations // 10) == 0:
            say(f"student ({cfg.scheme}) iteration {it + 1}/{cfg.iterations}: last-window loss {loss:.4f} (p={p_teacher:g})")
    student.eval()
    return student, {"teacher_lrs": lrs, "seconds": time.perf_counter() - start, "window_loss": log, "config": asdict(cfg)}
