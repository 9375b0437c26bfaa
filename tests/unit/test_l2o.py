"""Symbolic L2O: the LSTM optimizer, its traces, the distilled rule and its optimizer (issue 8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from techniques.l2o.lstm import (
    LearnedOptimizer,
    MetaTrainConfig,
    RNNPropPolicy,
    meta_train,
    rnnprop_features,
    unroll_window,
)
from techniques.l2o.symbolic import (
    FORMULA_NAMESPACE,
    DistillConfig,
    SymbolicOptimizer,
    SymbolicPolicy,
    SymbolicRule,
    collect_linear,
    distill,
    fit_constants,
    from_gplearn,
    gplearn_search,
    lift_constants,
    predict,
    r2_score,
    simplify,
)
from techniques.l2o.tasks import FlatModel, MLPTask

R2_BOUND_TINY = 0.5  # tiny settings; the default artifacts reach ~0.82 (see the issue note)

torch.set_num_threads(1)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: MLPTask, seed: int, steps: int) -> None:
    stream = task.batches(seed)
    for _ in range(steps):
        x, y = next(stream)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.fixture(scope="module")
def lstm() -> RNNPropPolicy:
    torch.manual_seed(0)
    policy = RNNPropPolicy()
    meta_train(policy, MLPTask(), MetaTrainConfig(iterations=16, trajectory=40, unroll=10, meta_lr=3e-3))
    return policy


@pytest.fixture(scope="module")
def rule(lstm: RNNPropPolicy) -> SymbolicRule:
    cfg = DistillConfig(
        runs=2,
        heldout_runs=1,
        steps=60,
        coords_per_tensor=8,
        train_rows=2000,
        population=200,
        generations=4,
        fit_iterations=50,
        tune_iterations=2,
        tune_trajectory=20,
        tune_unroll=10,
        validation_seeds=1,
    )
    return distill(lstm, MLPTask(), MLPTask(hidden=48, partition="heldout"), cfg)


def test_features_are_scale_invariant_and_first_step_is_sign() -> None:
    g = torch.tensor([0.3, -2e-4, 5.0])
    z = torch.zeros(3)
    _, _, mt, gt = rnnprop_features(g, z, z, 1, 0.95, 0.95)
    assert torch.allclose(mt, g.sign()) and torch.allclose(gt, g.sign())
    m, v, _, _ = rnnprop_features(g, z, z, 1, 0.95, 0.95)
    g2 = torch.tensor([-0.1, 1e-4, 2.0])
    _, _, mt_a, gt_a = rnnprop_features(g2, m, v, 2, 0.95, 0.95)
    m_c, v_c, _, _ = rnnprop_features(g * 7.5, z, z, 1, 0.95, 0.95)
    _, _, mt_b, gt_b = rnnprop_features(g2 * 7.5, m_c, v_c, 2, 0.95, 0.95)
    assert torch.allclose(mt_a, mt_b, rtol=1e-5) and torch.allclose(gt_a, gt_b, rtol=1e-5)


def test_learned_optimizer_state_dict_roundtrip_resumes_the_same_run() -> None:
    torch.manual_seed(1)
    policy, task = RNNPropPolicy(), MLPTask()
    model_a, unused = task.model(3), torch.nn.Parameter(torch.zeros(3))  # grad None: skipped
    opt_a = LearnedOptimizer(list(model_a.parameters()) + [unused], policy, lr=0.01)
    _train(model_a, opt_a, task, 0, 3)
    assert int(opt_a.state[model_a[0].weight]["step"]) == 3
    assert unused not in opt_a.state
    model_b = task.model(99)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = LearnedOptimizer(list(model_b.parameters()) + [torch.nn.Parameter(torch.zeros(3))], policy, lr=0.01)
    opt_b.load_state_dict(opt_a.state_dict())
    stream_a, stream_b = task.batches(5), task.batches(5)
    for _ in range(2):
        for model, opt, stream in ((model_a, opt_a, stream_a), (model_b, opt_b, stream_b)):
            x, y = next(stream)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_meta_trained_lstm_reduces_heldout_loss(lstm: RNNPropPolicy) -> None:
    task = MLPTask(hidden=48, partition="heldout")  # other width, data half and seed than meta-training
    model = task.model(4242)
    before = task.full_loss(model)
    _train(model, LearnedOptimizer(model.parameters(), lstm, lr=0.01), task, 4242, 100)
    after = task.full_loss(model)
    assert after < 0.3 * before, (before, after)


def _reference_features(grads: list[np.ndarray], beta: float = 0.95) -> list[tuple[np.ndarray, np.ndarray]]:
    """m̃, g̃ per step, recomputed in float64 from the definitions."""
    m = v = np.zeros_like(grads[0], dtype=np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m, v = beta * m + (1 - beta) * g, beta * v + (1 - beta) * g * g
        s = np.sqrt(v / (1 - beta**t)) + 1e-12
        out.append((m / (1 - beta**t) / s, g / s))
    return out


@pytest.mark.parametrize("which", ["handmade", "distilled"])
def test_symbolic_optimizer_equals_printed_formula(which: str, rule: SymbolicRule) -> None:
    if which == "handmade":  # two lags, every operator of the grammar
        expr = [
            "tanh",
            [
                "sub",
                ["mul", ["const", 0], ["var", "m0"]],
                ["add", ["mul", ["const", 1], ["var", "m1"]], ["neg", ["tanh", ["mul", ["const", 2], ["var", "g1"]]]]],
            ],
        ]
        rule = SymbolicRule(expr, [-1.5, 0.75, 0.3], lags=2)
    lr = 0.02
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, generator=gen))
    opt = SymbolicOptimizer([p], rule, lr=lr)
    grads = [torch.randn(7, generator=gen) * scale for scale in (1.0, 0.1, 3.0, 0.5)]
    feats = _reference_features([g.numpy() for g in grads])
    text = opt.formula()
    for t, g in enumerate(grads):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        step = ((p.detach() - before) / lr).double().numpy()
        for i in range(7):
            env = {f"m{k}": (feats[t - k][0][i] if t - k >= 0 else 0.0) for k in range(rule.lags)}
            env |= {f"g{k}": (feats[t - k][1][i] if t - k >= 0 else 0.0) for k in range(rule.lags)}
            expected = eval(text, dict(FORMULA_NAMESPACE), env)  # the printed formula itself
            assert step[i] == pytest.approx(expected, rel=1e-4, abs=2e-6), (t, i, text)


def test_distilled_rule_fits_lstm_on_heldout_traces(rule: SymbolicRule) -> None:
    info = rule.info
    assert info["rows_heldout"] > 500
    assert info["r2_heldout_fit"] > R2_BOUND_TINY, rule.formula()
    assert set(info) >= {"r2_heldout_search", "r2_train_fit", "r2_heldout_final", "size"}


def test_symbolic_optimizer_reduces_heldout_loss(rule: SymbolicRule) -> None:
    task = MLPTask(hidden=48, partition="heldout")
    model = task.model(777)
    before = task.full_loss(model)
    _train(model, SymbolicOptimizer(model.parameters(), rule, lr=0.01), task, 777, 100)
    assert task.full_loss(model) < 0.3 * before


def test_rule_json_roundtrip(rule: SymbolicRule) -> None:
    again = SymbolicRule.from_json(rule.to_json())
    assert again.formula() == rule.formula() and again.lags == rule.lags and again.constants == rule.constants


def test_constant_fit_recovers_known_rule() -> None:
    x = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = -0.01 * x[:, 1]  # Δ = −0.01·g
    expr = ["mul", ["const", 0], ["var", "g0"]]
    constants = fit_constants(expr, [1.0], x, y, ["m0", "g0"])
    assert constants[0] == pytest.approx(-0.01, abs=1e-6)
    assert r2_score(predict(expr, constants, x, ["m0", "g0"]), y) == pytest.approx(1.0, abs=1e-9)


def test_gplearn_structure_then_refit() -> None:
    """gplearn finds the structure; collecting, lifting and refitting find the constants."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    expr, constants = gplearn_search(x, x[:, 0] - x[:, 1], ["m0", "g0"], population=300, generations=4, parsimony=1e-3, seed=0)
    expr, constants = lift_constants(*collect_linear(*simplify(expr, constants)))
    xt = torch.from_numpy(x)
    for target in (xt[:, 0] - xt[:, 1], 0.5 * xt[:, 0] - 0.25 * xt[:, 1]):
        fitted = fit_constants(expr, constants, xt, target, ["m0", "g0"])
        assert r2_score(predict(expr, fitted, xt, ["m0", "g0"]), target) > 0.999


def test_tree_helpers() -> None:
    class Fn:  # the two attributes gplearn's _Function exposes
        def __init__(self, name: str, arity: int) -> None:
            self.name, self.arity = name, arity

    program = [Fn("sub", 2), Fn("neg", 1), Fn("add", 2), 1, 0, Fn("add", 2), Fn("mul", 2), 0.5, 0.2, 1]
    expr, constants = from_gplearn(program, ["m0", "g0"])
    folded, c2 = simplify(expr, constants)  # 0.5·0.2 folds into one constant
    assert len(c2) == 1 and c2[0] == pytest.approx(0.1)
    merged, c3 = collect_linear(folded, c2)  # −(g0 + m0) − (0.1 + g0) = −2·g0 − m0 − 0.1
    x = torch.randn(10, 2, dtype=torch.float64)
    ref = -(x[:, 1] + x[:, 0]) - (0.1 + x[:, 1])
    assert torch.allclose(predict(merged, c3, x, ["m0", "g0"]), ref)
    assert sorted(c3) == pytest.approx(sorted([-2.0, -1.0, -0.1]))


def test_meta_tuning_gradient_reaches_constants() -> None:
    rule = SymbolicRule(["tanh", ["mul", ["const", 0], ["var", "m0"]]], [-1.0])
    policy = SymbolicPolicy(rule)
    task = MLPTask()
    flat = FlatModel(task.model(0))
    stream = task.batches(0)
    batches = [next(stream) for _ in range(6)]
    loss, _, _ = unroll_window(policy, flat, flat.flat(), policy.init_state(flat.numel, torch.zeros(())), 0, batches, 0.01)
    loss.backward()
    grad = policy.constants.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    before = policy.constants.detach().clone()
    torch.optim.SGD(policy.parameters(), lr=0.01).step()
    assert float((before - policy.constants.detach()).abs().max()) > 0


def test_describe_mentions_definitions(rule: SymbolicRule) -> None:
    text = rule.describe()
    assert rule.formula() in text and "m̃" in text and not math.isnan(rule.info["r2_heldout_final"])


def test_fitted_rule_not_a_constant_step_drives_the_update(rule: SymbolicRule) -> None:
    """Effect test of symbolic L2O: the optimizer's step is lr × the fitted expression evaluated on
    the RNNProp features (recomputed here in float64), it varies across coordinates and steps as
    the expression does, and changing the fitted constants changes the step. A constant step
    (or a sign step) in place of the rule fails all three."""
    lr, lags = 0.01, rule.lags
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(50, generator=gen) * scale for scale in (1.0, 0.2, 2.0, 0.7, 1.3)]
    feats = _reference_features([g.numpy() for g in grads])
    names = [f"m{k}" for k in range(lags)] + [f"g{k}" for k in range(lags)]

    def steps_of(r: SymbolicRule) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(50))
        opt, out = SymbolicOptimizer([p], r, lr=lr), []
        for g in grads:
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            out.append((p.detach() - before) / lr)
        return torch.stack(out).double()

    mine = steps_of(rule)
    rows = []
    for t in range(len(grads)):
        cols = {f"m{k}": feats[t - k][0] if t - k >= 0 else np.zeros(50) for k in range(lags)}
        cols |= {f"g{k}": feats[t - k][1] if t - k >= 0 else np.zeros(50) for k in range(lags)}
        rows.append(torch.from_numpy(np.stack([cols[n] for n in names], 1)))
    constants = [float(c) for c in rule.constants]
    expected = torch.stack([predict(rule.expr, constants, x, names).double() * torch.ones(50, dtype=torch.float64) for x in rows])
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=2e-6)
    assert float(mine.abs().std()) > 0.05 * float(mine.abs().mean()), rule.formula()  # not one magnitude for all
    shifted = SymbolicRule(rule.expr, [float(c) * 1.5 + 0.1 for c in rule.constants], rule.lags, rule.beta1, rule.beta2)
    assert float((steps_of(shifted) - mine).abs().max()) > 1e-3
