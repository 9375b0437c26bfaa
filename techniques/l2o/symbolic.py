"""Symbolic L2O (arXiv 2203.06578): distil the LSTM optimizer into a closed-form update rule.

Pipeline (stages 2–3 of the paper, scaled to digits; l2o.md A1/A4):

1. record the trained LSTM's inputs (m̃, g̃) and unit outputs on tracked coordinates
   (``l2o_lstm.record_traces``); rows hold the features at lags 0..L−1;
2. symbolic regression: gplearn (``add, sub, mul, neg, tanh``; PySR needs Julia, absent here) or
   the deterministic template ``c0·tanh(c1·m0 + c2·g0 + c3)``; constant subtrees are folded;
3. refit the constants by least squares (LBFGS) against the LSTM outputs; R² on held-out traces
   (recorded on a different optimizee: other seeds, width and data partition);
4. meta-tune the constants with the same truncated-unroll meta-loss as the LSTM (kept only when
   the validation loss improves).

The rule is JSON (an expression tree plus its constants) and runs as ``SymbolicOptimizer``:
``θ ← θ + lr·expr(m0, g0, m1, g1, …)`` where ``mk`` = m̃ and ``gk`` = g̃ k steps back (0 before
the first step). ``formula()`` prints ``expr`` as Python: ``eval(formula, {"tanh": math.tanh},
{"m0": …})`` gives the optimizer's unit step (tested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from techniques.l2o.lstm import (
    CoordinatePolicy,
    LearnedOptimizer,
    MetaTrainConfig,
    PolicyStep,
    RNNPropPolicy,
    State,
    Traces,
    lag_names,
    meta_train,
    record_traces,
    rnnprop_features,
    rollout,
)
from techniques.l2o.tasks import MLPTask

Expr = list  # ["add"|"sub"|"mul", a, b] | ["neg"|"tanh", a] | ["var", name] | ["const", index]
BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
UNARY = {"neg": lambda a: -a, "tanh": torch.tanh}
FORMULA_NAMESPACE = {"tanh": math.tanh}  # what ``formula()`` needs besides the variables


# --------------------------------------------------------------------------- expression trees
def evaluate(expr: Expr, variables: dict[str, torch.Tensor], constants: torch.Tensor) -> torch.Tensor | float:
    """Evaluate a tree with torch (differentiable in ``constants``)."""
    op = expr[0]
    if op == "var":
        return variables[expr[1]]
    if op == "const":
        return constants[expr[1]]
    if op in UNARY:
        value = evaluate(expr[1], variables, constants)
        return UNARY[op](value if isinstance(value, torch.Tensor) else torch.as_tensor(value))
    return BINARY[op](evaluate(expr[1], variables, constants), evaluate(expr[2], variables, constants))


def to_string(expr: Expr, constants: list[float]) -> str:
    """Python source of the tree; constants printed with ``repr`` so the text is exact."""
    op = expr[0]
    if op == "var":
        return expr[1]
    if op == "const":
        return repr(float(constants[expr[1]]))
    if op == "neg":
        return f"(-{to_string(expr[1], constants)})"
    if op == "tanh":
        return f"tanh({to_string(expr[1], constants)})"
    sym = {"add": "+", "sub": "-", "mul": "*"}[op]
    return f"({to_string(expr[1], constants)} {sym} {to_string(expr[2], constants)})"


def variables_of(expr: Expr) -> set[str]:
    if expr[0] == "var":
        return {expr[1]}
    if expr[0] == "const":
        return set()
    return set().union(*(variables_of(e) for e in expr[1:]))


def size(expr: Expr) -> int:
    """Number of nodes: the mapping complexity the paper reports."""
    return 1 if expr[0] in ("var", "const") else 1 + sum(size(e) for e in expr[1:])


def simplify(expr: Expr, constants: list[float]) -> tuple[Expr, list[float]]:
    """Fold every variable-free subtree into one constant and renumber the constants.

    Why: gplearn programs carry dead arithmetic (``sub(0.3, 0.1)``); folding leaves one tunable
    constant per independent coefficient and a shorter printed formula."""
    out: list[float] = []

    def fold(e: Expr) -> Expr:
        if e[0] == "var":
            return e
        if e[0] == "const":
            out.append(float(constants[e[1]]))
            return ["const", len(out) - 1]
        if not variables_of(e):
            out.append(float(evaluate(e, {}, torch.tensor(constants, dtype=torch.float64))))
            return ["const", len(out) - 1]
        return [e[0]] + [fold(a) for a in e[1:]]

    return fold(expr), out


def collect_linear(expr: Expr, constants: list[float]) -> tuple[Expr, list[float]]:
    """Merge sums: ``-(m1 + m0) - (m1 + m0)`` becomes ``-2·m1 + -2·m0`` (one coefficient per variable).

    Why: gplearn repeats subtrees; merged terms mean fewer, independent constants to tune."""
    out: list[float] = []

    def terms(e: Expr, sign: float, acc: list[tuple[float, Expr]]) -> None:
        if e[0] in ("add", "sub"):
            terms(e[1], sign, acc)
            terms(e[2], sign if e[0] == "add" else -sign, acc)
        elif e[0] == "neg":
            terms(e[1], -sign, acc)
        else:
            acc.append((sign, e))

    def rebuild(e: Expr) -> Expr:
        if e[0] == "var":
            return e
        if e[0] == "const":
            out.append(float(constants[e[1]]))
            return ["const", len(out) - 1]
        if e[0] not in ("add", "sub", "neg"):
            return [e[0]] + [rebuild(a) for a in e[1:]]
        acc: list[tuple[float, Expr]] = []
        terms(e, 1.0, acc)
        linear: dict[str, float] = {}
        offset, rest = 0.0, []
        for sign, term in acc:
            if term[0] == "const":
                offset += sign * float(constants[term[1]])
            elif term[0] == "var":
                linear[term[1]] = linear.get(term[1], 0.0) + sign
            elif term[0] == "mul" and {term[1][0], term[2][0]} == {"const", "var"}:
                c, v = (term[1], term[2]) if term[1][0] == "const" else (term[2], term[1])
                linear[v[1]] = linear.get(v[1], 0.0) + sign * float(constants[c[1]])
            else:
                rest.append((sign, rebuild(term)))
        built: list[tuple[float, Expr]] = []
        for name, coef in linear.items():
            if coef != 0.0:
                out.append(coef)
                built.append((1.0, ["mul", ["const", len(out) - 1], ["var", name]]))
        built += rest
        if offset != 0.0 or not built:
            out.append(offset)
            built.append((1.0, ["const", len(out) - 1]))
        first_sign, result = built[0]
        result = result if first_sign > 0 else ["neg", result]
        for sign, term in built[1:]:
            result = ["add" if sign > 0 else "sub", result, term]
        return result

    return rebuild(expr), out


def lift_constants(expr: Expr, constants: list[float]) -> tuple[Expr, list[float]]:
    """Give every variable without a constant factor a coefficient (started at 1).

    Why: gplearn often finds the right structure with implicit unit weights
    (``tanh(-(m0 + m1))``); the coefficients make the shape fittable and meta-tunable."""
    constants = list(constants)

    def lift(e: Expr, scaled: bool) -> Expr:
        if e[0] == "var":
            if scaled:
                return e
            constants.append(1.0)
            return ["mul", ["const", len(constants) - 1], e]
        if e[0] == "const":
            return e
        if e[0] == "mul":
            a, b = e[1], e[2]
            return ["mul", lift(a, b[0] == "const"), lift(b, a[0] == "const")]
        return [e[0]] + [lift(a, False) for a in e[1:]]

    return lift(expr, False), constants


def from_gplearn(program: list, names: list[str]) -> tuple[Expr, list[float]]:
    """A gplearn prefix program (``_Function`` / feature index / float) as a tree."""
    constants: list[float] = []
    position = 0

    def take() -> Expr:
        nonlocal position
        node = program[position]
        position += 1
        if isinstance(node, (int, np.integer)):
            return ["var", names[int(node)]]
        if isinstance(node, (float, np.floating)):
            constants.append(float(node))
            return ["const", len(constants) - 1]
        name = node.name
        if name not in BINARY and name not in UNARY:
            raise ValueError(f"gplearn function '{name}' is outside the grammar")
        return [name] + [take() for _ in range(node.arity)]

    return take(), constants


def template() -> tuple[Expr, list[float]]:
    """``c0·tanh(c1·m0 + c2·g0 + c3)``, started near a bounded sign-of-momentum step."""
    expr = ["mul", ["const", 0], ["tanh", ["add", ["add", ["mul", ["const", 1], ["var", "m0"]], ["mul", ["const", 2], ["var", "g0"]]], ["const", 3]]]]
    return expr, [1.0, -1.0, 0.0, 0.0]


def round_constants(constants: list[float], digits: int = 6) -> list[float]:
    """Six significant digits: the printed formula then is the rule, not an approximation."""
    return [float(f"{c:.{digits}g}") for c in constants]


# --------------------------------------------------------------------------- the rule
@dataclass
class SymbolicRule:
    """A distilled update rule: unit step = ``expr`` over lagged (m̃, g̃); JSON-serialisable."""

    expr: Expr
    constants: list[float]
    lags: int = 1
    beta1: float = 0.95
    beta2: float = 0.95
    info: dict[str, Any] = field(default_factory=dict)

    def formula(self) -> str:
        return to_string(self.expr, self.constants)

    def describe(self) -> str:
        """The rule in words and symbols, for logs and the README."""
        return (
            f"θ ← θ + lr · [{self.formula()}]   where mk = m̃_(t−k), gk = g̃_(t−k); "
            f"m = {self.beta1}·m + {1 - self.beta1:g}·g, v = {self.beta2}·v + {1 - self.beta2:g}·g², "
            f"s = sqrt(v/(1−{self.beta2}^t)) + 1e-12, m̃ = m/(1−{self.beta1}^t)/s, g̃ = g/s"
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "formula": self.formula()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SymbolicRule:
        data = json.loads(text)
        data.pop("formula", None)
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SymbolicRule:
        return cls.from_json(Path(path).read_text())


class SymbolicPolicy(CoordinatePolicy):
    """The rule as a coordinate-wise policy; its constants are meta-tunable parameters.

    State: the RNNProp moments and, when the rule looks back, the last L−1 values of m̃ and g̃."""

    persistent_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "lag_m", "lag_g")

    def __init__(self, rule: SymbolicRule) -> None:
        super().__init__()
        self.rule = rule
        self.constants = nn.Parameter(torch.tensor(rule.constants, dtype=torch.float32))
        self.state_keys = ("exp_avg", "exp_avg_sq") + (("lag_m", "lag_g") if rule.lags > 1 else ())
        self.persistent_keys = self.state_keys

    def init_state(self, n: int, like: torch.Tensor) -> State:
        z = torch.zeros(n, dtype=torch.float32, device=like.device)
        state = {"exp_avg": z, "exp_avg_sq": z.clone()}
        if self.rule.lags > 1:
            state |= {
                "lag_m": torch.zeros(n, self.rule.lags - 1, device=like.device),
                "lag_g": torch.zeros(n, self.rule.lags - 1, device=like.device),
            }
        return state

    def forward(self, grad: torch.Tensor, state: State, t: int) -> PolicyStep:
        m, v, mt, gt = rnnprop_features(grad, state["exp_avg"], state["exp_avg_sq"], t, self.rule.beta1, self.rule.beta2)
        variables = {"m0": mt, "g0": gt}
        new: State = {"exp_avg": m, "exp_avg_sq": v}
        if self.rule.lags > 1:
            for k in range(1, self.rule.lags):
                variables[f"m{k}"], variables[f"g{k}"] = state["lag_m"][:, k - 1], state["lag_g"][:, k - 1]
            new["lag_m"] = torch.cat([mt[:, None], state["lag_m"][:, :-1]], 1)
            new["lag_g"] = torch.cat([gt[:, None], state["lag_g"][:, :-1]], 1)
        out = evaluate(self.rule.expr, variables, self.constants)
        out = out if isinstance(out, torch.Tensor) and out.shape == grad.shape else torch.zeros_like(grad) + out
        return PolicyStep(out, new, {"m": mt, "g": gt})

    def to_rule(self) -> SymbolicRule:
        """The rule with the current (possibly meta-tuned) constants, rounded for printing."""
        return SymbolicRule(
            self.rule.expr, round_constants(self.constants.detach().tolist()), self.rule.lags, self.rule.beta1, self.rule.beta2, dict(self.rule.info)
        )


class SymbolicOptimizer(LearnedOptimizer):
    """A distilled rule as a ``torch.optim.Optimizer``: ``p ← p + lr·expr`` (2 + 2(L−1) floats of
    state per parameter, tens of flops per step)."""

    def __init__(self, params, rule: SymbolicRule, lr: float = 0.01, weight_decay: float = 0.0) -> None:
        super().__init__(params, SymbolicPolicy(rule), lr=lr, weight_decay=weight_decay)
        self.rule = rule

    def formula(self) -> str:
        return self.rule.formula()


# --------------------------------------------------------------------------- fitting
def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = pred.double(), target.double()
    ss_res = float(((target - pred) ** 2).sum())
    ss_tot = float(((target - target.mean()) ** 2).sum())
    return 1.0 - ss_res / max(ss_tot, 1e-30)


def predict(expr: Expr, constants: list[float] | torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    c = constants if isinstance(constants, torch.Tensor) else torch.tensor(constants, dtype=x.dtype)
    out = evaluate(expr, {n: x[:, i] for i, n in enumerate(names)}, c)
    return out if isinstance(out, torch.Tensor) and out.shape == x[:, 0].shape else torch.zeros(len(x), dtype=x.dtype) + out


def fit_constants(expr: Expr, constants: list[float], x: torch.Tensor, y: torch.Tensor, names: list[str], iterations: int = 100) -> list[float]:
    """Least-squares refit of the constants (LBFGS, float64); the start is kept if it fits better."""
    if not constants:
        return constants
    x64, y64 = x.double(), y.double()
    c = torch.tensor(constants, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((predict(expr, c, x64, names) - y64) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        mse = lambda cs: float(((predict(expr, cs, x64, names) - y64) ** 2).mean())  # noqa: E731
        new = c.detach()
        if not torch.isfinite(new).all() or mse(new) > mse(torch.tensor(constants, dtype=torch.float64)):
            return list(constants)
    return new.tolist()


def gplearn_search(
    x: np.ndarray, y: np.ndarray, names: list[str], population: int, generations: int, parsimony: float, seed: int
) -> tuple[Expr, list[float]]:
    """Genetic-programming search over ``add, sub, mul, neg, tanh`` (gplearn, MSE fitness)."""
    from gplearn.functions import make_function
    from gplearn.genetic import SymbolicRegressor

    tanh = make_function(function=np.tanh, name="tanh", arity=1)
    est = SymbolicRegressor(
        population_size=population,
        generations=generations,
        tournament_size=20,
        function_set=("add", "sub", "mul", "neg", tanh),
        metric="mse",
        parsimony_coefficient=parsimony,
        const_range=(-2.0, 2.0),
        init_depth=(2, 5),
        p_crossover=0.7,
        p_subtree_mutation=0.1,
        p_hoist_mutation=0.05,
        p_point_mutation=0.1,
        max_samples=1.0,
        random_state=seed,
        n_jobs=1,
        verbose=0,
    )
    est.fit(x, y)
    return from_gplearn(est._program.program, names)


@dataclass(frozen=True)
class DistillConfig:
    """Symbolic distillation settings (l2o.md A4, steps 3–5)."""

    lags: int = 2
    runs: int = 5  # training trajectories recorded
    heldout_runs: int = 3  # trajectories on the held-out optimizee, for R²
    steps: int = 200
    coords_per_tensor: int = 10
    train_rows: int = 10_000
    route: str = "gplearn"  # "gplearn" | "template"
    population: int = 1000
    generations: int = 20
    parsimony: float = 1e-3
    fit_iterations: int = 200
    tune_iterations: int = 20  # meta-tuning of the constants (0 = off)
    tune_trajectory: int = 100
    tune_unroll: int = 20
    tune_lr: float = 0.005  # SGD with momentum 0.9, as SL2O's fine_tune_SR
    validation_seeds: int = 3
    alpha: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.route not in ("gplearn", "template"):
            raise ValueError(f"unknown route '{self.route}'; allowed: gplearn, template")
        if self.lags < 1:
            raise ValueError("lags must be >= 1")


def _rows(traces: Traces, lags: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = traces.windows(lags)
    if len(y) > limit:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[keep], y[keep]
    return x, y


def validation_loss(policy: CoordinatePolicy, task: MLPTask, seeds: list[int], steps: int, alpha: float) -> float:
    """Mean log of the final full-partition loss over fresh optimizees (lower is better)."""
    init = lambda n: policy.init_state(n, torch.zeros(()))  # noqa: E731
    finals = [rollout(policy, init, task, s, steps, alpha)["final"] for s in seeds]
    return float(np.mean([math.log(f + 1e-10) if math.isfinite(f) else 50.0 for f in finals]))


def distill(
    lstm: RNNPropPolicy, train_task: MLPTask, heldout_task: MLPTask, cfg: DistillConfig, report: Callable[[str], None] | None = None
) -> SymbolicRule:
    """LSTM policy → symbolic rule with fit statistics in ``rule.info`` (see the module doc)."""
    say = report or (lambda _text: None)
    start = time.perf_counter()
    names = lag_names(cfg.lags)
    train = record_traces(
        lstm, train_task, [50_000 + cfg.seed * 100 + i for i in range(cfg.runs)], cfg.steps, cfg.alpha, cfg.coords_per_tensor, cfg.seed
    )
    held = record_traces(
        lstm, heldout_task, [90_000 + cfg.seed * 100 + i for i in range(cfg.heldout_runs)], cfg.steps, cfg.alpha, cfg.coords_per_tensor, cfg.seed + 1
    )
    x, y = _rows(train, cfg.lags, cfg.train_rows, cfg.seed)
    xh, yh = held.windows(cfg.lags)
    say(f"traces: {len(y)} training rows, {len(yh)} held-out rows ({time.perf_counter() - start:.1f}s)")
    if cfg.route == "gplearn":
        expr, constants = gplearn_search(x.double().numpy(), y.double().numpy(), names, cfg.population, cfg.generations, cfg.parsimony, cfg.seed)
        expr, constants = collect_linear(*simplify(expr, constants))
        r2_search = r2_score(predict(expr, constants, xh.double(), names), yh)
        expr, constants = lift_constants(expr, constants)
    else:  # the template's zero-started constants must survive: no simplification
        expr, constants = template()
        r2_search = r2_score(predict(expr, constants, xh.double(), names), yh)
    constants = round_constants(fit_constants(expr, constants, x, y, names, cfg.fit_iterations))
    r2_fit = r2_score(predict(expr, constants, xh.double(), names), yh)
    lags_used = max([int(v[1:]) + 1 for v in variables_of(expr)] or [1])
    rule = SymbolicRule(expr, constants, lags_used, lstm.beta1, lstm.beta2)
    say(f"{cfg.route}: held-out R² {r2_search:.4f} (search) → {r2_fit:.4f} (constants refit): {rule.formula()}")
    info: dict[str, Any] = {
        "route": cfg.route,
        "r2_heldout_search": r2_search,
        "r2_heldout_fit": r2_fit,
        "r2_train_fit": r2_score(predict(expr, constants, x.double(), names), y),
        "rows_train": len(y),
        "rows_heldout": len(yh),
        "size": size(expr),
        "fitted_constants": constants,
        "distill_config": asdict(cfg),
    }
    if cfg.tune_iterations > 0:
        rule, tuned = meta_tune(rule, train_task, cfg, say)
        info |= tuned
        info["r2_heldout_final"] = r2_score(predict(rule.expr, rule.constants, xh.double(), names), yh)
    else:
        info["r2_heldout_final"] = r2_fit
    info["seconds"] = time.perf_counter() - start
    rule.info = info
    return rule


def meta_tune(rule: SymbolicRule, task: MLPTask, cfg: DistillConfig, say: Callable[[str], None]) -> tuple[SymbolicRule, dict[str, Any]]:
    """Stage 3b: meta-train the rule's constants; keep them only if validation improves."""
    policy = SymbolicPolicy(rule)
    seeds = [70_000 + i for i in range(cfg.validation_seeds)]
    before = validation_loss(policy, task, seeds, cfg.tune_trajectory, cfg.alpha)
    mcfg = MetaTrainConfig(
        iterations=cfg.tune_iterations,
        trajectory=cfg.tune_trajectory,
        unroll=cfg.tune_unroll,
        alpha=cfg.alpha,
        task_hidden=task.hidden,
        batch_size=task.batch_size,
        seed=cfg.seed + 17,
    )
    meta_train(policy, task, mcfg, torch.optim.SGD(policy.parameters(), lr=cfg.tune_lr, momentum=0.9))
    tuned = policy.to_rule()
    after = validation_loss(SymbolicPolicy(tuned), task, seeds, cfg.tune_trajectory, cfg.alpha)
    kept = after < before
    say(f"meta-tuning: validation mean log-loss {before:.4f} → {after:.4f} ({'kept' if kept else 'reverted'})")
    return (tuned if kept else rule), {"tune_validation_before": before, "tune_validation_after": after, "tune_kept": kept}
